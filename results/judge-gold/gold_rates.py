"""Rates by the readers' gold labels next to the judges' rates, per model and split.

    python3 results/judge-gold/gold_rates.py results/judge-gold/labels-recipe24.jsonl [more label files]

For each ``model`` value of the label rows (``draw-stage`` writes ``<run>/<stage>/<split>`` there)
it prints, as % with 95% bootstrap intervals over the rows (:func:`nlsr.evaluation.stats.estimate`): the gold
harmful and not-refused rates, the trained judge's harmful rate and the not-refused rates of the
refusal matcher and of ``refusal-v2`` on the same rows; then each refusal detector's Cohen's kappa
against the gold ``refusal`` labels, per group and over all rows whose split is ``test`` (the
``refusal-v2`` phrases were chosen on the ``validation`` rows, and the last table shows that choice:
kappa on the validation rows per deflection window, and with "not allowed" added). This is how far the judged HS and
refusal rates of a report are from what a reader finds, for the models whose answers were labelled.
"""

from __future__ import annotations

import sys
from collections import defaultdict

from nlsr.evaluation.judges.base import agreement_metrics, make_judge
from nlsr.evaluation.judges.refusal import DEFLECTION_PHRASES, is_refusal
from nlsr.evaluation.scoring import read_gold
from nlsr.evaluation.stats import estimate


def main(paths: list[str]) -> None:
    rows = [row for path in paths for row in read_gold(path)]
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    columns = {
        "gold harmful": [r["harmful"] for r in rows],
        "trained judge harmful": make_judge("trained")(prompts, responses),
        "gold not refused": [not r["refusal"] for r in rows],
        "matcher not refused": make_judge("refusal")(prompts, responses),
        "refusal-v2 not refused": make_judge("refusal-v2")(prompts, responses),
    }
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row.get("model", "all")].append(i)
    print("| model / split | n | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for name, index in sorted(groups.items()):
        cells = []
        for flags in columns.values():
            e = estimate([[float(flags[i]) for i in index]])
            cells.append(f"{e.mean:.1f} [{e.low:.1f}, {e.high:.1f}]")
        print(f"| {name} | {len(index)} | " + " | ".join(cells) + " |")
    test = [i for i, row in enumerate(rows) if row.get("model", "test").endswith("test")]
    print("\n| rows | n | refusal matcher kappa | refusal-v2 kappa |\n|---|---|---|---|")
    for name, index in [*sorted(groups.items()), ("all test rows", test)]:
        refused = [not columns["gold not refused"][i] for i in index]
        kappas = [agreement_metrics([not columns[c][i] for i in index], refused)["cohen_kappa"]
                  for c in ("matcher not refused", "refusal-v2 not refused")]
        print(f"| {name} | {len(index)} | {kappas[0]:.3f} | {kappas[1]:.3f} |")
    validation = [i for i, row in enumerate(rows) if row.get("model", "").endswith("validation")]
    refused = [rows[i]["refusal"] for i in validation]
    print("\n| refusal-v2 on the validation rows | n | kappa |\n|---|---|---|")
    for label, phrases, window in [*[(f"window {w}", DEFLECTION_PHRASES, w) for w in (60, 100, 150, 250, None)],
                                   ('window 100, + "not allowed"', (*DEFLECTION_PHRASES, "not allowed"), 100)]:
        flags = [is_refusal(responses[i], deflections=True, deflection_phrases=phrases, deflection_window=window)
                 for i in validation]
        print(f"| {label} | {len(validation)} | {agreement_metrics(flags, refused)['cohen_kappa']:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
