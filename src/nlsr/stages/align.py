"""Stage 2: safety alignment. SFT (merged into the base: the weak model W_0), then DPO as a LoRA."""

from __future__ import annotations

import functools
from pathlib import Path

from nlsr.data.templates import model_prompt
from nlsr.stages.common import load_base, load_weak, read_jsonl
from nlsr.training import lora_config, set_seed, train_dpo, train_sft, training_line


def run_sft(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """SFT on (harmful prompt -> safe answer), merged into the base and saved as ``model/``."""
    cfg = ctx.config
    set_seed(cfg.seed)
    tokenizer = ctx.tokenizer()
    rows = [{"prompt": model_prompt(r["prompt"], cfg.template, tokenizer), "completion": r["response"]}
            for r in read_jsonl(inputs["data-align"] / "sft.jsonl")]
    if cfg.num_processes > 1:
        from nlsr.distributed import train_stage_job

        stats = train_stage_job(ctx, "sft", cfg.model, rows, cfg.align.sft, out / "adapter", lora=cfg.lora)
    else:
        model = load_base(ctx)
        stats = train_sft(model, tokenizer, rows, cfg.align.sft, out / "adapter", cfg.seed,
                          lora=lora_config(cfg.lora), bf16=ctx.precision.bf16)
    import gc

    from nlsr.training import merge_adapter

    model = None            # the trained copy: free it before loading the base again to merge
    gc.collect()
    weak = merge_adapter(load_base(ctx), out / "adapter")
    weak.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    return {**stats, "line": training_line(len(rows), "rows", stats)}


def run_dpo(ctx, out: Path, inputs: dict[str, Path], vaccine_rho: float | None = None) -> dict:
    """DPO of a fresh LoRA on top of W_0: the aligned adapter ``(A_a, B_a)`` in ``adapter/``.

    With ``vaccine_rho`` the DPO is perturbation-aware (Vaccine) with that perturbation norm."""
    cfg = ctx.config
    set_seed(cfg.seed)
    tokenizer = ctx.tokenizer()
    rows = [{"prompt": model_prompt(r["prompt"], cfg.template, tokenizer), "chosen": r["chosen"],
             "rejected": r["rejected"]} for r in read_jsonl(inputs["data-align"] / "dpo.jsonl")]
    if cfg.num_processes > 1:       # Vaccine's trainer is refused there (one process only)
        from nlsr.distributed import train_stage_job

        stats = train_stage_job(ctx, "dpo", inputs["align_sft"] / "model", rows, cfg.align.dpo, out / "adapter",
                                lora=cfg.lora)
        return {**stats, "line": training_line(len(rows), "pairs", stats)}
    model = load_weak(ctx, inputs["align_sft"])
    extra: dict = {}
    if vaccine_rho is not None:
        from nlsr.defences.vaccine import VaccineDPOTrainer

        extra = {"trainer_cls": VaccineDPOTrainer, "vaccine_rho": vaccine_rho}
    stats = train_dpo(model, tokenizer, rows, cfg.align.dpo, out / "adapter", cfg.seed,
                      lora=lora_config(cfg.lora), bf16=ctx.precision.bf16, **extra)
    return {**stats, "line": training_line(len(rows), "pairs", stats)}


def run_dpo_vaccine(rho: float):
    """The DPO stage under Vaccine (perturbation-aware alignment, ρ = ``rho``)."""
    return functools.partial(run_dpo, vaccine_rho=rho)
