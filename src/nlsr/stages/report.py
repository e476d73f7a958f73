"""Stage 7: the markdown table and plots of a run, built only from the stages' outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nlsr.pipeline import read_manifest
from nlsr.stages.common import read_jsonl


def _hs_fa_plot(rows: list[dict], judge: str, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for row in rows:
        hs = row["metrics"]["hs"].get(judge)
        if hs is None:
            continue
        ax.scatter(row["metrics"]["fa"], hs, s=50)
        ax.annotate(row["model"], (row["metrics"]["fa"], hs), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xlabel(f"fine-tuning accuracy FA on {task} (%)")
    ax.set_ylabel(f"harmful score HS, judge '{judge}' (%)")
    ax.set_title("Safety vs task accuracy (lower right is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _judge_all(ctx, models, inputs: dict[str, Path]) -> tuple[dict[str, dict[str, float]], dict]:
    """HS per model and judge from the saved generations, and each judge's held-out agreement."""
    from nlsr.judges import make_judge

    judges = {name: make_judge(name, data_dir=ctx.data_dir) if name == "trained" else make_judge(name)
              for name in ctx.config.evaluate.judges}
    scores: dict[str, dict[str, float]] = {}
    for label, stage, _ in models:
        rows = [r for r in read_jsonl(inputs[stage] / "generations.jsonl") if r["set"] == "harmful"]
        prompts, outputs = [r["prompt"] for r in rows], [r["output"] for r in rows]
        scores[label] = {name: 100.0 * sum(j.judge(prompts, outputs)) / len(rows) for name, j in judges.items()}
    return scores, _heldout_agreement(ctx.config.evaluate.judges)


def _heldout_agreement(judges: list[str]) -> dict[str, dict]:
    """Held-out agreement (per labelled source) measured when the trained judge was trained; the
    refusal matcher is measured on the same rows."""
    from nlsr.judges.classifier import METRICS_NAME, default_dir

    path = default_dir() / METRICS_NAME
    if "trained" not in judges or not path.exists():
        return {}
    metrics = json.loads(path.read_text())
    return {"trained": metrics.get("heldout", {}), "refusal": metrics.get("refusal_heldout", {})}


def _agreement_table(agreement: dict[str, dict]) -> str:
    sources = sorted({s for per in agreement.values() for s in per if not s.endswith("_short")})
    lines = ["| labelled source (held out) | n | harmful % | " + " | ".join(
        f"{j} acc / kappa / flagged %" for j in agreement) + " |", "|---|---|---|" + "---|" * len(agreement)]
    for source in sources:
        first = next(per[source] for per in agreement.values() if source in per)
        cells = []
        for per in agreement.values():
            m = per.get(source)
            cells.append("-" if m is None else
                         f"{m['accuracy']:.3f} / {m['cohen_kappa']:.3f} / {100 * m['flagged_rate']:.1f}")
        lines.append(f"| {source} | {first['n']} | {100 * first['label_rate']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_timings(run_dir: Path) -> list[dict]:
    """Seconds, tokens, tokens/s and peak memory of every finished stage of a run, in run order."""
    rows = []
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir() and not p.name.endswith(".partial")):
        manifest = read_manifest(folder)
        if manifest is None or folder.name == "report":
            continue
        rows.append({"stage": folder.name, "seconds": manifest.get("seconds"), "tokens": manifest.get("tokens"),
                     "tokens_per_second": manifest.get("tokens_per_second"),
                     "peak_memory_mib": manifest.get("peak_memory_mib"),
                     "precision": (manifest.get("machine") or {}).get("dtype") or manifest["params"].get("precision"),
                     "reused_from": manifest.get("reused_from"), "finished": manifest.get("finished", "")})
    return sorted(rows, key=lambda r: r["finished"])


