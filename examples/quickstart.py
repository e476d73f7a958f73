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
import time
from pathlib import Path

import nlsr
from nlsr.experiment.plots import plot_similarity_by_layer
from nlsr.paths import data_dir
from nlsr.weights.models import resolve_model_path
from nlsr.weights.synthetic import module_shapes, perturbed, random_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="offline data folder (default: $NLSR_DATA_DIR or shared/data)")
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    parser.add_argument("--rows", type=int, default=64, help="calibration rows")
    args = parser.parse_args()
    calibration = data_dir(args.data_dir) / "beavertails_derived_spard" / "train_beaverTails_train.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model, tokenizer = nlsr.load_model("smollm2"), nlsr.load_tokenizer("smollm2")
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f}s")
    aligned = random_adapter(module_shapes(model), rank=8, alpha=16,
                             base=resolve_model_path("smollm2"), a_std=0.04, b_std=0.01)
    finetuned = perturbed(aligned, noise=0.5, relative=True)

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
