"""The safety-utility frontier of a run: every post-hoc method as a curve across its knob, the other
models as points, and the controls summary of issue 34.

A *curve* is a sweep's base variant and the variants the sweep adds (``realign.sweep`` and
``realign.sweeps``), ordered by the swept value: the NLSR forms and controls across q, SafeLoRA
across τ or k, RESTA across γ, Antidote across sparsity. Every other model (the aligned, attacked,
p = 0 and non-aligned references, the training-time defences, lone variants) is a point.
:func:`plot_frontier` draws HS (y) against FA (x) with 95% intervals on both axes, and XSTest
over-refusal against FA in a second panel; :func:`frontier_markdown` is the same as a table with the
paired differences against the attacked model; :func:`controls_summary` is the ``variants`` and
``default`` part of ``summary.json``.
"""
from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path

from nlsr.experiment.config import DEFENCE_ALIGNED_PREFIX, ExperimentConfig, VariantSection, sweep_name

REFERENCE_MODELS = ("aligned", "attacked", "attacked-p0", "nonaligned")


def is_reference(model: str) -> bool:
    """A reference point of the frontier: one of :data:`REFERENCE_MODELS`, or a defence's own aligned
    model before the attack (``aligned-<defence>``)."""
    return model in REFERENCE_MODELS or model.startswith(DEFENCE_ALIGNED_PREFIX)


DEFAULT_RULE = ("the NLSR variants that differ from the defaults only in transplant form and q (ExPO "
                "reference, identified masks, the paper's selection, β 0.9): among those whose validation "
                "FA is within {drop} points of the attacked model's, the largest validation HS cut "
                "(attacked HS - variant HS, judge '{judge}'); among equal cuts, the smallest relative change "
                "of the update (the repair that keeps most of the fine-tune)")


def curves(cfg: ExperimentConfig) -> dict[str, list[tuple[object, str]]]:
    """``{curve label: [(knob value, model name), ...]}``, one curve per sweep, sorted by value; the
    label is the sweep's name template with its value left out (``exact-q``, ``resta-g``)."""
    variants = {v.name: v for v in cfg.realign.variants}
    out: dict[str, list[tuple[object, str]]] = {}
    for sweep in cfg.realign.all_sweeps():
        base = variants[sweep.variant]
        points = [(getattr(base, sweep.field), base.name)]
        points += [(value, sweep_name(base.name, sweep.field, value, sweep.name)) for value in sweep.values]
        label = sweep.label()
        with contextlib.suppress(TypeError, ValueError):    # a sweep of names (select, transplant) keeps its order
            points.sort(key=lambda p: float(p[0]))
        out[label] = points
    return out


# sweeps whose values have no order of cost (draws of a seed, names): drawn, but not read at a cost
UNORDERED_FIELDS = ("seed", "select", "transplant")


def cost_curves(cfg: ExperimentConfig) -> dict[str, list[str]]:
    """The curves of :func:`curves` across an ordered knob (not a draw seed, a rule or a form), as model
    names in knob order: what :func:`nlsr.experiment.equal_cost.equal_cost` reads at equal FA cost."""
    ordered = {sweep.label() for sweep in cfg.realign.all_sweeps() if sweep.field not in UNORDERED_FIELDS}
    return {label: [name for _, name in pts] for label, pts in curves(cfg).items() if label in ordered}


def cell(est: dict | None) -> str:
    """A table cell: ``mean [low, high]`` of an estimate, or ``-``."""
    if not est:
        return "-"
    return f"{est['mean']:.1f} [{est['ci95'][0]:.1f}, {est['ci95'][1]:.1f}]"


def _pick(est: dict | None) -> dict | None:
    return None if not est else {"mean": est["mean"], "ci": list(est["ci95"])}


def _errors(est: dict) -> list[list[float]]:
    return [[est["mean"] - est["ci95"][0]], [est["ci95"][1] - est["mean"]]]


