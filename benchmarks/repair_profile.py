"""Where one batch repair spends its time: ``cProfile`` of ``run_item`` at Llama-3-8B shapes.

    python benchmarks/repair_profile.py [--adapters 4] [--layers 32] [--rank 16]

The inputs of ``service_bench.py`` (synthetic bf16 adapters, random entry masks at q = 0.2), one
thread, the reference and masks loaded and checked once as a batch does; the first adapter warms
up, the others are profiled, then repaired again without the profiler (timed only). Prints the
seconds per adapter and the functions by own time, and writes ``results/repair_profile.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, write_results
from service_bench import make_inputs

from nlsr.method.batch_item import OPTION_DEFAULTS, BatchItem, BatchJob, check_shared, load_shared, run_item


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        make_inputs(root, args.adapters, args.layers, args.rank)
        items = [BatchItem(p.name, p) for p in sorted((root / "adapters").iterdir())]
        job = BatchJob("adapter", str(root / "reference"), str(root / "masks.safetensors"), str(root / "out"),
                       dict(OPTION_DEFAULTS))
        (root / "out").mkdir()
        shared = load_shared(job)
        check_shared(shared, job)
        job = BatchJob(**{**job.__dict__, "masks_checked": True})
        run_item(shared, job, items[0])                       # warm-up
        profile = cProfile.Profile()
        start, cpu = time.perf_counter(), time.process_time()
        profile.enable()
        results = [run_item(shared, job, item) for item in items[1:]]
        profile.disable()
        count = len(items) - 1
        wall, cpu = (time.perf_counter() - start) / count, (time.process_time() - cpu) / count
        (root / "out-plain").mkdir()                          # the same repairs without the profiler
        plain_job = BatchJob(**{**job.__dict__, "out": str(root / "out-plain")})
        plain = []
        for item in items[1:]:
            t0 = time.perf_counter()
            run_item(shared, plain_job, item)
            plain.append(time.perf_counter() - t0)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise SystemExit(f"a repair failed: {failed[0].error}")
    text = io.StringIO()
    pstats.Stats(profile, stream=text).strip_dirs().sort_stats("tottime").print_stats(args.top)  # no machine paths
    listing = "\n".join(line for line in text.getvalue().splitlines() if line.strip())
    summary = (f"{count} adapters profiled: {wall:.3f} s wall and {cpu:.3f} s CPU per adapter (under cProfile, "
               f"one thread; {results[-1].modules_repaired} of {results[-1].modules} modules repaired in the last); "
               f"the same repairs without the profiler: {', '.join(f'{t:.3f}' for t in plain)} s wall each")
    print(summary)
    print(listing)
    write_results("repair_profile", {"machine": machine(), "adapters": count, "wall_s_per_adapter": wall,
                                     "cpu_s_per_adapter": cpu, "unprofiled_wall_s": plain},
                  f"{summary}\n\nFunctions by own time (all {count} adapters together):\n\n```\n{listing}\n```")


if __name__ == "__main__":
    main()
