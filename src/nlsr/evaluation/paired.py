"""Paired comparison of ``nlsr evaluate`` outputs (e.g. before and after a repair): the same prompts,
so each difference is taken prompt by prompt, with a 95% bootstrap interval."""

from __future__ import annotations

import json
from pathlib import Path

from nlsr.errors import NlsrError

SUMMARY = "summary.json"
GENERATIONS = "generations.jsonl"
KIND = "nlsr-evaluation"


def is_evaluation(folder: Path) -> bool:
    """True for a folder written by ``nlsr evaluate``."""
    try:
        return json.loads((folder / SUMMARY).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def _rows(folder: Path) -> dict[tuple[str, str], dict]:
    rows: dict[tuple[str, str], dict] = {}
    with (folder / GENERATIONS).open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            key = (row["set"], row["prompt"] + "\x00" + row.get("input", ""))
            rows.setdefault(key, row)
    return rows


METRICS = (("harmful score", "prompts", "harmful"), ("refusal rate", "prompts", "refused"),
           ("XSTest over-refusal", "xstest", "refused"), ("task accuracy", "task:", "correct"))


def compare_evaluations(folders: list[Path]) -> dict:
    """Each folder after the first against the first: per metric both means and the paired
    difference (points, 95% interval) over the prompts both evaluated.

    Raises:
        NlsrError: fewer than two folders, a folder not written by ``nlsr evaluate``, or two
            evaluations that share no prompt.
    """
    from nlsr.evaluation.stats import difference, estimate

    if len(folders) < 2:
        raise NlsrError("compare needs at least two evaluation folders (the first is the baseline)")
    for folder in folders:
        if not is_evaluation(folder):
            raise NlsrError(f"'{folder}' is not an output of `nlsr evaluate` (no {SUMMARY} of that kind); "
                            "compare evaluation folders with each other, or run folders with each other")
    base = _rows(folders[0])
    out = {"baseline": str(folders[0]), "comparisons": []}
    for folder in folders[1:]:
        other = _rows(folder)
        entry = {"folder": str(folder), "metrics": {}}
        for label, prefix, key in METRICS:
            shared = [k for k in base if k[0].startswith(prefix) and k in other
                      and key in base[k] and key in other[k]]
            if not shared:
                continue
            a = [float(base[k][key]) for k in shared]
            b = [float(other[k][key]) for k in shared]
            entry["metrics"][label] = {"n": len(shared), "baseline": estimate(a).as_dict(),
                                       "other": estimate(b).as_dict(), "difference": difference(b, a).as_dict()}
        if not entry["metrics"]:
            raise NlsrError(f"'{folder}' and '{folders[0]}' share no prompt; evaluate both on the same prompt file")
        out["comparisons"].append(entry)
    return out


def comparison_table(result: dict) -> str:
    """Markdown: one row per folder and metric, baseline and other with intervals, the paired difference."""
    def cell(e: dict) -> str:
        return f"{e['mean']:.1f} [{e['ci95'][0]:.1f}, {e['ci95'][1]:.1f}]"

    lines = [f"baseline: {result['baseline']}", "",
             "| evaluation | metric | n | baseline % | this % | difference, points |", "|---|---|---|---|---|---|"]
    for entry in result["comparisons"]:
        for label, m in entry["metrics"].items():
            lines.append(f"| {entry['folder']} | {label} | {m['n']} | {cell(m['baseline'])} | {cell(m['other'])} | "
                         f"{cell(m['difference'])} |")
    return "\n".join(lines)
