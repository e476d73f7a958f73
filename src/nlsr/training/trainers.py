"""Builders from config sections to TRL trainers, and the training jobs of the experiment.

* :func:`train_sft` - supervised LoRA fine-tuning (safety SFT; the attack; the non-aligned control).
* :func:`train_dpo` - DPO of a LoRA on top of a (merged) model; the reference policy is the same
  model with the adapter disabled.
Both train on prompt/completion rows rendered with the experiment's template, keep the closing eos
as a target, checkpoint into ``out_dir`` and resume from the last checkpoint there.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

from nlsr.training.settings import DpoSection, LoraSection, TrainSection


def lora_config(section: LoraSection):
    """The PEFT LoraConfig of a config section."""
    from peft import LoraConfig

    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=list(section.targets), task_type="CAUSAL_LM", bias="none")


def _save_steps(section: TrainSection, rows: int) -> int:
    """Checkpoint about four times per stage (at least every 25 steps on long stages), so a killed
    short stage loses minutes, not the whole stage."""
    per_epoch = max(1, -(-rows // (section.batch_size * section.grad_accum)))
    total = max(1, int(per_epoch * section.epochs + 0.999))
    return max(1, min(25, -(-total // 4)))


def micro_batching(section: TrainSection) -> tuple[int, int]:
    """``(rows per pass, accumulation steps)``: ``batch_size`` split into micro-batches of at most
    ``micro_batch_size`` rows (a divisor of ``batch_size``), so every optimizer step still sees
    ``batch_size x grad_accum`` rows while a pass holds the activations of fewer."""
    cap = min(section.micro_batch_size or section.batch_size, section.batch_size)
    micro = max(d for d in range(1, cap + 1) if section.batch_size % d == 0)
    return micro, section.grad_accum * (section.batch_size // micro)


def _common_args(section: TrainSection, out_dir: Path, seed: int, use_cpu: bool, bf16: bool,
                 rows: int) -> dict:
    micro, accumulation = micro_batching(section)
    return dict(output_dir=str(out_dir), num_train_epochs=section.epochs, learning_rate=section.lr,
                per_device_train_batch_size=micro,
                gradient_accumulation_steps=accumulation, warmup_steps=section.warmup_ratio,
                lr_scheduler_type="linear", bf16=bf16, logging_steps=1, save_strategy="steps",
                save_steps=_save_steps(section, rows), save_total_limit=1, report_to=[], seed=seed,
                data_seed=seed, use_cpu=use_cpu, disable_tqdm=False, max_length=section.max_length,
                dataloader_num_workers=0, remove_unused_columns=True,
                # TRL turns activation checkpointing on by default; these models fit without it, and it
                # costs about a third more compute.
                activation_checkpointing=False)


def _last_checkpoint(out_dir: Path) -> str | None:
    checkpoints = sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


def _dataset_tokens(dataset) -> int:
    """Tokens one epoch feeds the model: SFT ``input_ids``; DPO prompt + chosen and prompt + rejected."""
    columns = set(dataset.column_names)
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= columns:
        return sum(2 * len(p) + len(c) + len(r) for p, c, r in
                   zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True))
    return sum(len(ids) for ids in dataset["input_ids"]) if "input_ids" in columns else 0


def _train(trainer, out_dir: Path, section: TrainSection, started: float, log=print) -> dict:
    """Train (resuming from the last checkpoint in ``out_dir``), save the adapter, return the stats."""
    resume = _last_checkpoint(out_dir)
    if resume is not None:
        log(f"[resume] continuing training from {Path(resume).name} "
            f"(step {resume.rsplit('-', 1)[-1]} of this stage)")
    with warnings.catch_warnings():
        # transformers' own trainer still calls its deprecated checkpointing names
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*checkpointing.*deprecated")
        output = trainer.train(resume_from_checkpoint=resume)
    # Under a multi-process launch (nlsr.training.distributed) every process gets here; only the main one writes.
    trainer.accelerator.wait_for_everyone()
    trainer.model.save_pretrained(out_dir, is_main_process=trainer.args.should_save)
    history = [h for h in trainer.state.log_history if "loss" in h]
    epoch_tokens = _dataset_tokens(trainer.train_dataset)
    stats = {"seconds": time.perf_counter() - started, "steps": trainer.state.global_step,
             "first_loss": history[0]["loss"] if history else None,
             "last_loss": history[-1]["loss"] if history else None,
             **end_losses([h["loss"] for h in history]),
             "mean_loss": output.training_loss,
             "tokens": int(round(epoch_tokens * section.epochs))}
    if trainer.args.should_save:
        for checkpoint in out_dir.glob("checkpoint-*"):
            shutil.rmtree(checkpoint, ignore_errors=True)
        (out_dir / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
    return stats


def end_losses(losses: Sequence[float]) -> dict:
    """The mean loss of the first and of the last tenth of the logged steps (at least one step each):
    single steps are noisy (a short last batch can double the loss), a tenth shows the trend."""
    if not losses:
        return {}
    k = max(1, len(losses) // 10)
    return {"first_tenth_loss": sum(losses[:k]) / k, "last_tenth_loss": sum(losses[-k:]) / k, "tenth_steps": k}


def training_line(count: int, what: str, stats: dict) -> str:
    """``"400 rows, loss 2.31 -> 1.05 (mean of the first and last 5 logged steps)"``; a resumed stage
    with no step left has no losses to show."""
    if stats.get("first_loss") is None:
        return f"{count} {what}, {stats.get('steps', 0)} steps (no step left to log after resuming)"
    if "first_tenth_loss" not in stats:
        return f"{count} {what}, loss {stats['first_loss']:.3f} -> {stats['last_loss']:.3f}"
    return (f"{count} {what}, loss {stats['first_tenth_loss']:.3f} -> {stats['last_tenth_loss']:.3f} "
            f"(mean of the first and last {stats['tenth_steps']} logged steps)")


def tokenize_completions(tokenizer, rows: Sequence[dict], max_length: int) -> list[dict]:
    """``{"prompt", "completion"}`` rows -> ``{"input_ids", "completion_mask"}``, as TRL tokenizes them.

    The completion gets the eos appended (a training target: the model learns to stop), the
    sequence is cut to its first ``max_length`` tokens, and rows left without a completion token
    are dropped. Pre-tokenized rows let the trainer run padding-free batches.
    """
    eos = tokenizer.eos_token
    out = []
    for row in rows:
        completion = row["completion"] if row["completion"].endswith(eos) else row["completion"] + eos
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + completion)["input_ids"]
        start = 0
        while start < min(len(prompt_ids), len(ids)) and prompt_ids[start] == ids[start]:
            start += 1
        mask = [0] * start + [1] * (len(ids) - start)
        ids, mask = ids[:max_length], mask[:max_length]
        if any(mask):
            out.append({"input_ids": ids, "completion_mask": mask})
    return out


def train_sft(model, tokenizer, rows: Sequence[dict], section: TrainSection, out_dir: Path,
              seed: int, lora=None, trainer_cls=None, bf16: bool = False, **trainer_kwargs) -> dict:
    """LoRA SFT on ``{"prompt", "completion"}`` rows (loss on the completion and its eos only).

    ``model`` is either a plain model (a fresh LoRA from ``lora`` is added) or a trainable
    ``PeftModel`` whose adapter is continued. The adapter is saved in ``out_dir``.
    ``bf16`` computes in bfloat16 autocast (see :mod:`nlsr.precision`). The plain trainer runs
    padding-free batches (the rows of a batch concatenated, each attending only to itself), so no
    compute goes to padding. ``trainer_cls`` (an ``SFTTrainer`` subclass, e.g. a defence) and its
    extra keyword arguments replace the plain trainer; those keep padded batches.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    use_cpu = next(model.parameters()).device.type == "cpu"
    common = _common_args(section, out_dir, seed, use_cpu, bf16, len(rows))
    if trainer_cls is None:
        # Truncation happens in tokenize_completions; padding-free needs max_length unset here.
        dataset = Dataset.from_list(tokenize_completions(tokenizer, rows, section.max_length))
        args = SFTConfig(**{**common, "max_length": None}, completion_only_loss=True, padding_free=True)
    else:
        dataset = Dataset.from_list(list(rows))
        args = SFTConfig(**common, completion_only_loss=True)
    with _quiet():
        trainer = (trainer_cls or SFTTrainer)(model=model, args=args, train_dataset=dataset,
                                              processing_class=tokenizer, peft_config=lora, **trainer_kwargs)
    return _train(trainer, out_dir, section, started)


