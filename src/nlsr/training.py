"""Builders from config sections to TRL trainers, and the three training jobs of the experiment.

* :func:`train_sft` - supervised LoRA fine-tuning (safety SFT; the attack; the non-aligned control).
* :func:`train_dpo` - DPO of a LoRA on top of a (merged) model; the reference policy is the same
  model with the adapter disabled.
Both train on prompt/completion rows rendered with the experiment's template, keep the closing eos
as a target, checkpoint into ``out_dir`` and resume from the last checkpoint there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from nlsr.config import LoraSection, TrainSection


def lora_config(section: LoraSection):
    """The PEFT LoraConfig of a config section."""
    from peft import LoraConfig

    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=list(section.targets), task_type="CAUSAL_LM", bias="none")


def _common_args(section: TrainSection, out_dir: Path, seed: int, use_cpu: bool) -> dict:
    return dict(output_dir=str(out_dir), num_train_epochs=section.epochs, learning_rate=section.lr,
                per_device_train_batch_size=section.batch_size,
                gradient_accumulation_steps=section.grad_accum, warmup_steps=section.warmup_ratio,
                lr_scheduler_type="linear", bf16=True, logging_steps=1, save_strategy="steps",
                save_steps=25, save_total_limit=1, report_to=[], seed=seed, data_seed=seed,
                use_cpu=use_cpu, disable_tqdm=False, max_length=section.max_length,
                dataloader_num_workers=0, remove_unused_columns=True,
                # TRL turns activation checkpointing on by default; these models fit without it, and it
                # costs about a third more compute.
                gradient_checkpointing=False)


def _last_checkpoint(out_dir: Path) -> str | None:
    checkpoints = sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return str(checkpoints[-1]) if checkpoints else None


def _finish(trainer, output, out_dir: Path, started: float) -> dict:
    history = [h for h in trainer.state.log_history if "loss" in h]
    stats = {"seconds": time.perf_counter() - started, "steps": trainer.state.global_step,
             "first_loss": history[0]["loss"] if history else None,
             "last_loss": history[-1]["loss"] if history else None,
             "mean_loss": output.training_loss}
    for checkpoint in out_dir.glob("checkpoint-*"):
        import shutil

        shutil.rmtree(checkpoint, ignore_errors=True)
    (out_dir / "train_log.json").write_text(json.dumps(trainer.state.log_history, indent=1) + "\n")
    return stats


def train_sft(model, tokenizer, rows: Sequence[dict], section: TrainSection, out_dir: Path,
              seed: int, lora=None, trainer_cls=None, **trainer_kwargs) -> dict:
    """LoRA SFT on ``{"prompt", "completion"}`` rows (loss on the completion and its eos only).

    ``model`` is either a plain model (a fresh LoRA from ``lora`` is added) or a trainable
    ``PeftModel`` whose adapter is continued. The adapter is saved in ``out_dir``.
    ``trainer_cls`` (an ``SFTTrainer`` subclass, e.g. a defence) and its extra keyword arguments
    replace the plain trainer.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    started = time.perf_counter()
    use_cpu = next(model.parameters()).device.type == "cpu"
    args = SFTConfig(**_common_args(section, out_dir, seed, use_cpu), completion_only_loss=True)
    trainer = (trainer_cls or SFTTrainer)(model=model, args=args, train_dataset=Dataset.from_list(list(rows)),
                                          processing_class=tokenizer, peft_config=lora, **trainer_kwargs)
    output = trainer.train(resume_from_checkpoint=_last_checkpoint(out_dir))
    trainer.model.save_pretrained(out_dir)
    return _finish(trainer, output, out_dir, started)


def train_dpo(model, tokenizer, rows: Sequence[dict], section, out_dir: Path, seed: int,
              lora, trainer_cls=None, **trainer_kwargs) -> dict:
    """DPO of a fresh LoRA on ``{"prompt", "chosen", "rejected"}`` rows; saved in ``out_dir``.

    ``trainer_cls`` (a ``DPOTrainer`` subclass such as Vaccine's) replaces the plain trainer."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    use_cpu = next(model.parameters()).device.type == "cpu"
    common = _common_args(section, out_dir, seed, use_cpu)
    args = DPOConfig(**common, beta=section.beta)
    trainer = (trainer_cls or DPOTrainer)(model=model, args=args, train_dataset=Dataset.from_list(list(rows)),
                                          processing_class=tokenizer, peft_config=lora, **trainer_kwargs)
    output = trainer.train(resume_from_checkpoint=_last_checkpoint(out_dir))
    trainer.model.save_pretrained(out_dir)
    return _finish(trainer, output, out_dir, started)


def merge_adapter(model, adapter_dir: Path):
    """Load an adapter onto ``model`` and merge it into the weights (returns a plain model)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()


def set_seed(seed: int) -> None:
    from transformers import set_seed as hf_set_seed

    hf_set_seed(seed)