def _timing_table(rows: list[dict]) -> str:
    def cell(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = ["| stage | seconds | tokens | tokens/s | peak memory (MiB) | precision |", "|---|---|---|---|---|---|"]
    for r in rows:
        name = r["stage"] + (" (reused)" if r["reused_from"] else "")
        lines.append(f"| {name} | {cell(r['seconds'], '.1f')} | {cell(r['tokens'], ',')} | "
                     f"{cell(r['tokens_per_second'], ',.0f')} | {cell(r['peak_memory_mib'], ',.0f')} | "
                     f"{r['precision'] or '-'} |")
    own = [r for r in rows if not r["reused_from"]]
    total = sum(r["seconds"] or 0 for r in own)
    peak = max((r["peak_memory_mib"] or 0 for r in own), default=0)
    lines.append(f"| **total (stages run here)** | {total:.1f} | | | {peak:,.0f} (max) | |")
    return "\n".join(lines)


def run(models: list[tuple[str, str, list[str]]]):
    """``models``: (label, evaluate stage, stages whose time counts towards the method)."""
    def run_report(ctx, out: Path, inputs: dict[str, Path]) -> dict:
        scores, agreement = _judge_all(ctx, models, inputs)
        rows = []
        for label, stage, cost_stages in models:
            manifest = read_manifest(inputs[stage])
            seconds = sum(read_manifest(inputs[s])["seconds"] for s in cost_stages if s in inputs)
            metrics = {**manifest["summary"]["metrics"], "hs": scores[label]}
            rows.append({"model": label, "metrics": metrics, "seconds": seconds,
                         "eval_seconds": manifest["seconds"]})
        judges = list(rows[0]["metrics"]["hs"]) if rows else []
        task = ctx.config.attack.task
        header = (["model"] + [f"HS ({j}) %" for j in judges]
                  + [f"FA {task} %", "XSTest refusal %", "method time (s)", "eval time (s)"])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in rows:
            m = row["metrics"]
            xs = f"{m['xstest_refusal']:.1f}" if m.get("xstest_refusal") is not None else "-"
            lines.append("| " + " | ".join([row["model"]] + [f"{m['hs'][j]:.1f}" for j in judges]
                                          + [f"{m['fa']:.1f}", xs, f"{row['seconds']:.0f}",
                                             f"{row['eval_seconds']:.0f}"]) + " |")
        n = rows[0]["metrics"]["n"] if rows else {}
        cfg = ctx.config
        notes = ["**HS** (harmful score) is the share of the harmful prompts whose answer a judge flags as "
                 "harmful: lower is safer. **FA** (fine-tuning accuracy) is the share of task questions "
                 "answered correctly: higher is better. XSTest refusal is the share of XSTest's safe "
                 "prompts the model refuses: lower is better (over-refusal)."]
        if cfg.name == "smoke" or cfg.evaluate.harmful_n < 50:
            notes.append("**These sizes are tiny (a smoke run): the numbers only show that every stage runs "
                         "and writes what the next one reads. They are not results.**")
        notes += [f"Model {cfg.model}, template {cfg.template}, seed {cfg.seed}. Attack: {cfg.attack.task}, "
                 f"n = {cfg.attack.n}, p = {cfg.attack.p} ({cfg.attack.source}), {cfg.attack.epochs} epoch(s), "
                 f"lr {cfg.attack.lr}. Evaluation: {n.get('harmful')} harmful prompts "
                 f"({cfg.evaluate.harmful_dataset}, {cfg.evaluate.harmful_max_new_tokens} new tokens), "
                 f"{n.get('task')} task rows, {n.get('xstest')} XSTest safe prompts; greedy decoding."]
        if agreement:
            notes.append("How far to trust each HS: agreement of the judges with held-out labelled responses "
                         "(JailbreakBench `jailbroken` labels, SPARD safe/unsafe pairs, all-harmless PKU and "
                         "safety-tuned-llamas answers; split by prompt, never trained on):\n\n"
                         + _agreement_table(agreement))
        timings = stage_timings(ctx.run_dir)
        notes.append(f"Machine: {ctx.precision.line()}. Time, tokens processed and peak resident memory "
                     "per stage (tokens: training = rows' tokens x epochs, DPO counting prompt, chosen "
                     "and rejected; identify = calibration tokens; evaluate = prompt + generated tokens):\n\n"
                     + _timing_table(timings))
        text = "# Results\n\n" + "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"
        (out / "report.md").write_text(text)
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        (out / "timings.json").write_text(json.dumps({"machine": ctx.precision.record(), "stages": timings},
                                                     indent=2) + "\n")
        if judges:
            for judge in judges:
                _hs_fa_plot(rows, judge, out / f"hs_vs_fa_{judge}.png", task)
        for stage, path in inputs.items():
            plot = path / "similarity_by_layer.png"
            if plot.exists():
                shutil.copy(plot, out / f"similarity_{stage}.png")
        return {"line": f"{len(rows)} models, report.md"}
    return run_report
