"""Where a classification task's FA goes: the predicted labels and the errors by gold label.

    python3 results/cpu-bench/label_shift.py runs/cpu-bench attacked nlsr-q0.1 nlsr nlsr-q0.4

For each model and seed (``evaluate-<model>-s<seed>`` folders of the run) on the task's test rows:
how often each label is predicted (the first label word in the answer; "other" when none), and how
many rows of each gold label are wrong. A repair that shifts the label prior shows as one label
predicted more and the errors piling up on the other; a repair that damages the task shows as
errors on every label or answers outside the label set.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

from nlsr.data import get_task
from nlsr.data.tasks import first_label


def main(run: str, models: list[str]) -> None:
    run_dir = Path(run)
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    task = get_task(manifest["params"]["task"])
    if not task.labels:
        raise SystemExit(f"{task.name} is not a classification task")
    gold = [json.loads(line) for line in (run_dir / "data" / "task_eval.jsonl").read_text().splitlines()]
    test = [i for i, row in enumerate(gold) if row.get("split", "test") == "test"]
    counts = Counter(gold[i]["label"] for i in test)
    print(f"{task.name}, {len(test)} test rows, gold: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    labels = [*task.labels, "other"]
    print("| model | seed | " + " | ".join(f"predicted {label}" for label in labels) + " | "
          + " | ".join(f"wrong on gold {label}" for label in task.labels) + " |")
    print("|---|---|" + "---|" * (len(labels) + len(task.labels)))
    for model in models:
        for folder in sorted(run_dir.glob(f"evaluate-{model}-s*")):
            if not re.fullmatch(rf"evaluate-{re.escape(model)}-s\d+", folder.name):
                continue
            rows = [json.loads(line) for line in (folder / "generations.jsonl").read_text().splitlines()]
            answers = [r["output"] for r in rows if r["set"] == "task"]
            guess = {i: first_label(answers[i], task.labels) or "other" for i in test}
            made = Counter(guess.values())
            wrong = Counter(gold[i]["label"] for i in test if guess[i].lower() != gold[i]["label"].lower())
            print(f"| {model} | {folder.name.rsplit('-s', 1)[1]} | " + " | ".join(str(made[label]) for label in labels)
                  + " | " + " | ".join(str(wrong[label]) for label in task.labels) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2:])
