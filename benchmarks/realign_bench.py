"""Realignment (similarity + selection + transplant) at Llama-3-8B adapter shapes.

    python benchmarks/realign_bench.py [--layers 32] [--rank 128] [--repeats 3]

Random adapters shaped like a LoRA on Llama-3-8B (32 layers x q,k,v,o,gate,up,down, r = 128)
go through ``nlsr.realign`` (trace-identity similarity, paper rule, exact rank-2r transplant) and
through a straightforward dense implementation that forms every masked ``d_out x d_in`` product,
side by side. Prints a table and writes ``results/realign_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys

import torch
from _common import machine, measure, write_results

from nlsr.method import SELECTION_RULES, TRANSPLANTS
from nlsr.method.masks import SafetyMasks
from nlsr.method.realign import realign
from nlsr.weights.adapters import LoraAdapter, LoraFactors, weight_key

LLAMA3_8B = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (1024, 4096),
             "self_attn.v_proj": (1024, 4096), "self_attn.o_proj": (4096, 4096),
             "mlp.gate_proj": (14336, 4096), "mlp.up_proj": (14336, 4096),
             "mlp.down_proj": (4096, 14336)}


def make_inputs(layers: int, rank: int, q: float = 0.2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ref, ft, masks = {}, {}, {}
    for layer in range(layers):
        for suffix, (d_out, d_in) in LLAMA3_8B.items():
            name = f"model.layers.{layer}.{suffix}"
            A = torch.randn(rank, d_in, generator=gen) / d_in ** 0.5
            B = torch.randn(d_out, rank, generator=gen) * 0.01
            ref[name] = LoraFactors(A, B, 2.0)
            ft[name] = LoraFactors(A + 0.3 * torch.randn(rank, d_in, generator=gen) / d_in ** 0.5,
                                   B + 0.005 * torch.randn(d_out, rank, generator=gen), 2.0)
            masks[weight_key(name, "A")] = torch.rand(rank, d_in, generator=gen) < q
            masks[weight_key(name, "B")] = torch.rand(d_out, rank, generator=gen) < q
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": "b"}
    return LoraAdapter(config, ref), LoraAdapter(dict(config), ft), SafetyMasks(masks)


def dense_realign(reference: LoraAdapter, finetuned: LoraAdapter, masks: SafetyMasks) -> dict:
    """The straightforward version: form both masked products of every module densely."""
    sims = []
    for name, e in reference:
        t = finetuned.modules[name]
        M_A, M_B = masks.pair(name)
        pe = (e.B * M_B) @ (e.A * M_A)
        pt = (t.B * M_B) @ (t.A * M_A)
        pe, pt = pe.flatten(), pt.flatten()
        sims.append(float(pe @ pt / (pe.norm() * pt.norm())))
        del pe, pt
    sims_t = torch.tensor(sims, dtype=torch.float64)
    _, repaired = SELECTION_RULES.get("paper")(sims_t, seed=0)
    out = {}
    for i, (name, e) in enumerate(reference):
        t = finetuned.modules[name]
        out[name] = (LoraFactors(*TRANSPLANTS.get("exact")(e.A, e.B, t.A, t.B, *masks.pair(name)), t.scale)
                     if repaired[i] else t)
    return {"similarity": sims_t, "modules": out}


def float64_similarity(reference: LoraAdapter, finetuned: LoraAdapter, masks: SafetyMasks,
                       name: str) -> float:
    """Ground truth for one module: the dense masked products in float64."""
    e, t = reference.modules[name], finetuned.modules[name]
    M_A, M_B = masks.pair(name)
    pe = ((e.B * M_B).double() @ (e.A * M_A).double()).flatten()
    pt = ((t.B * M_B).double() @ (t.A * M_A).double()).flatten()
    return float(pe @ pt / (pe.norm() * pt.norm()))


def run_one(implementation: str, layers: int, rank: int, repeats: int) -> dict:
    """Build the inputs and time one implementation (called in a fresh process)."""
    load = [round(x, 2) for x in os.getloadavg()]
    reference, finetuned, masks = make_inputs(layers, rank)
    gc.collect()
    if implementation == "nlsr":
        times, mems = [], []
        for _ in range(repeats):
            result, seconds, mem = measure(lambda: realign(reference, finetuned, masks, select="paper",
                                                           transplant="exact", seed=0))
            times.append(seconds)
            mems.append(mem)
            del result
            gc.collect()
        result = realign(reference, finetuned, masks, select="paper", transplant="exact", seed=0)
        sims = [d.similarity for d in result.decisions]
        repaired = sum(d.repaired for d in result.decisions)
    else:
        out, seconds, mem = measure(lambda: dense_realign(reference, finetuned, masks))
        times, mems = [seconds], [mem]
        sims = out["similarity"].tolist()
        repaired = None
    layer0 = [i for i, name in enumerate(reference.modules) if ".layers.0." in name]
    names = list(reference.modules)
    errors = [abs(sims[i] - float64_similarity(reference, finetuned, masks, names[i])) for i in layer0]
    return {"implementation": implementation, "seconds": min(times), "seconds_all": times,
            "peak_extra_gib": max(mems) / 2**30, "similarity": sims, "repaired": repaired,
            "layer0_max_error_vs_float64": max(errors), "modules": len(reference),
            "parameters": reference.num_parameters(), "loadavg_at_start": load}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--only", choices=["nlsr", "dense"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:       # child process: one implementation, result as JSON on stdout
        print(json.dumps(run_one(args.only, args.layers, args.rank, args.repeats)))
        return

    rows = []
    for implementation in ["nlsr"] + ([] if args.skip_dense else ["dense"]):
        # A fresh process per implementation, so that peak memory is not blurred by the other.
        child = subprocess.run([sys.executable, __file__, "--only", implementation, "--layers",
                                str(args.layers), "--rank", str(args.rank), "--repeats",
                                str(args.repeats)], capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"  {implementation}: {rows[-1]['seconds']:.2f}s")
    ours = rows[0]
    names = {"nlsr": "nlsr.realign (trace identities)", "dense": "dense products"}
    table = ["| implementation | seconds | peak extra memory (GiB) | speed-up "
             "| max error vs float64 (layer 0) |",
             "|---|---|---|---|---|"]
    for row in rows:
        row["speedup_vs_dense"] = rows[-1]["seconds"] / row["seconds"] if len(rows) > 1 else None
        speed = f"{row['speedup_vs_dense']:.1f}x" if row["speedup_vs_dense"] else "-"
        table.append(f"| {names[row['implementation']]} | {row['seconds']:.2f} | "
                     f"{row['peak_extra_gib']:.2f} | {speed} | {row['layer0_max_error_vs_float64']:.1e} |")
    notes = (f"\n{ours['modules']} modules (Llama-3-8B shapes: {args.layers} layers x q,k,v,o,gate,up,down), "
             f"rank {args.rank}, {ours['parameters'] / 1e6:.0f}M parameters per adapter; paper selection "
             f"rule, exact rank-2r transplant ({ours['repaired']} modules repaired). Each implementation "
             f"runs in its own process; nlsr time is the best of {args.repeats} runs. The dense "
             "implementation forms both masked d_out x d_in products per module in float32 for the "
             "similarity and then transplants factor-wise like nlsr. Peak extra memory is resident "
             "memory growth during the call, including the repaired adapter it returns. Load average "
             "(1/5/15 min) when each implementation's process started: "
             + "; ".join(f"{r['implementation']} {' / '.join(f'{v:.2f}' for v in r['loadavg_at_start'])}"
                         for r in rows) + ".")
    if len(rows) > 1:
        diff = max(abs(a - b) for a, b in zip(ours["similarity"], rows[-1]["similarity"], strict=True))
        notes += f" Largest similarity difference between the two: {diff:.1e}."
    text = "\n".join(table) + "\n" + notes
    print(text)
    for row in rows:
        row.pop("similarity")
    write_results("realign_bench", {"machine": machine(), "layers": args.layers, "rank": args.rank,
                                    "rows": rows}, text)


if __name__ == "__main__":
    main()
