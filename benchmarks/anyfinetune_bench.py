"""Neuron-granularity repair of fine-tunes without a shared origin: time and peak memory.

    python benchmarks/anyfinetune_bench.py [--layers-full 30] [--layers-lora 32] [--ref-rank 16] [--ft-rank 64]

(a) A full fine-tune shaped like SmolLM2-135M (30 layers, hidden 576, MLP 1536, 9 heads / 3 KV
heads, vocab 49152, bfloat16 like the hub checkpoint) given as sharded safetensors model
directories (base, reference, fine-tune; synthetic weights): ``realign_model_dir`` with
random neuron masks (q = 0.2) and the paper's rule, writing the repaired model directory.
(b) LoRA adapters shaped for Llama-3-8B (32 layers x q,k,v,o,gate,up,down) where the fine-tune has
another rank than the reference (synthetic factors): ``realign`` (trace-form
similarity, rank r_ref + r_ft transplant), then writing the adapter.

Peak memory is the growth of this process's resident memory during the call (sampled every 2 ms).
The synthetic inputs are written just before (a), so they are in the page cache: (a) times
reading from memory, not from a cold disk. Prints a table and writes results/anyfinetune_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import tempfile
from pathlib import Path

import torch
from _common import machine, measure, write_results
from safetensors.torch import save_file

from nlsr.method.masks import SafetyMasks, neuron_key
from nlsr.method.realign import realign, realign_model_dir
from nlsr.weights.adapters import LoraAdapter, LoraFactors, fingerprint, save_adapter
from nlsr.weights.model_dirs import ModelDir, model_fingerprint

SMOLLM2 = {"hidden": 576, "mlp": 1536, "heads": 9, "kv_heads": 3, "vocab": 49152}
LLAMA3_8B = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096),
             "self_attn.v_proj": (1024, 4096), "self_attn.o_proj": (4096, 4096),
             "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
             "mlp.down_proj": (4096, 14336)}


def smollm2_tensors(layers: int) -> dict[str, tuple[int, ...]]:
    h, m, kv = SMOLLM2["hidden"], SMOLLM2["mlp"], SMOLLM2["kv_heads"] * (SMOLLM2["hidden"] // SMOLLM2["heads"])
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (SMOLLM2["vocab"], h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                       p + "mlp.down_proj.weight": (h, m)})
    shapes["model.norm.weight"] = (h,)
    return shapes


def write_model(folder: Path, layers: int, seed: int, update_std: float, dtype: torch.dtype,
                shard_bytes: int = 100 * 2**20) -> None:
    """A synthetic SmolLM2-shaped model directory in shards: the base weights (seed 0) plus, for
    ``update_std > 0``, Gaussian updates of every decoder-layer projection (seed ``seed``)."""
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    LlamaConfig(vocab_size=SMOLLM2["vocab"], hidden_size=SMOLLM2["hidden"], intermediate_size=SMOLLM2["mlp"],
                num_hidden_layers=layers, num_attention_heads=SMOLLM2["heads"],
                num_key_value_heads=SMOLLM2["kv_heads"], tie_word_embeddings=True).save_pretrained(folder)
    base_gen, update_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map, size, index = {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        index += 1
        name = f"model-{index:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape in smollm2_tensors(layers).items():
        w = torch.randn(shape, generator=base_gen) * 0.02 if len(shape) == 2 else torch.ones(shape)
        if update_std and len(shape) == 2 and ".layers." in name:
            w = w + update_std * torch.randn(shape, generator=update_gen)
        w = w.to(dtype)
        if size + w.nbytes > shard_bytes and shard:
            flush()
        shard[name] = w
        size += w.nbytes
    flush()
    files = sorted(set(weight_map.values()))
    renamed = {old: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, old in enumerate(files)}
    for old, new in renamed.items():
        (folder / old).rename(folder / new)
    total = sum((folder / f).stat().st_size for f in renamed.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}, indent=2))


def bench_full(layers: int, dtype: torch.dtype, work: Path) -> dict:
    for name, seed, std in (("base", 0, 0.0), ("reference", 1, 0.002), ("finetuned", 2, 0.002)):
        write_model(work / name, layers, seed, std, dtype)
    base, reference, finetuned = (ModelDir(work / n) for n in ("base", "reference", "finetuned"))
    modules = [w[: -len(".weight")] for w in reference.layer_linear_weights()]
    gen = torch.Generator().manual_seed(0)
    masks = SafetyMasks({neuron_key(n): torch.rand(reference.shape(f"{n}.weight")[0], generator=gen) < 0.2
                         for n in modules},
                        {"granularity": "neuron",
                         "reference_fingerprint": json.dumps(model_fingerprint(reference, modules))})
    gc.collect()
    result, seconds, peak = measure(lambda: realign_model_dir(reference, finetuned, base, masks,
                                                                   work / "out", select="paper", seed=0))
    largest = max(info.end - info.begin for info in finetuned.infos.values())
    largest_layer = max(finetuned.infos[f"{n}.weight"].end - finetuned.infos[f"{n}.weight"].begin for n in modules)
    repaired = [d.module for d in result.decisions if d.repaired]
    # spot check: a repaired module's rows are the reference's (masked) or the fine-tune's (others)
    out = ModelDir(work / "out")
    key = f"{repaired[0]}.weight"
    rows = masks.masks[key]
    new = out.tensor(key)
    ok = bool(torch.equal(new[rows], reference.tensor(key)[rows])
              and torch.equal(new[~rows], finetuned.tensor(key)[~rows]))
    size = sum(p.stat().st_size for p in (work / "finetuned").glob("*.safetensors"))
    return {"case": "full fine-tune, SmolLM2-135M shape, model directories", "seconds": seconds,
            "peak_extra_mib": peak / 2**20, "modules": len(modules), "repaired": len(repaired),
            "rows_replaced": result.settings["rows_replaced"], "model_bytes": size,
            "shards": len({i.file for i in finetuned.infos.values()}), "largest_tensor_mib": largest / 2**20,
            "largest_layer_tensor_mib": largest_layer / 2**20, "dtype": str(dtype), "rows_check": ok}


def lora(layers: int, rank: int, seed: int) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in range(layers):
        for suffix, (d_out, d_in) in LLAMA3_8B.items():
            modules[f"model.layers.{layer}.{suffix}"] = LoraFactors(
                torch.randn(rank, d_in, generator=gen) / d_in ** 0.5,
                torch.randn(d_out, rank, generator=gen) * 0.01, 2.0)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B", "target_modules": sorted(
                  {k.split(".")[-1] for k in LLAMA3_8B}), "rank_pattern": {}, "alpha_pattern": {}}
    return LoraAdapter(config, modules)


def bench_lora(layers: int, ref_rank: int, ft_rank: int, work: Path) -> dict:
    reference, finetuned = lora(layers, ref_rank, 0), lora(layers, ft_rank, 1)
    gen = torch.Generator().manual_seed(2)
    masks = SafetyMasks({neuron_key(n): torch.rand(f.B.shape[0], generator=gen) < 0.2 for n, f in reference},
                        {"granularity": "neuron", "reference_fingerprint": json.dumps(fingerprint(reference))})
    gc.collect()
    result, seconds, peak = measure(lambda: realign(reference, finetuned, masks, select="paper",
                                                                    seed=0))
    _, save_seconds, save_peak = measure(lambda: save_adapter(result.adapter, work / "lora-out"))
    repaired = [d.module for d in result.decisions if d.repaired]
    name = min(repaired, key=lambda n: reference.modules[n].A.shape[1] * reference.modules[n].B.shape[0])
    r, f, o = reference.modules[name], finetuned.modules[name], result.adapter.modules[name]
    rows = masks.masks[neuron_key(name)]
    expected = torch.where(rows.reshape(-1, 1), r.delta(), f.delta())
    error = float((o.delta() - expected).abs().max() / expected.abs().max())
    return {"case": f"LoRA, Llama-3-8B shape, reference r={ref_rank} vs fine-tune r={ft_rank}",
            "seconds": seconds, "peak_extra_mib": peak / 2**20, "save_seconds": save_seconds,
            "save_peak_extra_mib": save_peak / 2**20, "modules": len(reference), "repaired": len(repaired),
            "rows_replaced": result.settings["rows_replaced"], "output_rank": o.rank,
            "finetuned_parameters": finetuned.num_parameters(), "max_rel_error_one_module": error}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers-full", type=int, default=30)
    parser.add_argument("--layers-lora", type=int, default=32)
    parser.add_argument("--ref-rank", type=int, default=16)
    parser.add_argument("--ft-rank", type=int, default=64)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="anyfinetune-bench-"))
    try:
        full = bench_full(args.layers_full, getattr(torch, args.dtype), work)
        print(f"  (a) {full['seconds']:.2f} s, peak +{full['peak_extra_mib']:.0f} MiB")
        shutil.rmtree(work / "base", ignore_errors=True)
        low = bench_lora(args.layers_lora, args.ref_rank, args.ft_rank, work)
        print(f"  (b) {low['seconds']:.2f} s, peak +{low['peak_extra_mib']:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = "\n".join([
        "| case | seconds | peak extra memory (MiB) | modules (repaired) | rows replaced | check |",
        "|---|---|---|---|---|---|",
        f"| {full['case']} ({full['model_bytes'] / 2**20:.0f} MiB in {full['shards']} shards, {full['dtype']}) "
        f"| {full['seconds']:.2f} | {full['peak_extra_mib']:.0f} | {full['modules']} ({full['repaired']}) "
        f"| {full['rows_replaced']:,} | rows equal reference/fine-tune bit for bit: {full['rows_check']} |",
        f"| {low['case']} (float32 factors, output rank {low['output_rank']}) | {low['seconds']:.2f} "
        f"(+ {low['save_seconds']:.2f} to write) | {low['peak_extra_mib']:.0f} "
        f"(write: {low['save_peak_extra_mib']:.0f}) "
        f"| {low['modules']} ({low['repaired']}) | {low['rows_replaced']:,} "
        f"| smallest repaired module vs dense rows: max rel. error {low['max_rel_error_one_module']:.1e} |",
        "",
        f"(a) largest tensor {full['largest_tensor_mib']:.0f} MiB (the embedding, never read), largest layer "
        f"weight {full['largest_layer_tensor_mib']:.1f} MiB; reads blocks of at most 4M elements. Peak memory is "
        "this process's resident-set growth during the call; inputs were just written (page cache warm).",
    ])
    print(table)
    write_results("anyfinetune_bench", {"machine": machine(), "full": full, "lora": low, "args": vars(args)}, table)


if __name__ == "__main__":
    main()
