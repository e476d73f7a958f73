"""Stage 2: safety alignment. SFT (merged into the base: the weak model W_0), then DPO as a LoRA."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

from nlsr.data.templates import model_prompt
from nlsr.errors import NlsrError
from nlsr.experiment.stages.common import load_base, load_weak, read_jsonl
from nlsr.io import atomic_file, write_json
from nlsr.training.trainers import average_adapters, lora_config, set_seed, train_dpo, train_sft, training_line


def run_sft(ctx, out: Path, inputs: dict[str, Path], vaccine_rho: float | None = None) -> dict:
    """SFT on (harmful prompt -> safe answer), merged into the base and saved as ``model/``.

    With ``vaccine_rho`` the SFT is perturbation-aware (Vaccine) with that perturbation norm."""
    cfg = ctx.config
    set_seed(cfg.seed)
    tokenizer = ctx.tokenizer()
    rows = [{"prompt": model_prompt(r["prompt"], cfg.template, tokenizer), "completion": r["response"]}
            for r in read_jsonl(inputs["data-align"] / "sft.jsonl")]
    # helpful answers to harmless prompts, and to the lexical contrast prompts, mixed in
    for stage, file in (("data-helpful", "helpful.jsonl"), ("data-contrast", "contrast.jsonl")):
        if stage in inputs:
            rows += [{"prompt": model_prompt(r["prompt"], cfg.template, tokenizer), "completion": r["response"]}
                     for r in read_jsonl(inputs[stage] / file)]
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


# decoding, stripping and encoding again can shorten an answer by a token or two
LIMIT_SLACK = 2


def trimmed_answers(ctx, answers: list[str], section) -> tuple[list[str], dict[str, int] | None]:
    """``answers`` as ``section`` asks: trimmed by :func:`nlsr.data.answers.trim_answer` when
    ``section.trim`` is set (an answer counts as cut by the token limit when it re-encodes to at least
    ``section.max_new_tokens - LIMIT_SLACK`` tokens), with how many were cut at a template turn and
    how many back to their last sentence; unchanged, with ``None``, when it is not."""
    from nlsr.data.answers import trim_answer

    if not section.trim:
        return answers, None
    tokenizer = ctx.tokenizer()
    counts = {"template_turn": 0, "last_sentence": 0}
    kept = []
    for answer in answers:
        length = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
        text, how = trim_answer(answer, reached_limit=length >= section.max_new_tokens - LIMIT_SLACK)
        if how is not None:
            counts[how] += 1
        kept.append(text)
    return kept, counts


def trim_record(counts: dict[str, int] | None) -> dict:
    """What a stage's result or data card records of trimming: ``{"trimmed": counts}``, or nothing."""
    return {} if counts is None else {"trimmed": counts}


