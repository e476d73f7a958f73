"""Draw the generations to hand-label (results/judge-gold) and merge the labels back.

    python3 results/judge-gold/gold_candidates.py draw runs/cpu-bench OUT_DIR     # candidates.jsonl + key.jsonl
    python3 results/judge-gold/gold_candidates.py draw-stage OUT_DIR harmful runs/X/evaluate-aligned [more folders]
    python3 results/judge-gold/gold_candidates.py merge OUT_DIR labels_raw.jsonl results/judge-gold/labels.jsonl [RUN]

``draw`` takes, from each evaluated model of a run, 20 answers the refusal matcher flags and 28
it does not (all of them where a model has fewer than 10 non-refusals), on the harmful test
prompts, shuffles them with a fixed seed and writes them without the model name (``key.jsonl``
holds it): the reader labels without knowing which model answered or what any judge says.
``draw-stage`` takes every answer of one prompt set (``harmful`` or ``xstest``; validation and test)
of the given evaluate folders, shuffled together, without its folder or split (``key.jsonl`` holds
them): a check of the judges on these models' answers. ``merge`` joins the reader's labels
(``id, harmful, refusal, unsure, reason``) with the rows.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

MODELS = ("aligned", "attacked", "nlsr", "nlsr-reverse", "nlsr-factor", "nlsr-random-masks", "nonaligned",
          "safelora")
SEED = 20261129


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def draw(run: Path, out: Path) -> None:
    from nlsr.evaluation.judges.refusal import is_refusal

    rng = random.Random(SEED)
    items = []
    for model in MODELS:
        rows = [r for r in read(run / f"evaluate-{model}" / "generations.jsonl") if r["set"] == "harmful"]
        refused = [r for r in rows if is_refusal(r["output"])]
        answered = [r for r in rows if not is_refusal(r["output"])]
        pick = rng.sample(refused, 20) + (answered if len(answered) < 10 else rng.sample(answered, 28))
        items += [(model, r) for r in pick]
    rng.shuffle(items)
    write_candidates(items, out)


def draw_stage(out: Path, prompt_set: str, stages: list[Path]) -> None:
    items = [(f"{stage.parent.name}/{stage.name}/{r.get('split', 'test')}", r)
             for stage in stages for r in read(stage / "generations.jsonl") if r["set"] == prompt_set]
    random.Random(SEED).shuffle(items)
    write_candidates(items, out)


def write_candidates(items: list[tuple[str, dict]], out: Path) -> None:
    """Write the rows to label (``candidates.jsonl``) and, apart, which model answered (``key.jsonl``)."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "candidates.jsonl").open("w") as rows, (out / "key.jsonl").open("w") as key:
        for i, (model, r) in enumerate(items):
            rows.write(json.dumps({"id": i, "prompt": r["prompt"], "response": r["output"]}) + "\n")
            key.write(json.dumps({"id": i, "model": model}) + "\n")
    print(f"{len(items)} candidates in {out}")


def merge(folder: Path, labels: Path, out: Path, run: str = "runs/cpu-bench (commit 2a7192d, seed 0)") -> None:
    candidates = {r["id"]: r for r in read(folder / "candidates.jsonl")}
    models = {r["id"]: r["model"] for r in read(folder / "key.jsonl")}
    given = read(labels)
    if sorted(g["id"] for g in given) != sorted(candidates):
        raise SystemExit("the labels must cover every candidate id exactly once")
    with out.open("w") as handle:
        for g in sorted(given, key=lambda x: x["id"]):
            c = candidates[g["id"]]
            handle.write(json.dumps({"id": g["id"], "prompt": c["prompt"], "response": c["response"],
                                     "model": models[g["id"]], "run": run, "harmful": g["harmful"],
                                     "refusal": g["refusal"], "unsure": g["unsure"], "reason": g["reason"]},
                                    ensure_ascii=False) + "\n")
    print(f"{len(given)} labelled rows in {out}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "draw":
        draw(Path(sys.argv[2]), Path(sys.argv[3]))
    elif len(sys.argv) >= 5 and sys.argv[1] == "draw-stage":
        draw_stage(Path(sys.argv[2]), sys.argv[3], [Path(a) for a in sys.argv[4:]])
    elif len(sys.argv) in (5, 6) and sys.argv[1] == "merge":
        merge(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), *sys.argv[5:])
    else:
        raise SystemExit(__doc__)
