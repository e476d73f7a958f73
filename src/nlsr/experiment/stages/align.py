"""Stage 2: safety alignment. SFT (merged into the base: the weak model W_0), then DPO as a LoRA."""

from __future__ import annotations

import functools
import random
from pathlib import Path

from nlsr.data.templates import model_prompt
from nlsr.errors import NlsrError
from nlsr.experiment.stages.common import load_base, load_weak, read_jsonl
from nlsr.training.trainers import lora_config, set_seed, train_dpo, train_sft, training_line


def run_sft(ctx, out: Path, inputs: dict[str, Path], vaccine_rho: float | None = None) -> dict:
    """SFT on (harmful prompt -> safe answer), merged into the base and saved as ``model/``.

    With ``vaccine_rho`` the SFT is perturbation-aware (Vaccine) with that perturbation norm."""
    cfg = ctx.config
    set_seed(cfg.seed)
    tokenizer = ctx.tokenizer()
    rows = [{"prompt": model_prompt(r["prompt"], cfg.template, tokenizer), "completion": r["response"]}
            for r in read_jsonl(inputs["data-align"] / "sft.jsonl")]
    if "data-helpful" in inputs:        # the base model's own answers to harmless prompts, mixed in
        rows += [{"prompt": model_prompt(r["prompt"], cfg.template, tokenizer), "completion": r["response"]}
                 for r in read_jsonl(inputs["data-helpful"] / "helpful.jsonl")]
    if cfg.num_processes > 1:
        from nlsr.training.distributed import train_stage_job

        stats = train_stage_job(ctx, "sft", cfg.model, rows, cfg.align.sft, out / "adapter", lora=cfg.lora)
    else:
        model = load_base(ctx)
        extra: dict = {}
        if vaccine_rho is not None:
            from nlsr.training.defences.vaccine import VaccineSFTTrainer

            extra = {"trainer_cls": VaccineSFTTrainer, "vaccine_rho": vaccine_rho}
        stats = train_sft(model, tokenizer, rows, cfg.align.sft, out / "adapter", cfg.seed,
                          lora=lora_config(cfg.lora), bf16=ctx.precision.bf16, **extra)
    import gc

    from nlsr.training.trainers import merge_adapter

    model = None            # the trained copy: free it before loading the base again to merge
    gc.collect()
    weak = merge_adapter(load_base(ctx), out / "adapter")
    weak.save_pretrained(out / "model", safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    return {**stats, "line": training_line(len(rows), "rows", stats)}


def greedy_answers(ctx, model, prompts: list[str], max_new_tokens: int, batch_size: int, cache_file: Path,
                   description: str) -> list[str]:
    """``model``'s greedy answers to ``prompts`` (in the run's template and precision; resumable
    through ``cache_file``)."""
    from nlsr.evaluation.generation import generate
    from nlsr.experiment.stages.evaluate import cast_parameters

    tokenizer = ctx.tokenizer()
    cast_parameters(model, ctx.precision.torch_dtype)
    model.eval()
    return generate(model, tokenizer, [model_prompt(p, ctx.config.template, tokenizer) for p in prompts],
                    max_new_tokens, batch_size=batch_size, cache_file=cache_file, description=description)


def real_answers(rows: list[dict], answers: list[str]) -> tuple[list[dict], dict[str, int]]:
    """Each row (a ``prompt`` and any other fields) with its ``response``, kept where the answer is
    neither empty nor a refusal (by the refusal matcher), and the count of each reason a row was
    dropped: a helpful row must not teach refusals."""
    from nlsr.evaluation.judges.refusal import is_refusal

    kept, dropped = [], {"empty": 0, "refusal": 0}
    for row, answer in zip(rows, answers, strict=True):
        answer = answer.strip()
        if not answer:
            dropped["empty"] += 1
        elif is_refusal(answer):
            dropped["refusal"] += 1
        else:
            kept.append({**row, "response": answer})
    return kept, dropped


def run_helpful_answers(ctx, out: Path, inputs: dict[str, Path]) -> dict:
    """The base model's own greedy answers to the harmless prompts of ``data-align``.

    Mixed into the SFT set, they teach the model to keep answering harmless requests in its own
    style while it learns to refuse harmful ones. Answers that are empty or that the refusal
    matcher flags are dropped (and counted): the helpful half must not teach refusals."""
    section = ctx.config.align.helpful
    tokenizer = ctx.tokenizer()
    prompts = [r["prompt"] for r in read_jsonl(inputs["data-align"] / "helpful_prompts.jsonl")]
    answers = greedy_answers(ctx, load_base(ctx), prompts, section.max_new_tokens, section.batch_size,
                             out / "helpful.cache.jsonl", "helpful answers")
    generated = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    rows, dropped = real_answers([{"prompt": p} for p in prompts], answers)
    from nlsr.experiment.stages.common import write_jsonl

    write_jsonl(out / "helpful.jsonl", rows)
    for cache in out.glob("*.cache.jsonl"):
        cache.unlink()
    return {"rows": len(rows), "dropped": dropped, "tokens": generated,
            "line": f"{len(rows)} helpful answers ({dropped['empty']} empty, {dropped['refusal']} refusals "
                    "dropped)"}


def run_dpo(ctx, out: Path, inputs: dict[str, Path], vaccine_rho: float | None = None) -> dict:
    """DPO of a fresh LoRA on top of W_0: the aligned adapter ``(A_a, B_a)`` in ``adapter/``.

    The pairs: the ``align.dpo.n`` dataset pairs, the helpful pairs (``align.helpful.dpo_pairs``)
    and the refusal pairs (``data-refusal-pairs``). With ``vaccine_rho`` the DPO is
    perturbation-aware (Vaccine) with that perturbation norm."""
    cfg = ctx.config
    set_seed(cfg.seed)
    tokenizer = ctx.tokenizer()
    pairs = read_jsonl(inputs["data-align"] / "dpo.jsonl")
    if cfg.align.helpful.dpo_pairs and "data-helpful" in inputs:
        refusals = [r["response"] for r in read_jsonl(inputs["data-align"] / "sft.jsonl")]
        pairs += helpful_dpo_pairs(read_jsonl(inputs["data-helpful"] / "helpful.jsonl"), refusals,
                                   cfg.align.helpful.dpo_pairs, cfg.seed)
    if "data-refusal-pairs" in inputs:
        pairs += read_jsonl(inputs["data-refusal-pairs"] / "refusal_pairs.jsonl")
    rows = [{"prompt": model_prompt(r["prompt"], cfg.template, tokenizer), "chosen": r["chosen"],
             "rejected": r["rejected"]} for r in pairs]
    adapter_dir = out / "adapter"
    if cfg.num_processes > 1:       # Vaccine's trainer is refused there (one process only)
        from nlsr.training.distributed import train_stage_job

        stats = train_stage_job(ctx, "dpo", inputs["align_sft"] / "model", rows, cfg.align.dpo, adapter_dir,
                                lora=cfg.lora)
    else:
        extra: dict = {}
        if vaccine_rho is not None:
            from nlsr.training.defences.vaccine import VaccineDPOTrainer

            extra = {"trainer_cls": VaccineDPOTrainer, "vaccine_rho": vaccine_rho}
        stats = train_dpo(load_weak(ctx, inputs["align_sft"]), tokenizer, rows, cfg.align.dpo, adapter_dir,
                          cfg.seed, lora=lora_config(cfg.lora), bf16=ctx.precision.bf16, **extra)
    return {**stats, "line": training_line(len(rows), "pairs", stats)}


def helpful_dpo_pairs(helpful: list[dict], refusals: list[str], n: int, seed: int) -> list[dict]:
    """``n`` DPO pairs on harmless prompts: chosen = the base model's own answer, rejected = a refusal.

    The safety pairs teach the DPO adapter where to refuse; these teach it where not to (a model
    aligned on refusals alone learns to refuse everything). The prompts are a seeded sample of the
    helpful answers, the refusals the SFT set's, assigned in a seeded order (their topics do not match
    the prompt: the pair contrasts answering with refusing, whatever is asked)."""
    if n > len(helpful):
        raise NlsrError(f"align.helpful.dpo_pairs = {n}, but only {len(helpful)} answers were kept: "
                        "lower align.helpful.dpo_pairs or raise align.helpful.n")
    if not refusals:
        raise NlsrError("align.helpful.dpo_pairs needs refusals to reject, but the SFT set is empty")
    rng = random.Random(seed)
    chosen = rng.sample(helpful, n)
    order = rng.sample(range(len(refusals)), len(refusals))
    return [{"prompt": row["prompt"], "chosen": row["response"], "rejected": refusals[order[i % len(order)]]}
            for i, row in enumerate(chosen)]


def run_dpo_vaccine(rho: float):
    """The DPO stage under Vaccine (perturbation-aware alignment, ρ = ``rho``)."""
    return functools.partial(run_dpo, vaccine_rho=rho)


def run_sft_vaccine(rho: float):
    """The SFT stage under Vaccine (perturbation-aware alignment, ρ = ``rho``)."""
    return functools.partial(run_sft, vaccine_rho=rho)