def train_dpo(model, tokenizer, rows: Sequence[dict], section: DpoSection, out_dir: Path, seed: int,
              lora, trainer_cls=None, bf16: bool = False, **trainer_kwargs) -> dict:
    """DPO of a fresh LoRA on ``{"prompt", "chosen", "rejected"}`` rows; saved in ``out_dir``.

    ``trainer_cls`` (a ``DPOTrainer`` subclass such as Vaccine's) replaces the plain trainer."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    use_cpu = next(model.parameters()).device.type == "cpu"
    common = _common_args(section, out_dir, seed, use_cpu, bf16, len(rows))
    args = DPOConfig(**common, beta=section.beta, loss_type=["sigmoid"], loss_weights=[1.0])
    with _quiet():
        trainer = (trainer_cls or DPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(list(rows)),
                                              processing_class=tokenizer, peft_config=lora, **trainer_kwargs)
    return _train(trainer, out_dir, section, started)


@contextlib.contextmanager
def _quiet():
    """Keep the libraries' set-up chatter (dataset-map bars, deprecation notices) off the console;
    training progress still shows."""
    import datasets
    from transformers.utils import logging as hf_logging

    bars = datasets.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"(trl|transformers|peft)\.")
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def merge_adapter(model, adapter_dir: Path):
    """Load an adapter onto ``model`` and merge it into the weights (returns a plain model)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def set_seed(seed: int) -> None:
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)
