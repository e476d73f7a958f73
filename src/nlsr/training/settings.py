"""The settings of one training run: LoRA shape and optimisation (sections of the experiment config,
defined here so that training depends on nothing above it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A config section: unknown fields refused, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSection(Section):
    """LoRA shape shared by alignment and attack (the attack continues the aligned adapter)."""

    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"])


class TrainSection(Section):
    """Optimisation settings of one training stage."""

    epochs: float = Field(1.0, gt=0)
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_length: int = Field(256, gt=8)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    micro_batch_size: int | None = Field(
        None, gt=0, description="Rows per forward/backward pass (default: batch_size). A smaller value "
                                "splits each batch into micro-batches whose gradients are accumulated: the same "
                                "optimizer steps (up to float summation order) in less activation memory.")


class SftSection(TrainSection):
    dataset: str = Field("safety_sft", description="Registry name of (harmful prompt, safe answer) rows.")
    n: int = Field(1000, gt=0, description="Rows used for SFT (the first n of a seeded shuffle).")


class DpoSection(TrainSection):
    dataset: str = Field("safety_dpo", description="Registry name of (prompt, chosen, rejected) rows.")
    n: int = Field(500, gt=0)
    refusal_pairs: int = Field(
        0, ge=0, description="Also add this many pairs on the SFT set's harmful prompts: chosen = its refusal, "
                             "rejected = the harmful answer to the same prompt (refusal_pairs_dataset), so DPO "
                             "learns where to refuse as the helpful pairs teach it where not to (0 = none).")
    refusal_pairs_dataset: str = Field("poison", description="Registry name of (prompt, harmful answer) rows.")
    beta: float = Field(0.1, gt=0, description="DPO temperature β (sigmoid loss, Rafailov et al.).")
    lr: float = Field(5e-5, gt=0)


DPO_FIELDS = ("beta",)
"""What a DPO run reads beyond :class:`TrainSection`'s fields."""
