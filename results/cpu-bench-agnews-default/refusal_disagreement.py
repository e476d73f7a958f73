"""Why HS by the refusal judge does not move while `refusal-v2` refusals rise: per seed, the share
of harmful test prompts each detector counts as refused, and a seeded sample of the responses that
only `refusal-v2` counts (its opening deflections), to read by hand.

    python results/cpu-bench-agnews-default/refusal_disagreement.py [RUN] [--sample 12]

RUN defaults to runs/cpu-bench-agnews (made by the command in this folder's README). The reading of
the sample is in `labels-v2-only.jsonl` beside this script.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from nlsr.evaluation.judges.refusal import is_refusal


def harmful_test(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["set"] == "harmful" and r["split"] == "test"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, default=Path("runs/cpu-bench-agnews"))
    parser.add_argument("--sample", type=int, default=12)
    args = parser.parse_args()
    print("| model | seed | prompts | refused (refusal judge) % | refused (refusal-v2) % |")
    print("|---|---|---|---|---|")
    for model in ("attacked", "factor-q0.2"):
        for seed in (0, 1, 2):
            rows = harmful_test(args.run / f"evaluate-{model}-s{seed}" / "generations.jsonl")
            v1 = sum(is_refusal(r["output"]) for r in rows)
            v2 = sum(is_refusal(r["output"], deflections=True) for r in rows)
            print(f"| {model} | {seed} | {len(rows)} | {100 * v1 / len(rows):.1f} | {100 * v2 / len(rows):.1f} |")
    rows = harmful_test(args.run / "evaluate-factor-q0.2-s0" / "generations.jsonl")
    only_v2 = [r for r in rows if is_refusal(r["output"], deflections=True) and not is_refusal(r["output"])]
    random.Random(0).shuffle(only_v2)
    print(f"\nfactor-q0.2, seed 0: {len(only_v2)} responses counted as refused by refusal-v2 only; a sample:")
    for r in only_v2[:args.sample]:
        print(json.dumps({"prompt": r["prompt"], "output": r["output"]}))


if __name__ == "__main__":
    main()
