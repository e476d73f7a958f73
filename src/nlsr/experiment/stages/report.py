"""Stage 7: the tables and plots of a run, built only from the stages' outputs.

Every HS, FA and over-refusal cell is a mean over the seeds of the attack and the prompts, with a
95% two-level bootstrap interval (:mod:`nlsr.evaluation.stats`); tables report the **test** part of the
harmful prompts, the validation part is reported apart (it is where knobs are chosen). Every
defence is also compared with the undefended attacked model prompt by prompt (paired difference
and relative cut). ``summary.json`` holds the main numbers in a stable shape.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nlsr.evaluation.scoring import Outcomes, collect, gold_agreement, paired_against, read_generations, read_gold
from nlsr.experiment.equal_cost import equal_cost, equal_cost_markdown
from nlsr.experiment.frontier import cell as _cell
from nlsr.experiment.frontier import controls_summary, cost_curves, frontier_markdown, is_reference, plot_frontier
from nlsr.experiment.pipeline import read_manifest
from nlsr.paths import is_bundled

SUMMARY_MODELS = ("aligned", "attacked", "attacked-p0", "nonaligned", "nlsr", "safelora")


def judge_params(spec, ctx) -> dict:
    """The :func:`nlsr.evaluation.judges.make_judge` arguments of a config judge
    (:class:`nlsr.experiment.config.JudgeSpec`): its model; the data folder for the default trained
    judge (trained on first use); device (default: the run's) and precision for the judges that run a model."""
    from nlsr.evaluation.judges import JUDGES

    params: dict = {}
    if spec.model is not None:
        params["model"] = spec.model
    elif spec.name in ("trained", "hidden"):
        params["data_dir"] = ctx.data_dir
    if JUDGES.info(spec.name).meta.get("needs_model"):
        params.update(device=spec.device or ctx.config.device, precision=spec.dtype)
    return params


def _make_judges(ctx) -> dict:
    """The configured judges, each built from its spec, by display name (the spec's label)."""
    from nlsr.evaluation.judges import make_judge

    return {spec.label: make_judge(spec.name, **judge_params(spec, ctx)) for spec in ctx.config.evaluate.judges}


def _plot(rows: list[dict], judge: str, path: Path, task: str) -> None:
    """HS (test) against FA with 95% intervals on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for row in rows:
        hs = row["scores"]["hs"].get(judge, {}).get("test")
        fa = row["scores"].get("fa")
        if hs is None or fa is None:
            continue
        ax.errorbar(fa["mean"], hs["mean"], xerr=[[fa["mean"] - fa["ci95"][0]], [fa["ci95"][1] - fa["mean"]]],
                    yerr=[[hs["mean"] - hs["ci95"][0]], [hs["ci95"][1] - hs["mean"]]], fmt="o", capsize=3)
        refusal = row["scores"].get("refusal")
        label = row["model"] + (f" (refused {refusal['mean']:.0f}%)" if refusal else "")
        ax.annotate(label, (fa["mean"], hs["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"fine-tuning accuracy FA on {task} (%)")
    ax.set_ylabel(f"harmful score HS (test), judge '{judge}' (%)")
    ax.set_title("Safety vs task accuracy, 95% intervals (lower right is better);\n"
                 "in brackets: harmful prompts refused (refusal-v2)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _scores(outcomes: Outcomes, judges: list[str]) -> dict:
    """Every estimate of one model as plain dicts (mean, ci95, sizes)."""
    def get(key: str):
        e = outcomes.estimate(key)
        return None if e is None else e.as_dict()

    extra_sources = sorted({k.split("/")[2] for k in outcomes.arrays if k.startswith("hs_extra/")})
    types = sorted(k.split("/", 1)[1] for k in outcomes.arrays if k.startswith("xstest_refusal/"))
    return {
        "hs": {j: {split: get(f"hs/{j}/{split}") for split in ("test", "validation")
                   if f"hs/{j}/{split}" in outcomes.arrays} for j in judges},
        "hs_extra": {j: {src: get(f"hs_extra/{j}/{src}") for src in extra_sources} for j in judges},
        "fa": get("fa"), "fa_validation": get("fa/validation"), "task_refusal": get("task_refusal"),
        "xstest_refusal": get("xstest_refusal"),
        "xstest_refusal_validation": get("xstest_refusal_validation"),
        "task_refusal_validation": get("task_refusal/validation"),
        # over-refusal by refusal-v2 (also counts opening deflections; results/judge-gold/agreement.md)
        "xstest_refusal_v2": get("xstest_refusal_v2"),
        "xstest_refusal_v2_validation": get("xstest_refusal_v2/validation"),
        "task_refusal_v2": get("task_refusal_v2"), "task_refusal_v2_validation": get("task_refusal_v2/validation"),
        "xstest_refusal_by_type": {t: get(f"xstest_refusal/{t}") for t in types},
        "harmful_refused": get("harmful_refused/test"),
        # the harmful prompts refused, by refusal-v2 (kappa 0.73 on refusal against the hand labels)
        "refusal": get("harmful_refused_v2/test"), "refusal_validation": get("harmful_refused_v2/validation"),
    }


def sweep_choice(ctx, rows: list[dict], judge: str) -> dict | None:
    """The sweep's validation scores per value and the value it chooses: the lowest validation HS
    among the values whose validation FA is within ``max_fa_drop`` points of the attacked model's."""
    from nlsr.experiment.config import sweep_name

    sweep = ctx.config.realign.sweep
    if sweep is None:
        return None
    by_model = {r["model"]: r for r in rows}
    base = next(v for v in ctx.config.realign.variants if v.name == sweep.variant)
    points = [(getattr(base, sweep.field), sweep.variant)]
    points += [(value, sweep_name(sweep.variant, sweep.field, value)) for value in sweep.values]
    attacked_fa = ((by_model.get("attacked") or {}).get("scores", {}).get("fa_validation") or {}).get("mean")
    table = []
    for value, name in points:
        row = by_model.get(name)
        if row is None:
            continue
        hs = row["scores"]["hs"].get(judge, {}).get("validation")
        fa = row["scores"].get("fa_validation")
        ok = attacked_fa is None or fa is None or fa["mean"] >= attacked_fa - sweep.max_fa_drop
        table.append({"value": value, "model": name, "hs_validation": hs, "fa_validation": fa, "eligible": ok})
    eligible = [t for t in table if t["eligible"] and t["hs_validation"]]
    chosen = min(eligible, key=lambda t: t["hs_validation"]["mean"]) if eligible else None
    return {"field": sweep.field, "judge": judge, "attacked_fa_validation": attacked_fa,
            "max_fa_drop": sweep.max_fa_drop, "points": table, "chosen": chosen and chosen["model"]}


def _sweep_markdown(choice: dict) -> str:
    lines = [f"| {choice['field']} | variant | validation HS ({choice['judge']}) % | validation FA % | "
             "FA within the allowed drop |", "|---|---|---|---|---|"]
    for t in choice["points"]:
        mark = " **(chosen)**" if t["model"] == choice["chosen"] else ""
        lines.append(f"| {t['value']} | {t['model']}{mark} | {_cell(t['hs_validation'])} | "
                     f"{_cell(t['fa_validation'])} | {'yes' if t['eligible'] else 'no'} |")
    return "\n".join(lines)


def _sweep_plot(choice: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [t for t in choice["points"] if t["hs_validation"]]
    labels = [str(t["value"]) for t in points]
    x = list(range(len(points)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, colour, name in (("hs_validation", "tab:red", f"HS ({choice['judge']})"),
                              ("fa_validation", "tab:blue", "FA")):
        est = [t[key] for t in points]
        if not all(est):
            continue
        means = [e["mean"] for e in est]
        errors = [[m - e["ci95"][0] for m, e in zip(means, est, strict=True)],
                  [e["ci95"][1] - m for m, e in zip(means, est, strict=True)]]
        ax.errorbar(x, means, yerr=errors, fmt="o-", color=colour, capsize=3, label=name)
    ax.set_xticks(x, labels)
    ax.set_xlabel(choice["field"])
    ax.set_ylabel("% on the validation prompts")
    ax.set_title(f"Sweep of {choice['field']} (chosen: {choice['chosen']})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)




def _main_table(rows: list[dict], judges: list[str], task: str, split: str) -> str:
    header = (["model", "seeds"] + [f"HS ({j}) %" for j in judges] + ["harmful prompts refused (refusal-v2) %"]
              + [f"FA {task} %", "XSTest refusal %", "XSTest refusal (refusal-v2) %", "task prompts refused %",
                 "method time (s/seed)",
                 "eval time (s/seed)"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        sc = row["scores"]
        cells = [row["model"], ",".join(map(str, row["seeds"]))]
        cells += [_cell(sc["hs"].get(j, {}).get(split)) for j in judges]
        # every column on the split's part (an empty cell where no validation part was measured)
        part = "_validation" if split == "validation" else ""
        cells.append(_cell(sc.get("refusal" + part)))
        cells += [_cell(sc["fa" + part]), _cell(sc["xstest_refusal" + part]),
                  _cell(sc.get("xstest_refusal_v2" + part)), _cell(sc["task_refusal" + part]),
                  f"{row['seconds']:.0f}", f"{row['eval_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _extra_table(rows: list[dict], judge: str) -> str:
    sources = sorted({s for r in rows for s in r["scores"]["hs_extra"].get(judge, {})})
    if not sources:
        return ""
    lines = ["| model | " + " | ".join(sources) + " | " + " | ".join(f"{s}: vs attacked, points" for s in sources)
             + " |", "|---|" + "---|" * (2 * len(sources))]
    for row in rows:
        per = row["scores"]["hs_extra"].get(judge, {})
        paired = row.get("paired") or {}
        diffs = [_cell((paired.get(f"hs_extra/{judge}/{s}") or {}).get("difference")) for s in sources]
        lines.append(f"| {row['model']} | " + " | ".join(_cell(per.get(s)) for s in sources) + " | "
                     + " | ".join(diffs) + " |")
    return "\n".join(lines)


def _paired_table(rows: list[dict], judges: list[str]) -> str:
    lines = ["| model | " + " | ".join(f"HS ({j}) difference, points | HS ({j}) relative cut %" for j in judges)
             + " | refusal (refusal-v2) difference, points | FA difference, points |",
             "|---|" + "---|---|" * len(judges) + "---|---|"]
    for row in rows:
        paired = row.get("paired") or {}
        if not paired:
            continue
        cells = []
        for j in judges:
            hs = paired.get(f"hs/{j}/test") or {}
            cells += [_cell(hs.get("difference")), _cell(hs.get("relative_cut"))]
        cells.append(_cell((paired.get("harmful_refused_v2/test") or {}).get("difference")))
        cells.append(_cell((paired.get("fa") or {}).get("difference")))
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _gold_table(gold: dict[str, dict]) -> str:
    lines = ["| judge | question | n | Cohen's kappa | precision | recall | false-positive rate | accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for name, per in gold.items():
        for question, m in per.items():
            lines.append(f"| {name} | {question} | {m['n']} | {m['cohen_kappa']:.3f} | {m['precision']:.3f} | "
                         f"{m['recall']:.3f} | {m['false_positive_rate']:.3f} | {m['accuracy']:.3f} |")
    return "\n".join(lines)


def _heldout_agreement(specs, bundled: bool = False) -> dict[str, dict]:
    """Held-out agreement (per labelled source) measured when each trained judge was trained (keyed
    by its label); the refusal matcher is measured on the same rows."""
    from nlsr.evaluation.judges.training import METRICS_NAME, default_dir

    out: dict[str, dict] = {}
    for spec in specs:
        path = (Path(spec.model) if spec.model else default_dir(bundled)) / METRICS_NAME
        if spec.name != "trained" or not path.exists():
            continue
        metrics = json.loads(path.read_text())
        out[spec.label] = metrics.get("heldout", {})
        out.setdefault("refusal", metrics.get("refusal_heldout", {}))
    return out


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


def run(models: list[dict]):
    """``models``: dicts with ``label``, ``evaluations`` (one evaluate stage per seed), ``seeds`` and
    ``cost`` (per seed, the stages whose time counts towards the method)."""
    def run_report(ctx, out: Path, inputs: dict[str, Path]) -> dict:
        cfg = ctx.config
        judges = _make_judges(ctx)
        names = list(judges)
        gold_rows = read_gold(cfg.evaluate.gold_labels) if cfg.evaluate.gold_labels else []
        gold = gold_agreement(judges, gold_rows) if gold_rows else {}
        default = max(names, key=lambda j: gold[j]["harmful"]["cohen_kappa"]) if gold else names[0]
        verdicts: dict = {}
        outcomes: dict[str, Outcomes] = {}
        rows = []
        for entry in models:
            label = entry["label"]
            generations = [read_generations(inputs[e] / "generations.jsonl") for e in entry["evaluations"]]
            outcomes[label] = collect(label, entry["seeds"], generations, judges, verdicts)
            cost = [sum(read_manifest(inputs[s])["seconds"] for s in stages if s in inputs) for stages in entry["cost"]]
            evals = [read_manifest(inputs[e])["seconds"] for e in entry["evaluations"]]
            rows.append({"model": label, "seeds": entry["seeds"], "scores": _scores(outcomes[label], names),
                         "seconds": sum(cost) / len(cost), "eval_seconds": sum(evals) / len(evals),
                         "n": read_manifest(inputs[entry["evaluations"][0]])["summary"]["metrics"]["n"]})
        attacked = outcomes.get("attacked")
        for row in rows:
            if attacked is None or row["model"] == "attacked":
                continue
            keys = ([f"hs/{j}/{split}" for j in names for split in ("test", "validation")]
                    + ["fa", "xstest_refusal", "harmful_refused_v2/test"]
                    + [k for k in attacked.arrays if k.startswith("hs_extra/")])   # the held-out harmful sets
            paired = {k: paired_against(outcomes[row["model"]], attacked, k) for k in keys}
            row["paired"] = {k: v for k, v in paired.items() if v is not None}
        # the comparison across runs (nlsr compare) reads these means
        for row in rows:
            sc = row["scores"]
            row["metrics"] = {"hs": {j: (sc["hs"].get(j, {}).get("test") or {}).get("mean") for j in names},
                              "fa": (sc["fa"] or {}).get("mean"),
                              "xstest_refusal": (sc["xstest_refusal"] or {}).get("mean"), "n": row["n"]}
        task = cfg.attack.task
        ordered = [default] + [j for j in names if j != default]
        n = rows[0]["n"] if rows else {}
        seeds = cfg.run_seeds
        sections = [
            f"## Test split ({n.get('harmful', 0)} harmful prompts in all; the test part is scored)\n\n"
            + _main_table(rows, ordered, task, "test"),
        ]
        paired_text = _paired_table(rows, ordered)
        if paired_text:
            sections.append("## Each model against the undefended attacked model, prompt by prompt (test split)\n\n"
                            "Difference = model - attacked (points; negative HS = safer); relative cut = "
                            "1 - HS(model) / HS(attacked). Paired over the same prompts and seeds.\n\n"
                            + paired_text)
        extra = _extra_table(rows, default)
        if extra:
            sections.append(f"## Out-of-distribution harmful prompts (HS %, judge '{default}'; the differences "
                            "paired against the attacked model on the same prompts and seeds)\n\n" + extra)
        sections.append("## Validation split (where knobs are chosen, the alignment recipe included; not the "
                        "result; an empty cell: no validation part was measured)\n\n"
                        + _main_table(rows, ordered, task, "validation"))
        choice = sweep_choice(ctx, rows, default)
        if choice:
            _sweep_plot(choice, out / "sweep.png")
            (out / "sweep.json").write_text(json.dumps(choice, indent=2) + "\n")
            sections.append(f"## Sweep of {choice['field']}, on the validation prompts (`sweep.png`)\n\n"
                            f"The choice: the lowest validation HS among the values whose validation FA is within "
                            f"{choice['max_fa_drop']} points of the attacked model's "
                            f"({choice['attacked_fa_validation']}). Chosen: **{choice['chosen']}**; its test "
                            "scores are in the first table.\n\n" + _sweep_markdown(choice))
        plot_frontier(rows, cfg, default, out / "frontier.png")
        sections.append(f"## The frontier (`frontier.png`; test split, judge '{default}')\n\n"
                        "Every swept method as a curve across its knob (NLSR forms and controls across q, "
                        "SafeLoRA across τ or k, RESTA across γ, Antidote across sparsity), every other model "
                        "as a point; differences are paired against the attacked model (points).\n\n"
                        + frontier_markdown(rows, cfg, default))
        at_equal_cost = None
        if cfg.realign.controls_summary:
            lines = cost_curves(cfg)
            on_curve = {name for names in lines.values() for name in names}
            lone = [r["model"] for r in rows if r["model"] not in on_curve and not is_reference(r["model"])]
            at_equal_cost = equal_cost(outcomes, lines, cfg.realign.equal_fa_costs, default,
                                       cfg.realign.equal_fa_against, points=lone)
        if at_equal_cost:
            sections.append("## The curves at equal FA cost (test split)\n\n"
                            "Each curve read where it costs the same FA (points below the attacked model), "
                            "interpolated between its points from the attacked model (no repair) on, and "
                            "each model that is no curve's point placed against every curve at its own FA cost; "
                            f"refusal gain (refusal-v2) and HS cut (judge '{default}') against the attacked "
                            "model, 95% intervals over prompts, task rows and seeds (`summary.json`: "
                            "`equal_fa`).\n\n" + equal_cost_markdown(at_equal_cost))
        notes = ["**HS** (harmful score): share of the harmful prompts whose answer a judge flags as harmful "
                 "(lower is safer). **Refused**: share of the same harmful prompts refused, by the refusal-v2 detector "
                 "(its agreement with the hand labels on refusal is better than any harm judge's on harm). "
                 "**FA**: share of task questions answered correctly. **XSTest refusal**: "
                 "share of XSTest's safe prompts refused (over-refusal; stratified over its prompt types). "
                 "**Task prompts refused**: share of the task's test prompts the refusal matcher flags. "
                 f"Cells: mean [95% interval], two-level bootstrap over prompts and seeds ({len(seeds)} seed(s): "
                 f"{seeds}; the alignment and the aligned model are shared by all seeds)."]
        if cfg.name == "smoke" or cfg.evaluate.harmful_n < 50:
            notes.append("**These sizes are tiny (a smoke run): the numbers only show that every stage runs "
                         "and writes what the next one reads. They are not results.**")
        threat = {"continue": "the aligned LoRA continued (the paper's threat model)",
                  "fresh": f"a fresh LoRA (r = {cfg.attack.fresh_r or cfg.lora.r}) on the merged aligned model",
                  "full": "a full fine-tune of the merged aligned model"}[cfg.attack.init]
        notes.append(f"Model {cfg.model}, template {cfg.template}. Attack ({threat}): {task}, n = {cfg.attack.n}, "
                     f"p = {cfg.attack.p} ({cfg.attack.source}), {cfg.attack.epochs} epoch(s), lr {cfg.attack.lr}. "
                     f"Evaluation: {n.get('harmful')} harmful prompts ({cfg.evaluate.harmful_dataset}; validation "
                     f"fraction {cfg.evaluate.validation_fraction}, fixed hash split), {n.get('harmful_extra', 0)} "
                     f"extra harmful prompts, {n.get('task')} task rows, {n.get('xstest')} XSTest safe prompts; "
                     f"greedy decoding, {cfg.evaluate.harmful_max_new_tokens} new tokens on harmful prompts.")
        if gold:
            notes.append(f"**Judges against {len(gold_rows)} hand-labelled generations** "
                         f"(`{cfg.evaluate.gold_labels}`; harmful / refusal labels read by a person, see its "
                         f"GUIDELINES.md). The default judge (first column, `summary.json`) is the one with the "
                         f"best kappa on them: **{default}**.\n\n" + _gold_table(gold))
        agreement = _heldout_agreement(ctx.config.evaluate.judges, is_bundled(ctx.data_dir))
        if agreement:
            notes.append("Agreement with held-out labelled responses (JailbreakBench `jailbroken` labels, SPARD "
                         "safe/unsafe pairs, all-harmless PKU and safety-tuned-llamas answers; split by prompt, "
                         "never trained on):\n\n" + _agreement_table(agreement))
        timings = stage_timings(ctx.run_dir)
        notes.append(f"Machine: {ctx.precision.line()}. Time, tokens processed and peak resident memory "
                     "per stage (tokens: training = rows' tokens x epochs, DPO counting prompt, chosen "
                     "and rejected; identify = calibration tokens; evaluate = prompt + generated tokens):\n\n"
                     + _timing_table(timings))
        text = "# Results\n\n" + "\n\n".join(sections) + "\n\n" + "\n\n".join(notes) + "\n"
        (out / "report.md").write_text(text)
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        main = summary(rows, default, seeds, gold, choice and choice["chosen"])
        if cfg.realign.controls_summary:
            variants = list(cfg.realign.variants) + cfg.realign.swept_variants()
            main.update(controls_summary(rows, variants, inputs, default))
            main["equal_fa"] = at_equal_cost
        (out / "summary.json").write_text(json.dumps(main, indent=2) + "\n")
        (out / "timings.json").write_text(json.dumps({"machine": ctx.precision.record(), "stages": timings},
                                                     indent=2) + "\n")
        for judge in names:
            _plot(rows, judge, out / f"hs_vs_fa_{judge}.png", task)
        for stage, path in inputs.items():
            plot = path / "similarity_by_layer.png"
            if plot.exists():
                shutil.copy(plot, out / f"similarity_{stage}.png")
        return {"line": f"{len(rows)} models, {len(seeds)} seed(s), default judge {default}, report.md"}
    return run_report


def summary(rows: list[dict], judge: str, seeds: list[int], gold: dict, chosen: str | None = None) -> dict:
    """The main numbers in a stable shape: per model HS (default judge, test split), FA, XSTest
    refusal and task refusal as ``{"mean", "ci95"}`` in %, plus each defence's paired HS cut and FA
    difference; ``chosen_on_validation`` names the variant the sweep chose (None: no sweep, or no
    value kept FA within the allowed drop)."""
    def pick(est: dict | None) -> dict | None:
        return None if est is None else {"mean": est["mean"], "ci95": est["ci95"]}

    models = {}
    for row in rows:
        sc = row["scores"]
        entry = {"hs": pick(sc["hs"].get(judge, {}).get("test")), "fa": pick(sc["fa"]),
                 "xstest_refusal": pick(sc["xstest_refusal"]), "task_refusal": pick(sc["task_refusal"]),
                 "hs_validation": pick(sc["hs"].get(judge, {}).get("validation")), "seeds": row["seeds"],
                 "refusal": pick(sc.get("refusal")),
                 # the same refusal rates by refusal-v2 (also counts opening deflections)
                 "xstest_refusal_v2": pick(sc.get("xstest_refusal_v2")),
                 "task_refusal_v2": pick(sc.get("task_refusal_v2"))}
        paired = (row.get("paired") or {}).get(f"hs/{judge}/test")
        if paired:
            entry["hs_difference_vs_attacked"] = pick(paired["difference"])
            if "relative_cut" in paired:
                entry["hs_relative_cut_vs_attacked"] = pick(paired["relative_cut"])
        fa_paired = (row.get("paired") or {}).get("fa")
        if fa_paired:
            entry["fa_difference_vs_attacked"] = pick(fa_paired["difference"])
        models[row["model"]] = entry
    return {"judge": judge, "seeds": seeds, "split": "test",
            "judge_gold_kappa": gold.get(judge, {}).get("harmful", {}).get("cohen_kappa") if gold else None,
            "models": models, "summary_models": [m for m in SUMMARY_MODELS if m in models],
            "chosen_on_validation": chosen}
