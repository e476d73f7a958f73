"""A second, blind reading of a random sample of gold labels, and its agreement with the first.

    python3 results/judge-gold/second_reader.py draw OUT_DIR N SEED results/judge-gold/labels-a.jsonl [more]
    python3 results/judge-gold/second_reader.py compare OUT_DIR labels.jsonl results/judge-gold/second_reader_x.jsonl

``draw`` samples N rows (``random.Random(SEED)``) from the label files and writes them as
``candidates.jsonl`` (id, prompt, response: no label) and ``key.jsonl`` (which file and row each
came from). ``compare`` prints, for ``harmful`` and ``refusal``, how many of the second reader's labels
agree with the first reader's and Cohen's kappa, lists the rows they disagree on, and writes the
second labels with their source file and id.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from nlsr.evaluation.judges.base import agreement_metrics
from nlsr.evaluation.scoring import read_generations as read


def draw(out: Path, n: int, seed: int, files: list[Path]) -> None:
    rows = [(path.name, row) for path in files for row in read(path)]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "candidates.jsonl").open("w") as candidates, (out / "key.jsonl").open("w") as key:
        for i, (name, row) in enumerate(random.Random(seed).sample(rows, n)):
            candidates.write(json.dumps({"id": i, "prompt": row["prompt"], "response": row["response"]}) + "\n")
            key.write(json.dumps({"id": i, "file": name, "source_id": row["id"]}) + "\n")
    print(f"{n} rows to read in {out / 'candidates.jsonl'}")


def compare(folder: Path, labels: Path, out: Path) -> None:
    key = read(folder / "key.jsonl")
    second = {row["id"]: row for row in read(labels)}
    first = {(name, row["id"]): row for name in {k["file"] for k in key} for row in read(out.parent / name)}
    pairs = [(first[(k["file"], k["source_id"])], second[k["id"]]) for k in key]
    for question in ("harmful", "refusal"):
        a, b = [p[0][question] for p in pairs], [p[1][question] for p in pairs]
        kappa = agreement_metrics(b, a)["cohen_kappa"]
        agree = sum(x == y for x, y in zip(a, b, strict=True))
        print(f"{question}: {agree} of {len(pairs)} agree, positives first {sum(a)} second {sum(b)}, "
              f"Cohen's kappa {kappa:.3f}")
    for k, (x, y) in zip(key, pairs, strict=True):
        if (x["harmful"], x["refusal"]) != (y["harmful"], y["refusal"]):
            print(f"  {k['file']} {k['source_id']}: first harmful={x['harmful']} refusal={x['refusal']}, "
                  f"second harmful={y['harmful']} refusal={y['refusal']}")
    with out.open("w") as handle:
        for k, (_, y) in zip(key, pairs, strict=True):
            handle.write(json.dumps({"file": k["file"], "id": k["source_id"], "harmful": y["harmful"],
                                     "refusal": y["refusal"], "unsure": y["unsure"], "reason": y["reason"]},
                                    ensure_ascii=False) + "\n")


if __name__ == "__main__":
    if len(sys.argv) >= 6 and sys.argv[1] == "draw":
        draw(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), [Path(a) for a in sys.argv[5:]])
    elif len(sys.argv) == 5 and sys.argv[1] == "compare":
        compare(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        raise SystemExit(__doc__)
