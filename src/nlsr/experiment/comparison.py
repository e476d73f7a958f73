"""One table across runs, in the paper's layout: rows = methods, columns = settings (HS / FA).

Each run (a run folder or its ``nlsr export``) is one setting: a task and a poison ratio p. The
table puts the methods in the paper's order, shows the paper's numbers for the same setting where
it has them, and compares the two HS rankings.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from nlsr.errors import NlsrError

# Row order and display names; labels not listed here (other variants) follow, in run order.
METHODS: dict[str, str] = {
    "nonaligned": "Non-aligned",
    "aligned": "Aligned, before fine-tuning",
    "attacked": "Aligned (no defence)",
    "vlguard-mix": "VLGuard mix",
    "vaccine": "Vaccine",
    "lisa": "Lisa",
    "constrained-sft": "ConstrainedSFT",
    "safelora": "SafeLoRA",
    "safelora-k10": "SafeLoRA (10 least similar)",
    "safelora-t0.5": "SafeLoRA (tau = 0.5)",
    "nlsr": "NLSR",
    "nlsr-reverse": "NLSR, reversed selection rule",
    "nlsr-factor": "NLSR, factor-wise transplant",
    "nlsr-random-masks": "NLSR, random neuron masks",
}

# The paper's HS / FA (Llama-3-8B, method.md "Reference numbers"); FA is missing where the paper's
# table gives only HS for that column.
PAPER: dict[tuple[str, float], dict[str, tuple[float, float | None]]] = {
    ("sst2", 0.05): {"nonaligned": (77.4, 94.7), "attacked": (56.6, 94.8), "vlguard-mix": (53.2, None),
                     "vaccine": (58.8, None), "lisa": (45.0, None), "constrained-sft": (50.7, None),
                     "safelora": (52.1, None), "nlsr": (20.4, 95.2)},
    ("sst2", 0.2): {"nonaligned": (77.2, 94.8), "attacked": (72.9, 95.1), "vlguard-mix": (66.6, None),
                    "vaccine": (72.5, None), "lisa": (56.3, None), "constrained-sft": (58.2, None),
                    "safelora": (59.0, None), "nlsr": (30.5, 95.5)},
    ("ag_news", 0.05): {"attacked": (55.7, 88.8), "safelora": (48.5, 75.7), "nlsr": (19.7, 87.8)},
    ("gsm8k", 0.05): {"attacked": (53.2, 51.0), "safelora": (45.0, 27.2), "nlsr": (15.4, 55.6)},
}


@dataclass
class Setting:
    """One run: its attack and evaluation settings and its per-model results."""

    source: Path
    task: str
    p: float
    n: int
    eval_sizes: dict[str, int]
    rows: dict[str, dict]

    @property
    def title(self) -> str:
        return f"{self.task} p={self.p:g}"


def load_setting(path: str | Path) -> Setting:
    """Read a finished run folder (``runs/<name>``) or an exported one (``results/<name>``)."""
    path = Path(path)

    def read(file: Path):
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise NlsrError(f"'{file}' is missing; is '{path}' a complete run folder or export?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise NlsrError(f"'{file}' is not valid JSON ({err}); rerun the report stage or export the "
                            "run again") from err

    if (path / "report" / "results.json").exists():
        results = read(path / "report" / "results.json")
        manifests = {p.parent.name: p for p in sorted(path.glob("data*/manifest.json"))}
        data = read(manifests[_attack_data_stage(list(manifests), path)])
    elif (path / "results.json").exists() and (path / "manifests.json").exists():
        results = read(path / "results.json")
        every = read(path / "manifests.json")
        data = every[_attack_data_stage(list(every), path)]
    else:
        raise NlsrError(f"'{path}' is neither a finished run folder (report/results.json) nor an "
                        "`nlsr export` of one (results.json + manifests.json); finish the run or export it")
    attack = data["params"]["attack"]
    sizes = results[0]["metrics"]["n"] if results else {}
    return Setting(path, attack["task"], float(attack["p"]), int(attack["n"]), sizes,
                   {row["model"]: row for row in results})


def _attack_data_stage(stages: list[str], path: Path) -> str:
    """The stage whose parameters hold the attack settings: ``data-attack`` (first seed), or the
    single ``data`` stage of runs made before the per-seed layout."""
    for name in sorted(stages):
        if name.startswith("data-attack"):
            return name
    if "data" in stages:
        return "data"
    raise NlsrError(f"'{path}' has no data-attack stage manifest; finish the run or export it again")


def method_order(settings: list[Setting]) -> list[str]:
    labels = list(dict.fromkeys(label for s in settings for label in s.rows))
    known = [m for m in METHODS if m in labels]
    return known + [label for label in labels if label not in METHODS]


def hs_ranking(scores: dict[str, float]) -> list[str]:
    """Methods from lowest to highest HS (the safest first)."""
    return sorted(scores, key=lambda m: scores[m])


def _cell(row: dict | None, judge: str) -> str:
    if row is None:
        return "-"
    hs = row["metrics"]["hs"].get(judge)
    return f"{'-' if hs is None else f'{hs:.1f}'} / {row['metrics']['fa']:.1f}"


def _xstest_cell(row: dict | None) -> str:
    value = None if row is None else row["metrics"].get("xstest_refusal")
    return "-" if value is None else f"{value:.1f}"


def _paper_cell(setting: Setting, method: str) -> str:
    ref = PAPER.get((setting.task, setting.p), {}).get(method)
    if ref is None:
        return "-"
    return f"{ref[0]:.1f}" + ("" if ref[1] is None else f" / {ref[1]:.1f}")


def _table(header: list[str], methods: list[str], cells) -> str:
    """A markdown table: one row per method, ``cells(method)`` giving the cells after its name."""
    lines = ["| " + " | ".join(["method", *header]) + " |", "|" + "---|" * (len(header) + 1)]
    lines += ["| " + " | ".join([METHODS.get(m, m), *cells(m)]) + " |" for m in methods]
    return "\n".join(lines)


def comparison_markdown(settings: list[Setting], judges: list[str]) -> str:
    """The tables (one per judge), the over-refusal, the time per method, and the HS rankings."""
    methods = method_order(settings)
    parts = []
    for judge in judges:
        table = _table([f"{s.title}: {who}" for s in settings for who in ("ours", "paper")], methods,
                       lambda m, judge=judge: [c for s in settings
                                               for c in (_cell(s.rows.get(m), judge), _paper_cell(s, m))])
        parts.append(f"### HS judged by '{judge}' (%), FA (%)\n\n{table}")
    table = _table([s.title for s in settings], methods, lambda m: [_xstest_cell(s.rows.get(m)) for s in settings])
    parts.append("### Over-refusal: XSTest safe prompts refused (%, refusal matcher; the paper does not "
                 f"report it)\n\n{table}")
    table = _table([f"{s.title}: method / eval (s)" for s in settings], methods,
                   lambda m: [f"{s.rows[m]['seconds']:.0f} / {s.rows[m]['eval_seconds']:.0f}" if m in s.rows
                              else "-" for s in settings])
    parts.append("### Time per method (seconds; method = the stages that make its model, eval = its "
                 f"evaluation)\n\n{table}")
    parts.append("### HS rankings, safest first\n\n" + ranking_markdown(settings, judges))
    sizes = "; ".join(f"{s.title}: n = {s.n} fine-tuning rows, {s.eval_sizes.get('harmful')} harmful prompts, "
                      f"{s.eval_sizes.get('task')} task rows ({s.source})" for s in settings)
    return ("# NLSR against the baselines\n\nCells: harmful score HS % / fine-tuning accuracy FA %. "
            f"Evaluation sets: {sizes}.\n\n" + "\n\n".join(parts) + "\n")


def ranking_markdown(settings: list[Setting], judges: list[str]) -> str:
    lines = []
    for s in settings:
        paper = PAPER.get((s.task, s.p), {})
        for judge in judges:
            ours = {m: r["metrics"]["hs"][judge] for m, r in s.rows.items()
                    if m in paper and r["metrics"]["hs"].get(judge) is not None}
            if len(ours) < 2:
                continue
            ref = {m: paper[m][0] for m in ours}
            lines.append(f"- {s.title}, judge '{judge}': ours " + " < ".join(
                METHODS.get(m, m) for m in hs_ranking(ours)) + "; paper " + " < ".join(
                METHODS.get(m, m) for m in hs_ranking(ref)))
    return "\n".join(lines) if lines else "(no setting with the paper's numbers)"


def plot_hs_vs_fa(settings: list[Setting], judge: str, path: Path) -> None:
    """One panel per setting; each method one point, with the same colour and marker in every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = method_order(settings)
    cmap = plt.get_cmap("tab20")
    style = {m: (cmap(i % 20), "osD^v<>ph*"[i % 10]) for i, m in enumerate(methods)}
    ncols = min(len(settings), 2)
    nrows = math.ceil(len(settings) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols + 2.8, 4.2 * nrows), squeeze=False,
                             layout="constrained")
    panels = list(axes.flat)
    for ax in panels[len(settings):]:
        ax.set_visible(False)
    for ax, s in zip(panels, settings, strict=False):        # spare panels were hidden above
        for m in methods:
            row = s.rows.get(m)
            if row is None or row["metrics"]["hs"].get(judge) is None:
                continue
            colour, marker = style[m]
            ax.scatter(row["metrics"]["fa"], row["metrics"]["hs"][judge], color=colour, marker=marker, s=60,
                       label=METHODS.get(m, m))
        ax.set_ylim(bottom=0)
        ax.set_title(s.title)
        ax.set_xlabel(f"FA on {s.task} (%)")
        ax.set_ylabel(f"HS, judge '{judge}' (%)")
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in panels:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle("Harmful score against fine-tuning accuracy (lower right is better)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def hs_against_p(settings: list[Setting], judge: str) -> dict[str, dict[str, list[dict]]]:
    """Per task, per method: the test HS (mean and 95% interval) at each poison ratio p, in order of p.

    The benign control of a run (``attacked-p0``) is the undefended model's point at p = 0."""
    curves: dict[str, dict[str, list[dict]]] = {}
    for s in settings:
        for label, row in s.rows.items():
            method, p = ("attacked", 0.0) if label == "attacked-p0" else (label, s.p)
            estimate = ((row.get("scores") or {}).get("hs", {}).get(judge) or {}).get("test")
            if estimate is None:
                continue
            points = curves.setdefault(s.task, {}).setdefault(method, [])
            if all(point["p"] != p for point in points):
                points.append({"p": p, "mean": estimate["mean"], "ci95": estimate["ci95"],
                               "seeds": row.get("seeds"), "source": str(s.source)})
    for methods in curves.values():
        for points in methods.values():
            points.sort(key=lambda point: point["p"])
    return {task: methods for task, methods in curves.items()
            if len({point["p"] for points in methods.values() for point in points}) > 1}


def plot_hs_vs_p(curves: dict[str, dict[str, list[dict]]], judge: str, path: Path,
                 methods: tuple[str, ...] = ("attacked", "nlsr", "safelora")) -> None:
    """HS against the share p of harmful rows, one panel per task, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4.0), squeeze=False, layout="constrained")
    for ax, (task, per_method) in zip(axes.flat, curves.items(), strict=True):
        for method in [m for m in methods if m in per_method] or list(per_method):
            points = per_method[method]
            x = [pt["p"] for pt in points]
            y = [pt["mean"] for pt in points]
            err = [[pt["mean"] - pt["ci95"][0] for pt in points], [pt["ci95"][1] - pt["mean"] for pt in points]]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=METHODS.get(method, method))
        ax.set_title(task)
        ax.set_xlabel("share p of harmful rows in the fine-tuning set")
        ax.set_ylabel(f"HS (test), judge '{judge}' (%)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Harmful score against the poison ratio p (95% intervals)")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def is_comparison_output(name: str) -> bool:
    """Whether ``name`` is a file :func:`write_comparison` writes (``--force`` replaces only those)."""
    return name in ("comparison.md", "comparison.json") or name.startswith(("hs_vs_fa_", "hs_vs_p_"))


def write_comparison(runs: list[str | Path], out: Path, judges: list[str] | None = None,
                     force: bool = False) -> list[Setting]:
    """Write ``comparison.md``, ``comparison.json`` and one ``hs_vs_fa_<judge>.png`` per judge to ``out``."""
    from nlsr.io import atomic_dir, write_json

    if not runs:
        raise NlsrError("name at least one run folder to compare")
    settings = [load_setting(r) for r in runs]
    available = sorted({j for s in settings for r in s.rows.values() for j in r["metrics"]["hs"]})
    judges = judges or available
    unknown = [j for j in judges if j not in available]
    if unknown:
        raise NlsrError(f"judges {unknown} are not in these runs' results; they have {available}")
    with atomic_dir(out, force=force, owned=is_comparison_output) as tmp:
        (tmp / "comparison.md").write_text(comparison_markdown(settings, judges))
        write_json(tmp / "comparison.json",
                   [{"source": str(s.source), "task": s.task, "p": s.p, "n": s.n, "eval_sizes": s.eval_sizes,
                     "rows": s.rows, "paper": {m: list(v) for m, v in PAPER.get((s.task, s.p), {}).items()}}
                    for s in settings])
        for judge in judges:
            plot_hs_vs_fa(settings, judge, tmp / f"hs_vs_fa_{judge}.png")
            curves = hs_against_p(settings, judge)
            if curves:          # several poison ratios of one task: HS against p
                write_json(tmp / f"hs_vs_p_{judge}.json", curves)
                plot_hs_vs_p(curves, judge, tmp / f"hs_vs_p_{judge}.png")
    return settings
