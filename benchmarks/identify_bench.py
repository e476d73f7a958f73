"""Safety-neuron identification on the embedded SmolLM2 versus a forward pass and stored-SVD.

    python benchmarks/identify_bench.py [--rows 128] [--rank 16] [--batch-size 16] [--repeats 3]

Over the same calibration tokens (SPARD BeaverTails prompts with their safe responses), times:
1. a plain forward pass of the base model (no adapter);
2. a forward pass of the base model with the reference LoRA attached (PEFT, no hooks);
3. ``nlsr.identify``: the streaming Gram pass (hooks on every lora_A, response tokens only)
   plus the r x r eigenproblems and masks;
4. the authors' approach: store every module's activations, then an SVD per factor.
Also reports peak memory growth and how many mask entries 3 and 4 agree on. 1-3 run ``--repeats``
times, interleaved, and the best time of each counts (on a shared machine single runs vary by tens
of percent); 4 runs once. The model loads in the precision :mod:`nlsr.precision` picks (``auto``:
bfloat16 on a CPU with native bf16) unless ``--precision`` says otherwise.
Writes ``results/identify_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch
from _common import machine, measure, write_results

from nlsr.method.calibration import make_batches, read_calibration_jsonl
from nlsr.method.identify import identify
from nlsr.method.projection import subspace_rank, top_fraction_mask
from nlsr.paths import data_dir
from nlsr.weights.adapters import attach_adapter, weight_key
from nlsr.weights.models import load_model, load_tokenizer, resolve_model_path
from nlsr.weights.synthetic import module_shapes, random_adapter


def stored_svd_masks(model, reference, batches, rho: float, q: float) -> dict[str, torch.Tensor]:
    """Keep every module's A-output activations over all response tokens, then SVD per factor."""
    peft_model = attach_adapter(model, reference, adapter_name="stored")
    modules = dict(peft_model.named_modules())
    stored = {name: [] for name in reference.modules}
    current = {}
    handles = [modules[f"base_model.model.{name}"].lora_A["stored"].register_forward_hook(
        lambda m, i, out, name=name: stored[name].append(out[current["mask"]].detach().clone()))
        for name in reference.modules]
    with torch.inference_mode():
        for batch in batches:
            current["mask"] = batch.response_mask
            peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    for handle in handles:
        handle.remove()
    peft_model.unload()
    masks = {}
    for name, f in reference:
        z_a = torch.cat(stored.pop(name)).T.double()          # r x N
        k = subspace_rank(f.rank, rho)
        u_a = torch.linalg.svd(z_a, full_matrices=False)[0][:, :k]
        u_b = torch.linalg.svd(f.B.double() @ z_a, full_matrices=False)[0][:, :k]  # d_out x N
        masks[weight_key(name, "A")] = top_fraction_mask(u_a @ (u_a.T @ f.A.double()), q)
        masks[weight_key(name, "B")] = top_fraction_mask(u_b @ (u_b.T @ f.B.double()), q)
    return masks


def forward_all(model, batches) -> None:
    with torch.inference_mode():
        for batch in batches:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of methods 1-3, interleaved; the best counts")
    parser.add_argument("--precision", default=None, help="auto (default), float32 or bfloat16")
    parser.add_argument("--skip-stored-svd", action="store_true",
                        help="leave out method 4 (slow: an SVD of every module's stored outputs)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="offline data folder (default: $NLSR_DATA_DIR or shared/data)")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2", precision=args.precision), load_tokenizer("smollm2")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    reference = random_adapter(module_shapes(model), rank=args.rank, alpha=2 * args.rank,
                               base=resolve_model_path("smollm2"), a_std=0.04, b_std=0.01)
    rows = read_calibration_jsonl(
        data_dir(args.data_dir) / "beavertails_derived_spard" / "train_beaverTails_train.jsonl",
        limit=args.rows, response_field="safe")
    batches = list(make_batches(tokenizer, rows, batch_size=args.batch_size,
                                max_length=args.max_length))
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    response = sum(int(b.response_mask.sum()) for b in batches)
    print(f"{len(rows)} rows, {tokens} tokens ({response} response), {len(reference)} modules, "
          f"rank {args.rank}")
    forward_all(model, batches[:1])                             # warm-up

    results: dict[str, dict] = {}

    def run(label: str, fn) -> object:
        gc.collect()
        out, seconds, mem = measure(fn)
        row = results.setdefault(label, {"method": label, "seconds_all": [], "peak_extra_mib": 0.0})
        row["seconds_all"].append(seconds)
        row["seconds"] = min(row["seconds_all"])
        row["peak_extra_mib"] = max(row["peak_extra_mib"], mem / 2**20)
        print(f"  {label}: {seconds:.2f}s, +{mem / 2**20:.0f} MiB")
        return out

    masks_each_run = []
    for _ in range(max(1, args.repeats)):
        run("plain forward, base model", lambda: forward_all(model, batches))
        peft_model = attach_adapter(model, reference)           # attaching is not timed
        run("plain forward, base + LoRA (PEFT)", lambda m=peft_model: forward_all(m, batches))
        peft_model.unload()
        masks_each_run.append(run("nlsr.identify (streaming Gram)", lambda: identify(
            model, reference, rows, tokenizer, batch_size=args.batch_size,
            max_length=args.max_length, progress=False)))
    ours = masks_each_run[-1]
    repeatable = all(m.masks.keys() == ours.masks.keys()
                     and all(torch.equal(m.masks[k], v) for k, v in ours.masks.items())
                     for m in masks_each_run)
    agree = total = 0
    if not args.skip_stored_svd:
        theirs = run("stored activations + SVD", lambda: stored_svd_masks(
            model, reference, batches, rho=0.8, q=0.2))
        agree = sum(int((ours.masks[k] == v).sum()) for k, v in theirs.items())
        total = sum(v.numel() for v in theirs.values())
    rows_out = list(results.values())
    base = rows_out[0]["seconds"]
    table = ["| method | seconds (best) | x plain forward | peak extra memory (MiB) |",
             "|---|---|---|---|"]
    for row in rows_out:
        row["ratio_to_plain_forward"] = row["seconds"] / base
        table.append(f"| {row['method']} | {row['seconds']:.2f} | {row['ratio_to_plain_forward']:.2f} | "
                     f"{row['peak_extra_mib']:.0f} |")
    text = ("\n".join(table) + f"\n\nSmolLM2-135M-Instruct ({dtype}, CPU), {len(rows)} SPARD calibration "
            f"rows, {tokens} tokens of which {response} response tokens, batch {args.batch_size}; "
            f"random reference LoRA of rank {args.rank} on all {len(reference)} q,k,v,o,gate,up,down "
            f"modules; rho 0.8, q 0.2. Mask entries on which the streaming and stored-SVD methods "
            + (f"agree: {agree}/{total} ({agree / total:.6f})." if total else "agree: not run.")
            + f" Methods 1-3 ran {args.repeats} times, "
            f"interleaved (best time shown; all in the JSON); identify gave "
            f"{'identical' if repeatable else 'DIFFERENT'} masks in every run."
            + (" Method 4 ran once." if total else "")
            + " identify runs the model body without the LM head, which the plain forward includes.")
    print(text)
    write_results("identify_bench", {"machine": machine(), "rows": len(rows), "tokens": tokens,
                                     "response_tokens": response, "rank": args.rank,
                                     "model_dtype": dtype, "repeats": args.repeats,
                                     "modules": len(reference), "results": rows_out,
                                     "identify_masks_repeatable": repeatable,
                                     "mask_agreement": agree / total if total else None}, text)


if __name__ == "__main__":
    main()