def plot_frontier(rows: list[dict], cfg: ExperimentConfig, judge: str, path: Path) -> Path:
    """``frontier.png``: HS (test, ``judge``) and XSTest over-refusal against FA; curves for the swept
    methods, points for the rest, 95% intervals on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_model = {r["model"]: r for r in rows}
    lines = curves(cfg)
    on_curve = {name for pts in lines.values() for _, name in pts}
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    colours = plt.get_cmap("tab20")
    panels = ((axes[0], lambda sc: sc["hs"].get(judge, {}).get("test"),
               f"harmful score HS (test), judge '{judge}' (%)"),
              (axes[1], lambda sc: sc.get("xstest_refusal"), "XSTest safe prompts refused (over-refusal, %)"))
    for ax, metric, ylabel in panels:
        for i, (label, pts) in enumerate(lines.items()):
            xs, ys = [], []
            for _, name in pts:
                row = by_model.get(name)
                y = metric(row["scores"]) if row else None
                fa = row["scores"].get("fa") if row else None
                if not y or not fa:
                    continue
                ax.errorbar(fa["mean"], y["mean"], xerr=_errors(fa), yerr=_errors(y), fmt="o", ms=4,
                            color=colours(i % 20), capsize=2, alpha=0.8)
                xs.append(fa["mean"])
                ys.append(y["mean"])
            if xs:
                ax.plot(xs, ys, "-", color=colours(i % 20), label=label, alpha=0.8)
        for j, row in enumerate(r for r in rows if r["model"] not in on_curve):
            y, fa = metric(row["scores"]), row["scores"].get("fa")
            if not y or not fa:
                continue
            marker = "s" if is_reference(row["model"]) else "^"
            ax.errorbar(fa["mean"], y["mean"], xerr=_errors(fa), yerr=_errors(y), fmt=marker, ms=7, color="black",
                        capsize=2, alpha=0.7)
            ax.annotate(row["model"], (fa["mean"], y["mean"]), textcoords="offset points", xytext=(5, 3 + 4 * (j % 2)),
                        fontsize=7)
        ax.set_xlabel(f"fine-tuning accuracy FA on {cfg.attack.task} (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[1]:       # a run without sweeps draws points only
        axes[0].legend(fontsize=7, loc="best", title="curves (across the knob)", title_fontsize=7)
    axes[0].set_title("Safety vs utility: lower right is better (95% intervals)", fontsize=10)
    axes[1].set_title("Over-refusal vs utility (squares: references; triangles: other models)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def frontier_markdown(rows: list[dict], cfg: ExperimentConfig, judge: str) -> str:
    """One row per model, curve by curve then the points: HS, refusal, FA, XSTest refusal, and the
    paired differences (model - attacked, points) of HS and FA."""
    _cell = cell
    by_model = {r["model"]: r for r in rows}
    order: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    for label, pts in curves(cfg).items():
        for value, name in pts:
            if name in by_model and name not in seen:
                order.append((name, label, str(value)))
                seen.add(name)
    order += [(r["model"], "-", "-") for r in rows if r["model"] not in seen]
    lines = [f"| model | curve | knob | HS ({judge}) % | refused (refusal-v2) % | FA % | XSTest refusal % | "
             "HS - attacked, points | FA - attacked, points |", "|---|---|---|---|---|---|---|---|---|"]
    for name, label, value in order:
        sc = by_model[name]["scores"]
        paired = by_model[name].get("paired") or {}
        lines.append(f"| {name} | {label} | {value} | {_cell(sc['hs'].get(judge, {}).get('test'))} | "
                     f"{_cell(sc.get('refusal'))} | {_cell(sc.get('fa'))} | {_cell(sc.get('xstest_refusal'))} | "
                     f"{_cell((paired.get(f'hs/{judge}/test') or {}).get('difference'))} | "
                     f"{_cell((paired.get('fa') or {}).get('difference'))} |")
    return "\n".join(lines)


def realign_summaries(inputs: dict[str, Path], name: str) -> list[dict]:
    """The ``summary`` of every seed's ``realign-<name>`` report among the report's inputs."""
    out = []
    for stage, folder in inputs.items():
        prefix = f"realign-{name}-s"
        if stage == f"realign-{name}" or (stage.startswith(prefix) and stage[len(prefix):].isdigit()):
            path = Path(folder) / "report.json"
            if path.is_file():
                out.append(json.loads(path.read_text())["summary"])
    return out


def _mean_of(summaries: list[dict], key: str) -> float | None:
    values = [s[key] for s in summaries if s.get(key) is not None]
    return statistics.fmean(values) if values else None


def is_form_grid(variant: VariantSection) -> bool:
    """A variant that differs from the NLSR defaults only in its transplant form and q."""
    default = VariantSection(name=variant.name)
    same = ("method", "beta", "scale_both", "rho", "masks", "reference", "select", "p_base", "epsilon", "seed",
            "threshold", "protect_task", "granularity")
    return all(getattr(variant, f) == getattr(default, f) for f in same)


def choose_default(rows: list[dict], variants: list[VariantSection], judge: str,
                   max_fa_drop: float = 2.0, changes: dict[str, float | None] | None = None) -> dict | None:
    """The default ``(transplant, q)`` by :data:`DEFAULT_RULE`, on the validation prompts; None when no
    variant of the grid was scored or none kept its validation FA within ``max_fa_drop`` points.
    ``changes``: each variant's relative change of the update (mean over seeds), which breaks ties
    (a variant without one loses them)."""
    changes = changes or {}
    by_model = {r["model"]: r for r in rows}
    attacked = by_model.get("attacked")
    if attacked is None:
        return None
    hs_attacked = (attacked["scores"]["hs"].get(judge, {}).get("validation") or {}).get("mean")
    fa_attacked = (attacked["scores"].get("fa_validation") or {}).get("mean")
    candidates = []
    for v in variants:
        row = by_model.get(v.name)
        if row is None or not is_form_grid(v):
            continue
        hs = (row["scores"]["hs"].get(judge, {}).get("validation") or {}).get("mean")
        fa = (row["scores"].get("fa_validation") or {}).get("mean")
        if hs is None or hs_attacked is None:
            continue
        if fa_attacked is not None and (fa is None or fa < fa_attacked - max_fa_drop):
            continue
        change = changes.get(v.name)
        candidates.append((hs_attacked - hs, -change if change is not None else float("-inf"), v))
    if not candidates:
        return None
    cut, _, best = max(candidates, key=lambda c: c[:2])
    return {"transplant": best.transplant, "q": best.q, "variant": best.name, "hs_cut_validation": cut,
            "rule": DEFAULT_RULE.format(drop=max_fa_drop, judge=judge)}


def controls_summary(rows: list[dict], variants: list[VariantSection], inputs: dict[str, Path], judge: str,
                     max_fa_drop: float = 2.0) -> dict:
    """``{"variants": {name: {...}}, "default": {...}}``: per variant its knobs, HS (test, ``judge``),
    refusal of the harmful prompts (refusal-v2), FA and XSTest refusal as ``{mean, ci}`` (%), and the
    mean over seeds of the modules repaired and of the form's self-transplant change (from the realign
    reports); the default (transplant, q) by :func:`choose_default`."""
    by_model = {r["model"]: r for r in rows}
    out = {}
    for v in variants:
        row = by_model.get(v.name)
        if row is None:
            continue
        sc = row["scores"]
        reports = realign_summaries(inputs, v.name)
        entry = {"method": v.method, "q": v.q if v.method == "nlsr" else None,
                 "transplant": v.transplant if v.method == "nlsr" else None,
                 "hs": _pick(sc["hs"].get(judge, {}).get("test")), "refusal": _pick(sc.get("refusal")),
                 "fa": _pick(sc.get("fa")), "xstest_refusal": _pick(sc.get("xstest_refusal")),
                 "modules_repaired": _mean_of(reports, "projected" if v.method == "safelora" else "repaired"),
                 "self_transplant_change": _mean_of(reports, "self_transplant_change"),
                 "relative_change": _mean_of(reports, "relative_change")}
        knob = {"nlsr": {"masks": v.masks, "reference": v.reference, "select": v.select, "beta": v.beta,
                         "seed": v.seed},
                "safelora": {"threshold": v.threshold, "num_modules": v.num_modules},
                "resta": {"gamma": v.gamma}, "antidote": {"sparsity": v.sparsity}}[v.method]
        out[v.name] = {**entry, **knob}
    changes = {name: entry["relative_change"] for name, entry in out.items()}
    return {"variants": out, "default": choose_default(rows, variants, judge, max_fa_drop, changes)}
