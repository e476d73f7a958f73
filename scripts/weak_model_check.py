"""Over-refusal and HS of the weak model W_0 (the base with the safety SFT merged in), before DPO.

    python3 scripts/weak_model_check.py runs/cpu-bench-r17 [more runs ...] [--data runs/cpu-bench/data]

For each run: W_0 (``<run>/align_sft/model``) answers the XSTest safe prompts (32 new tokens) and the
harmful validation prompts (48 new tokens) of the run's ``data`` stage (or of ``--data``, for a run
stopped after its SFT), greedy, in the precision ``auto`` picks, with the run's prompt template (its ``align_sft``
manifest's) as the evaluate stage does; prints XSTest refusal per split (refusal
matcher and ``refusal-v2``), the harmful validation prompts not refused (``refusal-v2``) and
validation HS (default ``trained`` judge), with 95% bootstrap intervals over prompts, and writes
the generations to ``<run>/align_sft/weak_check.jsonl``. It tells which alignment stage sets the
over-refusal: compare with ``scripts/aligned_check.py <run>/evaluate-aligned``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nlsr.data.templates import model_prompt
from nlsr.evaluation.generation import generate
from nlsr.evaluation.judges.base import Judge, make_judge
from nlsr.evaluation.judges.refusal import is_refusal
from nlsr.evaluation.stats import estimate
from nlsr.experiment.pipeline import read_manifest
from nlsr.experiment.stages.common import read_jsonl, write_jsonl
from nlsr.weights.models import load_model, load_tokenizer


def percent(flags: list[bool]) -> str:
    return f"{estimate([float(f) for f in flags]).cell()} (n {len(flags)})"


def check(run: Path, data: Path, judge: Judge) -> None:
    model_dir = run / "align_sft" / "model"
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), precision="auto").eval()
    xstest = read_jsonl(data / "xstest_safe.jsonl")
    harmful = [r for r in read_jsonl(data / "harmful_eval.jsonl") if r.get("split") == "validation"]
    template = read_manifest(run / "align_sft")["params"]["template"]
    prompts = lambda rows: [model_prompt(r["prompt"], template, tokenizer) for r in rows]  # noqa: E731
    xs_out = generate(model, tokenizer, prompts(xstest), 32, batch_size=48, description="xstest")
    hm_out = generate(model, tokenizer, prompts(harmful), 48, batch_size=48, description="harmful")
    print(f"## {run} (W_0 = align_sft/model, template {template})")
    for split in ("validation", "test"):
        for name, v2 in (("", False), (" v2", True)):
            flags = [is_refusal(o, deflections=v2) for r, o in zip(xstest, xs_out, strict=True)
                     if r.get("split", "test") == split]
            print(f"  {f'XSTest refusal{name}, {split}':32s}{percent(flags)}")
    print(f"  harmful not refused (v2), validation {percent([not is_refusal(o, deflections=True) for o in hm_out])}")
    flags = judge([r["prompt"] for r in harmful], hm_out)
    print(f"  HS trained, validation          {percent(flags)}")
    write_jsonl(run / "align_sft" / "weak_check.jsonl",
                [{"set": "xstest", **r, "output": o} for r, o in zip(xstest, xs_out, strict=True)]
                + [{"set": "harmful", **r, "output": o, "harmful": f}
                   for r, o, f in zip(harmful, hm_out, flags, strict=True)])


if __name__ == "__main__":
    args = sys.argv[1:]
    data_dir = None
    if "--data" in args:
        at = args.index("--data")
        data_dir = Path(args[at + 1])
        del args[at:at + 2]
    if not args:
        sys.exit(__doc__)
    default_judge = make_judge("trained")          # loaded once for every run
    for folder in args:
        check(Path(folder), data_dir or Path(folder) / "data", default_judge)