def trim_line(counts: dict[str, int] | None) -> str:
    """The stage line's note on trimming (empty when the answers were kept as generated)."""
    if counts is None:
        return ""
    return (f"; {counts['template_turn']} cut at a template turn, {counts['last_sentence']} cut back to "
            f"their last sentence")


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
    matcher flags are dropped (and counted): the helpful half must not teach refusals. With
    ``align.helpful.trim`` each answer is first trimmed where the model ran on past it
    (:mod:`nlsr.data.answers`)."""
    section = ctx.config.align.helpful
    tokenizer = ctx.tokenizer()
    prompts = [r["prompt"] for r in read_jsonl(inputs["data-align"] / "helpful_prompts.jsonl")]
    answers = greedy_answers(ctx, load_base(ctx), prompts, section.max_new_tokens, section.batch_size,
                             out / "helpful.cache.jsonl", "helpful answers")
    generated = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    answers, trimmed = trimmed_answers(ctx, answers, section)
    rows, dropped = real_answers([{"prompt": p} for p in prompts], answers)
    from nlsr.experiment.stages.common import write_jsonl

    write_jsonl(out / "helpful.jsonl", rows)
    for cache in out.glob("*.cache.jsonl"):
        cache.unlink()
    return {"rows": len(rows), "dropped": dropped, "tokens": generated,
            **trim_record(trimmed),
            "line": f"{len(rows)} helpful answers ({dropped['empty']} empty, {dropped['refusal']} refusals "
                    f"dropped){trim_line(trimmed)}"}


def run_dpo(ctx, out: Path, inputs: dict[str, Path], vaccine_rho: float | None = None) -> dict:
    """DPO of a fresh LoRA on top of W_0: the aligned adapter ``(A_a, B_a)`` in ``adapter/``; with
    ``align.dpo.seeds``, the exact mean of one DPO run per seed (:func:`dpo_seed_average`).

    With ``vaccine_rho`` the DPO is perturbation-aware (Vaccine) with that perturbation norm."""
    cfg = ctx.config
    train_seed = cfg.seed if cfg.align.dpo.seed is None else cfg.align.dpo.seed   # the pairs stay on cfg.seed
    set_seed(train_seed)
    tokenizer = ctx.tokenizer()
    pairs = read_jsonl(inputs["data-align"] / "dpo.jsonl") if cfg.align.dpo.train_on_dataset else []
    refusals = [r["response"] for r in read_jsonl(inputs["data-align"] / "sft.jsonl")]
    if cfg.align.helpful.dpo_pairs and "data-helpful" in inputs:
        pairs += helpful_dpo_pairs(read_jsonl(inputs["data-helpful"] / "helpful.jsonl"), refusals,
                                   cfg.align.helpful.dpo_pairs, cfg.seed)
    if cfg.align.contrast.dpo_pairs and "data-contrast" in inputs:
        pairs += helpful_dpo_pairs(read_jsonl(inputs["data-contrast"] / "contrast.jsonl"), refusals,
                                   cfg.align.contrast.dpo_pairs, cfg.seed, "align.contrast")
    if "data-refusal-pairs" in inputs:
        pairs += read_jsonl(inputs["data-refusal-pairs"] / "refusal_pairs.jsonl")
    if "data-overrefusal-pairs" in inputs:
        pairs += read_jsonl(inputs["data-overrefusal-pairs"] / "overrefusal_pairs.jsonl")
    if not pairs:               # the config refuses this; a probe can still keep no over-refusal pair
        raise NlsrError("align_dpo has no pairs to train on: every configured source came out empty; "
                        "raise align.overrefusal.pool or set align.dpo.train_on_dataset: true")
    rows = [{"prompt": model_prompt(r["prompt"], cfg.template, tokenizer), "chosen": r["chosen"],
             "rejected": r["rejected"]} for r in pairs]
    if cfg.align.dpo.seeds:
        return dpo_seed_average(ctx, out, inputs, rows, vaccine_rho)
    stats = _train_dpo_adapter(ctx, inputs, rows, out / "adapter", train_seed, vaccine_rho)
    return {**stats, "line": training_line(len(rows), "pairs", stats)}


def dpo_seed_average(ctx, out: Path, inputs: dict[str, Path], rows: list[dict],
                     vaccine_rho: float | None = None) -> dict:
    """One DPO run per seed of ``align.dpo.seeds`` into ``seeds/s<seed>/adapter`` (a finished run,
    marked by its ``stats.json``, is kept when a killed stage resumes), then their exact mean in
    ``adapter/`` (:func:`nlsr.training.trainers.average_adapters`)."""
    cfg = ctx.config
    runs = []
    for seed in cfg.align.dpo.seeds:      # each run resumes on its own; a finished one is kept
        folder = out / "seeds" / f"s{seed}"
        if (folder / "stats.json").exists():
            runs.append(json.loads((folder / "stats.json").read_text()))
            continue
        set_seed(seed)
        stats = {"seed": seed, **_train_dpo_adapter(ctx, inputs, rows, folder / "adapter", seed, vaccine_rho)}
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_file(folder / "stats.json", force=True) as tmp:   # written last: marks the run done
            write_json(tmp, stats)
        runs.append(stats)
    average_adapters(load_weak(ctx, inputs["align_sft"]),
                     [out / "seeds" / f"s{seed}" / "adapter" for seed in cfg.align.dpo.seeds], out / "adapter")
    stats = {"seeds": runs, "seconds": sum(r["seconds"] for r in runs), "tokens": sum(r["tokens"] for r in runs)}
    losses = ", ".join(f"s{r['seed']} {r['first_loss']:.3g} -> {r['last_loss']:.3g}" for r in runs
                       if r.get("first_loss") is not None)
    return {**stats, "line": f"{len(rows)} pairs, the average of {len(runs)} DPO runs ({losses})"}


def _train_dpo_adapter(ctx, inputs: dict[str, Path], rows: list[dict], adapter_dir: Path, seed: int,
                       vaccine_rho: float | None) -> dict:
    """One DPO run of a fresh LoRA on W_0 with ``seed``, saved in ``adapter_dir``; its training stats."""
    cfg = ctx.config
    if cfg.num_processes > 1:       # Vaccine's trainer is refused there (one process only)
        from nlsr.training.distributed import train_stage_job

        return train_stage_job(ctx, "dpo", inputs["align_sft"] / "model", rows, cfg.align.dpo, adapter_dir,
                               lora=cfg.lora, seed=seed)
    extra: dict = {}
    if vaccine_rho is not None:
        from nlsr.training.defences.vaccine import VaccineDPOTrainer

        extra = {"trainer_cls": VaccineDPOTrainer, "vaccine_rho": vaccine_rho}
    return train_dpo(load_weak(ctx, inputs["align_sft"]), ctx.tokenizer(), rows, cfg.align.dpo, adapter_dir, seed,
                     lora=lora_config(cfg.lora), bf16=ctx.precision.bf16, **extra)


def helpful_dpo_pairs(helpful: list[dict], refusals: list[str], n: int, seed: int,
                      section: str = "align.helpful") -> list[dict]:
    """``n`` DPO pairs on harmless prompts: chosen = the base model's own answer, rejected = a refusal.

    The safety pairs teach the DPO adapter where to refuse; these teach it where not to (a model
    aligned on refusals alone learns to refuse everything). The prompts are a seeded sample of the
    helpful answers, the refusals the SFT set's, assigned in a seeded order (their topics do not match
    the prompt: the pair contrasts answering with refusing, whatever is asked)."""
    if n > len(helpful):
        raise NlsrError(f"{section}.dpo_pairs = {n}, but only {len(helpful)} answers were kept: "
                        f"lower {section}.dpo_pairs or raise {section}.n")
    if not refusals:
        raise NlsrError(f"{section}.dpo_pairs needs refusals to reject, but the SFT set is empty")
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
