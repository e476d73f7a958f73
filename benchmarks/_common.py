"""Shared benchmark plumbing: peak-memory sampling, machine description, result files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"
# When the benchmark started (this module is imported first thing), and how busy the machine was:
# on a shared machine the load average says how much of the CPUs the timings could use.
START = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
         "loadavg": [round(x, 2) for x in os.getloadavg()]}


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(fn: Callable[[], object], interval: float = 0.002,
            rss: Callable[[], int] = rss_bytes) -> tuple[object, float, int]:
    """Run ``fn``; return its result, wall seconds, and peak RSS growth above the start (bytes).
    ``rss``: what to sample (default this process's resident memory)."""
    start_rss = rss()
    peak = [start_rss]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    try:
        result = fn()
    finally:
        elapsed = time.perf_counter() - t0
        done.set()
        thread.join()
    peak[0] = max(peak[0], rss())
    return result, elapsed, peak[0] - start_rss


def machine() -> dict:
    """What ran the benchmark: CPU model, precision policy, load average at start and end, command."""
    import torch

    from nlsr.precision import resolve_precision

    precision = resolve_precision()
    cpu = precision.cpu.model
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"date": START["date"], "loadavg_start": START["loadavg"],
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "precision": precision.record(), "precision_line": precision.line(),
            "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "commit": commit, "command": " ".join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]])}


def write_results(name: str, payload: dict, table: str) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (the printed table)."""
    RESULTS.mkdir(exist_ok=True)
    json_path = RESULTS / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    info = payload["machine"]
    (RESULTS / f"{name}.md").write_text(
        f"# {name}\n\nCommand: `{info['command']}`  \nMachine: {info['cpu']}, {info['cores']} cores, "
        f"torch {info['torch']} ({info['torch_threads']} threads)"
        f"{', GPU ' + info['cuda'] if info['cuda'] else ''}  \n"
        f"Precision: {info['precision_line']}  \n"
        f"Load average (1/5/15 min) at start: {_load(info['loadavg_start'])}, at end: "
        f"{_load(info['loadavg_end'])}  \nDate: {info['date']}  \n"
        f"Commit: {info['commit']}\n\n{table}\n")
    return json_path


def _load(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def templated_prompts(name: str, rows: int, tokenizer) -> list[str]:
    """The first ``rows`` prompts of the data set ``name`` in the Alpaca template, as the evaluate stage
    feeds them to the model."""
    from nlsr.data.registry import load_records
    from nlsr.data.templates import model_prompt

    return [model_prompt(r.get("instruction") or r["prompt"], "alpaca", tokenizer, r.get("input", ""))
            for r in load_records(name, limit=rows)]
