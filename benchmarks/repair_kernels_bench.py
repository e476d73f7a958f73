"""The kernels of one entry repair, at Llama-3-8B factor shapes, against a copy of the same bytes.

    python benchmarks/repair_kernels_bench.py [--repeats 300]

One thread (torch and BLAS), r = 16, factors ``d x 16`` (B) and ``16 x d`` (A) for d = 4096 and
14336, random entry masks at q = 0.2. Each kernel's median time over ``--repeats`` calls, and its
ratio to the floor measured in the same run: ``numpy.copyto`` of a float32 factor (reading and
writing the same bytes as one selection). Kernels:

* the ``factor`` form's selection of one factor: ``numpy.where``, ``torch.where``, and the bit blend
  ``t ^ ((t ^ e) * M)`` that nlsr uses (:func:`nlsr.method.transplant.select_entries`), on float32 and
  on the bf16 bits;
* an ``r x r`` Gram product of two factors as the repair forms them (numpy, BLAS ``?gemm``; a factor
  with itself, ``?syrk``), and the alternatives tried: torch's ``mm``, both sides stacked into one
  ``d x 2r`` product, the product blocked over ``d`` in chunks of 2048.

Writes ``results/repair_kernels_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _common import machine, write_results
from threadpoolctl import threadpool_limits

from nlsr.method.transplant import select_entries


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def kernels(d: int, r: int, gen: torch.Generator) -> dict:
    B_e, B_t = torch.randn(d, r, generator=gen), torch.randn(d, r, generator=gen)
    A_t, A_2 = torch.randn(r, d, generator=gen), torch.randn(r, d, generator=gen)
    mask = torch.rand(d, r, generator=gen) < 0.2
    b_e, b_t, m = B_e.numpy(), B_t.numpy(), mask.numpy()
    h_e, h_t = B_e.bfloat16(), B_t.bfloat16()
    a_t, a_2 = A_t.numpy(), A_2.numpy()
    out = np.empty_like(b_t)
    stacked = np.concatenate([b_e, b_t], axis=1)
    tb_e, tb_t, ta_t, ta_2 = B_e, B_t, A_t, A_2
    return {
        "floor: copy a float32 factor": lambda: np.copyto(out, b_t),
        "select: numpy.where (float32)": lambda: np.where(m, b_e, b_t),
        "select: torch.where (float32)": lambda: torch.where(mask, B_e, B_t),
        "select: bit blend (float32, nlsr)": lambda: select_entries(mask, B_e, B_t),
        "select: torch.where (bf16)": lambda: torch.where(mask, h_e, h_t),
        "select: bit blend (bf16)": lambda: select_entries(mask, h_e, h_t),
        "gram: numpy B1ᵀB2 (nlsr)": lambda: b_e.T @ b_t,
        "gram: numpy BᵀB, syrk (nlsr)": lambda: b_t.T @ b_t,
        "gram: numpy A1A2ᵀ (nlsr)": lambda: a_t @ a_2.T,
        "gram: numpy AAᵀ, syrk (nlsr)": lambda: a_t @ a_t.T,
        "gram: torch mm B1ᵀB2": lambda: tb_e.T @ tb_t,
        "gram: torch mm A1A2ᵀ": lambda: ta_t @ ta_2.T,
        "gram: numpy [B1|B2]ᵀ[B1|B2] (all three at once)": lambda: stacked.T @ stacked,
        "gram: numpy A1A2ᵀ blocked by 2048": lambda: sum(a_t[:, i:i + 2048] @ a_2[:, i:i + 2048].T
                                                         for i in range(0, d, 2048)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows, payload_rows = [], []
    with threadpool_limits(1):
        for d in (4096, 14336):
            timed = {name: median_ms(fn, args.repeats) for name, fn in kernels(d, args.rank, gen).items()}
            floor = timed["floor: copy a float32 factor"]
            for name, ms in timed.items():
                rows.append(f"| {d} x {args.rank} | {name} | {ms:.3f} | {ms / floor:.1f} |")
                payload_rows.append({"d": d, "rank": args.rank, "kernel": name, "median_ms": ms,
                                     "ratio_to_copy": ms / floor})
    info = machine()
    table = "\n".join(["| factor | kernel | median ms | x copy |", "|---|---|---|---|", *rows]) + (
        "\n\nOne thread; median of the calls. 'x copy': the time over the floor measured in the same run "
        "(copying one float32 factor of that shape). Random entry masks at q = 0.2.")
    print(table)
    write_results("repair_kernels_bench", {"machine": info, "repeats": args.repeats, "rows": payload_rows}, table)


if __name__ == "__main__":
    main()
