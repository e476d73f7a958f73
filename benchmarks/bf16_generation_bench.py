"""Greedy generation with bf16 weights on the CPU: weights flagged ``requires_grad`` or not.

    python benchmarks/bf16_generation_bench.py [--rows 96] [--batch-size 48]

PEFT's merge leaves every weight with ``requires_grad=False``; the evaluate stage flags them
trainable again after casting (``nlsr.experiment.stages.evaluate.cast_parameters``; generation runs under
``torch.inference_mode`` either way). This measures why: the embedded SmolLM2 in bfloat16
generates 8 tokens for the first SST-2 validation prompts (the evaluate stage's template and
batching), once per flag, alternating, best of ``--repeats``. Writes ``results/bf16_generation_bench.{json,md}``.
"""

from __future__ import annotations

import argparse

import torch
from _common import machine, measure, write_results

from nlsr.data.registry import load_records
from nlsr.data.templates import model_prompt
from nlsr.evaluation.generation import generate
from nlsr.weights.models import load_model, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    tokenizer = load_tokenizer("smollm2")
    model = load_model("smollm2", precision="bfloat16")
    prompts = [model_prompt(r["instruction"], "alpaca", tokenizer, r.get("input", ""))
               for r in load_records("sst2_eval", limit=args.rows)]
    runs: dict[str, list[tuple[float, int]]] = {"True": [], "False": []}
    outputs = {}
    for _ in range(args.repeats):
        for flag in runs:
            model.requires_grad_(flag == "True")
            outputs[flag], seconds, extra = measure(
                lambda: generate(model, tokenizer, prompts, 8, batch_size=args.batch_size))
            runs[flag].append((seconds, extra))
    assert outputs["True"] == outputs["False"], "the flag changed the generated text"
    rows = ["| weights `requires_grad` | seconds (best) | peak extra memory (MiB, largest run) |", "|---|---|---|"]
    for flag, values in runs.items():
        seconds, extra = min(s for s, _ in values), max(m for _, m in values)
        rows.append(f"| {flag} | {seconds:.2f} | {extra / 2**20:,.0f} |")
        print(rows[-1])
    table = "\n".join(rows) + (
        f"\n\nSmolLM2-135M-Instruct in bfloat16, {len(prompts)} SST-2 validation prompts (Alpaca template), "
        f"8 new tokens, batch {args.batch_size}, greedy; each setting ran {args.repeats} times, alternating "
        "(all runs in the JSON). Both settings generated identical text.")
    write_results("bf16_generation_bench", {"machine": machine(), "args": vars(args),
                                            "runs": runs}, table)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
