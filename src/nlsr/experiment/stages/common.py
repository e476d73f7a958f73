"""Small helpers shared by the stages."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    count = 0
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_base(ctx, precision: str = "float32"):
    """The original base model of the experiment (float32 weights by default: training keeps
    float32 master weights and computes in the run's precision by autocast)."""
    from nlsr.weights.models import load_model

    return load_model(ctx.config.model, device=ctx.config.device, precision=precision)


def load_weak(ctx, align_sft_dir: Path, precision: str = "float32"):
    """The weak aligned model W_0 (the base with the safety SFT merged in)."""
    from nlsr.weights.models import load_model

    return load_model(str(align_sft_dir / "model"), device=ctx.config.device, precision=precision)


def load_model_dir(ctx, folder: Path, precision: str = "float32"):
    """A model directory written by a stage (the merged aligned model, a full fine-tune, a repair)."""
    from nlsr.weights.models import load_model

    return load_model(str(folder), device=ctx.config.device, precision=precision)
