"""NLSR's four steps on the embedded SmolLM2-135M-Instruct, through the Python API.

    python examples/quickstart.py [--data-dir ../shared/data] [--out runs/quickstart]

The adapters here are *synthetic* (a random LoRA as the "aligned" adapter and a noisy copy as the
"fine-tuned" one), so this shows the mechanics and the outputs, not a safety result: the real
experiment (alignment by SFT + DPO, the harmful fine-tuning attack, evaluation) is `nlsr run`.
The calibration pass is real: SmolLM2 reads safety rows from the SPARD BeaverTails file.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import nlsr
from nlsr.adapters import LoraAdapter, LoraFactors
from nlsr.models import resolve_model_path
from nlsr.plots import plot_similarity_by_layer


def synthetic_adapter(model, rank: int = 8, alpha: int = 16, seed: int = 0) -> LoraAdapter:
    """A LoRA on every attention and MLP projection with small random factors."""
    gen = torch.Generator().manual_seed(seed)
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    modules = {name: LoraFactors(A=torch.randn(rank, m.in_features, generator=gen) / m.in_features**0.5,
                                 B=torch.randn(m.out_features, rank, generator=gen) * 0.01,
                                 scale=alpha / rank)
               for name, m in model.named_modules()
               if name.rsplit(".", 1)[-1] in targets and isinstance(m, torch.nn.Linear)}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "lora_dropout": 0.0, "bias": "none", "target_modules": list(targets),
              "base_model_name_or_path": resolve_model_path("smollm2")}
    return LoraAdapter(config, modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("NLSR_DATA_DIR", "../shared/data")))
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--rows", type=int, default=64, help="calibration rows")
    args = parser.parse_args()
    calibration = args.data_dir / "beavertails_derived_spard" / "train_beaverTails_train.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model, tokenizer = nlsr.load_model("smollm2"), nlsr.load_tokenizer("smollm2")
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f}s")
    aligned = synthetic_adapter(model)
    gen = torch.Generator().manual_seed(1)
    finetuned = aligned.with_modules({
        n: LoraFactors(f.A + 0.02 * torch.randn(f.A.shape, generator=gen) / f.A.shape[1] ** 0.5,
                       f.B + 0.01 * torch.randn(f.B.shape, generator=gen), f.scale)
        for n, f in aligned})

    reference = nlsr.extrapolate(aligned, beta=0.9)                                    # step 1
    rows = nlsr.read_calibration_jsonl(calibration, limit=args.rows, response_field="safe")
    t0 = time.perf_counter()
    masks = nlsr.identify(model, reference, rows, tokenizer, rho=0.8, q=0.2)          # step 2
    print(f"identified masks over {masks.metadata['response_tokens']} response tokens in "
          f"{time.perf_counter() - t0:.1f}s (density {masks.density():.3f})")
    t0 = time.perf_counter()
    result = nlsr.realign(reference, finetuned, masks, select="paper", transplant="exact")  # 3-4
    print(f"realigned {len(result.decisions)} modules in {time.perf_counter() - t0:.2f}s")

    report = result.report()
    nlsr.save_adapter(result.adapter, args.out / "repaired", force=True, extra_files={
        "realign_report.json": (json.dumps(report, indent=2) + "\n").encode()})
    nlsr.save_masks(masks, args.out / "masks.safetensors", force=True)
    plot_similarity_by_layer(result.decisions, args.out / "repaired" / "similarity_by_layer.png")
    print(f"repaired {report['summary']['repaired']} of {report['summary']['modules']} modules; "
          f"adapter, report and plot in {args.out / 'repaired'}")


if __name__ == "__main__":
    main()
