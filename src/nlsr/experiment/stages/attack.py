"""Stage 3: the harmful fine-tuning attack, the non-aligned control, and the fine-tuning-stage defences."""

from __future__ import annotations

from pathlib import Path

from nlsr.data.poison import FLAG_POISON
from nlsr.data.templates import model_prompt
from nlsr.experiment.config import DefenceSection
from nlsr.experiment.stages.common import load_base, load_weak, read_jsonl
from nlsr.training.defences import DEFENCES
from nlsr.training.trainers import lora_config, set_seed, train_sft, training_line


def _render(ctx, rows: list[dict]) -> list[dict]:
    tokenizer = ctx.tokenizer()
    return [{"prompt": model_prompt(r["instruction"], ctx.config.template, tokenizer, r.get("input", "")),
             "completion": r["output"]} for r in rows]


def _safety_rows(ctx, folder: Path) -> list[dict]:
    """Harmful prompt -> safe answer rows kept apart for the defences (disjoint from SFT/calibration)."""
    tokenizer = ctx.tokenizer()
    return [{"prompt": model_prompt(r["prompt"], ctx.config.template, tokenizer), "completion": r["response"]}
            for r in read_jsonl(folder / "safety_extra.jsonl")]


def attack_rows(ctx, inputs: dict[str, Path], benign: bool = False) -> list[dict]:
    """This seed's fine-tuning rows (``data-attack``); ``benign`` drops the harmful ones (p = 0)."""
    raw = read_jsonl(inputs["data-attack"] / "attack.jsonl")
    return [r for r in raw if r.get("flag") != FLAG_POISON] if benign else raw


def run_attack_from(aligned_stage: str = "align_dpo", defence: DefenceSection | None = None,
                    benign: bool = False):
    """A stage function that continues the aligned LoRA of ``aligned_stage`` on the poisoned task data
    (the paper's threat model), under a fine-tuning-stage ``defence`` if one is given.

    ``benign``: the same task rows without the harmful ones (the p = 0 control)."""
    def run(ctx, out: Path, inputs: dict[str, Path]) -> dict:
        from peft import PeftModel

        cfg = ctx.config
        set_seed(ctx.seed)
        raw = attack_rows(ctx, inputs, benign)
        extra: dict = {}
        trainer_cls = None
        if defence is not None and defence.method == "mixing":
            mix_safety_rows = DEFENCES.get("mixing")
            safety = [{"prompt": r["prompt"], "response": r["response"]}
                      for r in read_jsonl(inputs["data-defences"] / "safety_extra.jsonl")]
            raw = mix_safety_rows(raw, safety, fraction=defence.fraction, seed=ctx.seed)
        rows = _render(ctx, raw)
        if cfg.num_processes > 1:       # the defences with their own trainers are refused there
            from nlsr.training.distributed import train_stage_job

            stats = train_stage_job(ctx, "sft", inputs["align_sft"] / "model", rows, cfg.attack, out / "adapter",
                                    adapter=inputs[aligned_stage] / "adapter")
            return {**stats, "line": training_line(len(rows), "rows", stats)}
        model = PeftModel.from_pretrained(load_weak(ctx, inputs["align_sft"]),
                                          str(inputs[aligned_stage] / "adapter"), is_trainable=True)
        if defence is not None and defence.method == "lisa":
            from datasets import Dataset

            trainer_cls = DEFENCES.get("lisa")
            extra = {"alignment_dataset": Dataset.from_list(_safety_rows(ctx, inputs["data-defences"])),
                     "k_align": defence.k_align, "k_finetune": defence.k_finetune,
                     "rho": 1.0 if defence.rho is None else defence.rho}
        elif defence is not None and defence.method == "constrained_sft":
            trainer_cls = DEFENCES.get("constrained_sft")
            extra = {"ref_model": None, "beta_schedule": tuple(defence.beta_schedule)}
        stats = train_sft(model, ctx.tokenizer(), rows, cfg.attack, out / "adapter", ctx.seed,
                          trainer_cls=trainer_cls, bf16=ctx.precision.bf16, **extra)
        return {**stats, "line": training_line(len(rows), "rows", stats)}
    return run


run_attack = run_attack_from("align_dpo")


def run_nonaligned(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """A fresh LoRA on the original base model, same data and settings."""
    cfg = ctx.config
    set_seed(ctx.seed)
    rows = _render(ctx, read_jsonl(inputs["data-attack"] / "attack.jsonl"))
    if cfg.num_processes > 1:
        from nlsr.training.distributed import train_stage_job

        stats = train_stage_job(ctx, "sft", cfg.model, rows, cfg.attack, out / "adapter", lora=cfg.lora)
    else:
        stats = train_sft(load_base(ctx), ctx.tokenizer(), rows, cfg.attack, out / "adapter", ctx.seed,
                          lora=lora_config(cfg.lora), bf16=ctx.precision.bf16)
    return {**stats, "line": training_line(len(rows), "rows", stats)}
