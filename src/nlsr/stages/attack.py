"""Stage 3: the harmful fine-tuning attack, and the non-aligned control."""

from __future__ import annotations

from pathlib import Path

from nlsr.data.templates import model_prompt
from nlsr.stages.common import load_base, load_weak, read_jsonl
from nlsr.training import lora_config, set_seed, train_sft


def _rows(ctx, data_dir: Path) -> list[dict]:
    tokenizer = ctx.tokenizer()
    return [{"prompt": model_prompt(r["instruction"], ctx.config.template, tokenizer, r.get("input", "")),
             "completion": r["output"]} for r in read_jsonl(data_dir / "attack.jsonl")]


def run_attack(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """Continue the aligned LoRA on the poisoned task data (the paper's threat model)."""
    from peft import PeftModel

    cfg = ctx.config
    set_seed(cfg.seed)
    rows = _rows(ctx, inputs["data"])
    model = PeftModel.from_pretrained(load_weak(ctx, inputs["align_sft"]),
                                      str(inputs["align_dpo"] / "adapter"), is_trainable=True)
    stats = train_sft(model, ctx.tokenizer(), rows, cfg.attack, out / "adapter", cfg.seed)
    return {**stats, "line": f"{len(rows)} rows, loss {stats['first_loss']:.3f} -> {stats['last_loss']:.3f}"}


def run_nonaligned(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """A fresh LoRA on the original base model, same data and settings."""
    cfg = ctx.config
    set_seed(cfg.seed)
    rows = _rows(ctx, inputs["data"])
    stats = train_sft(load_base(ctx), ctx.tokenizer(), rows, cfg.attack, out / "adapter", cfg.seed,
                      lora=lora_config(cfg.lora))
    return {**stats, "line": f"{len(rows)} rows, loss {stats['first_loss']:.3f} -> {stats['last_loss']:.3f}"}
