"""Evaluate the weight average ("soup") of DPO adapters trained on the same W_0 with different seeds.

    python3 scripts/soup_check.py OUT_RUN RUN RUN [RUN ...] [--config configs/cpu-bench.yaml]

Every RUN must hold ``align_sft/model`` (W_0) and ``align_dpo/adapter``; the W_0 of the first RUN is
used, and the script stops if another RUN's W_0 differs (by the SFT adapter's bytes). The adapters are
averaged by :func:`nlsr.training.trainers.average_adapters` (what ``align.dpo.seeds`` does inside a run): the
merged delta is exactly the mean of the runs' ``B A`` products. Use it on finished runs that differ in
``align.dpo.seed`` only (or, to interpolate, in their DPO pairs). The soup is merged into W_0
and evaluated with the evaluate stage's code, the first RUN's ``data`` prompts and template; the generations go
to ``OUT_RUN/evaluate-aligned/`` (score them with ``scripts/aligned_check.py``), and the combined
adapter to ``OUT_RUN/align_dpo/adapter``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nlsr.experiment.config import load_config
from nlsr.experiment.pipeline import RunContext, read_manifest
from nlsr.experiment.stages.common import load_weak
from nlsr.experiment.stages.evaluate import cast_parameters, evaluate_model
from nlsr.io import file_sha256
from nlsr.training.trainers import average_adapters, merge_adapter


def main(argv: list[str]) -> None:
    config_path = "configs/cpu-bench.yaml"
    if "--config" in argv:
        at = argv.index("--config")
        config_path = argv[at + 1]
        del argv[at:at + 2]
    if len(argv) < 3:
        sys.exit(__doc__)
    out, runs = Path(argv[0]), [Path(a) for a in argv[1:]]
    digests = {file_sha256(r / "align_sft" / "adapter" / "adapter_model.safetensors") for r in runs}
    if len(digests) != 1:
        sys.exit("the runs do not share one SFT adapter (W_0): a soup of DPO adapters needs the same W_0")
    config = load_config(config_path, [f"template={read_manifest(runs[0] / 'align_dpo')['params']['template']}"])
    ctx = RunContext(config, out, runs[0] / "data")
    adapter = out / "align_dpo" / "adapter"
    weak = load_weak(ctx, runs[0] / "align_sft")
    average_adapters(weak, [r / "align_dpo" / "adapter" for r in runs], adapter)   # leaves ``weak`` unchanged
    model = merge_adapter(weak, adapter)
    cast_parameters(model, ctx.precision.torch_dtype)
    model.eval()
    folder = out / "evaluate-aligned"
    folder.mkdir(parents=True, exist_ok=True)
    (out / "soup_of.txt").write_text("".join(f"{r}\n" for r in runs))
    metrics = evaluate_model(ctx, model, folder, runs[0] / "data")
    print(f"{out}: matcher refused {metrics['harmful_refused']:.1f}% of harmful prompts, FA {metrics['fa']:.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
