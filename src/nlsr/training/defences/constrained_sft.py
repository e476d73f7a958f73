"""ConstrainedSFT: token-wise constrained fine-tuning against the aligned model (a fine-tuning-stage baseline).

Qi et al., 2024, "Safety Alignment Should Be Made More Than Just a Few Tokens Deep" (Eq. 3) fine-tune with

    min_θ  E  - Σ_t (2 / β_t) log σ(β_t Δ_t),      Δ_t = log π_θ(y_t | x, y_<t) - log π_ref(y_t | x, y_<t),

where π_ref is the (frozen) aligned model. Its gradient is that of a weighted cross-entropy,

    ∇ = - Σ_t w_t ∇ log π_θ(y_t),      w_t = 2 (1 - σ(β_t Δ_t))   (treated as a constant),

so this module trains on ``loss = - Σ_t w_t log π_θ(y_t) / N`` with ``w_t`` detached, ``N`` the number of
response tokens of the batch (of the whole accumulated step when the trainer passes ``num_items_in_batch``,
exactly like :class:`trl.SFTTrainer`). ``w_t ≈ 1`` (plain SFT) while θ stays near the reference; a large
``β_t`` makes the weight fall quickly once the token's likelihood rises above the reference's, which
pins the first response tokens (the paper: β_1 = 0.5, β_2..5 = 2, then 0.1).

``β_t`` is indexed by the token's position **within its response**: the first label that is not -100 of
each contiguous run of response labels has position 1.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Sequence

import torch
from trl import SFTTrainer

from nlsr.errors import NlsrError

# β for response positions 1, 2, ...; positions past the end use the last entry (here 0.1 from position 6 on).
DEFAULT_BETA_SCHEDULE: tuple[float, ...] = (0.5, 2.0, 2.0, 2.0, 2.0, 0.1)


def response_positions(mask: torch.Tensor) -> torch.Tensor:
    """1-based position of each True entry within its contiguous run along the last dim; 0 where False."""
    mask = mask.bool()
    count = mask.long().cumsum(-1)
    previous = torch.nn.functional.pad(mask[..., :-1], (1, 0), value=False)
    starts = mask & ~previous
    # count just before each run starts, carried forward over the run (count is non-decreasing)
    offset = torch.where(starts, count - 1, torch.zeros_like(count)).cummax(-1).values
    return torch.where(mask, count - offset, torch.zeros_like(count))


def token_position_betas(labels: torch.Tensor, schedule: Sequence[float] = DEFAULT_BETA_SCHEDULE,
                         ignore_index: int = -100) -> torch.Tensor:
    """β_t for each label: ``schedule[k - 1]`` at response position k (the last entry past the end), 0 elsewhere.

    Args:
        labels: ``(batch, seq)`` token labels aligned with the log-probabilities they weight (i.e. already
            shifted), ``ignore_index`` outside the response.
        schedule: β for response positions 1, 2, ...; positions beyond ``len(schedule)`` use ``schedule[-1]``.
    """
    if len(schedule) == 0:
        raise NlsrError("the β schedule needs at least one value")
    mask = labels != ignore_index
    positions = response_positions(mask)
    table = torch.as_tensor(list(schedule), dtype=torch.float32, device=labels.device)
    index = (positions - 1).clamp(0, len(schedule) - 1)
    return torch.where(mask, table[index], torch.zeros((), dtype=torch.float32, device=labels.device))


def constrained_token_weights(logp_theta: torch.Tensor, logp_ref: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """``w_t = 2 (1 - σ(β_t (log π_θ(y_t) - log π_ref(y_t))))``, detached (computed as ``2 σ(-β_t Δ_t)``)."""
    delta = (logp_theta.detach() - logp_ref.detach()).float()
    return 2.0 * torch.sigmoid(-betas.float() * delta)


def constrained_sft_loss(logp_theta: torch.Tensor, logp_ref: torch.Tensor, labels: torch.Tensor,
                         schedule: Sequence[float] = DEFAULT_BETA_SCHEDULE, num_items: int | torch.Tensor | None = None,
                         ignore_index: int = -100) -> torch.Tensor:
    """``- Σ_t w_t log π_θ(y_t) / N`` over the response tokens (``labels != ignore_index``).

    ``logp_theta``, ``logp_ref`` and ``labels`` are aligned ``(batch, seq)`` tensors (shifted labels). ``N`` is
    ``num_items`` when given, else the number of response tokens.
    """
    mask = labels != ignore_index
    weights = constrained_token_weights(logp_theta, logp_ref, token_position_betas(labels, schedule, ignore_index))
    weights = weights * mask
    count = mask.sum() if num_items is None else num_items
    total = -(weights * logp_theta.float()).sum()
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


def _patch_fused_head(model) -> None:
    """Give ``model`` TRL's fused LM head (``fused_lm_head=True`` returns per-token log-probs) if it lacks it."""
    from trl.trainer.utils import add_fused_lm_head

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(vars(target).get("forward"), types.MethodType):
        add_fused_lm_head(target)


class ConstrainedSFTTrainer(SFTTrainer):
    """:class:`trl.SFTTrainer` with the token-wise constrained loss of Qi et al. (2024) against ``ref_model``.

    Update rule: per response token ``Δ_t = log π_θ(y_t) - log π_ref(y_t)``, ``w_t = 2 (1 - σ(β_t Δ_t))``
    (detached), ``loss = - Σ_t w_t log π_θ(y_t) / N`` (see the module docstring); the optimiser steps on it
    as usual. Both log-probabilities come from TRL's fused LM head, so with ``θ = ref`` every ``w_t = 1``
    and the loss is exactly the SFT loss.

    Args:
        ref_model: the aligned model, frozen (``requires_grad`` off, eval mode, moved to the trainer's
            device). ``None``: a frozen deep copy of ``model`` as passed (it must then be a module, e.g.
            the aligned ``PeftModel`` that the attack continues). It must not be ``model`` itself.
        beta_schedule: β for response positions 1, 2, ...; later positions use the last entry.
        Everything else goes to :class:`trl.SFTTrainer` (use ``completion_only_loss=True`` so that only the
        response is a target).
    """

    def __init__(self, model, *args, ref_model=None, beta_schedule: Sequence[float] = DEFAULT_BETA_SCHEDULE,
                 **kwargs):
        if not beta_schedule or any(float(b) <= 0 for b in beta_schedule):
            raise NlsrError(f"beta_schedule must be a non-empty list of positive values, got {beta_schedule!r}")
        if ref_model is None:
            if not isinstance(model, torch.nn.Module):
                raise NlsrError("ConstrainedSFTTrainer needs ref_model when model is not an nn.Module")
            ref_model = copy.deepcopy(model)
        elif ref_model is model:
            raise NlsrError("ref_model must be a separate frozen copy of the aligned model, not the trained model")
        super().__init__(model, *args, **kwargs)
        self.beta_schedule = tuple(float(b) for b in beta_schedule)
        ref_model.requires_grad_(False)
        ref_model.eval()
        self.ref_model = ref_model.to(self.accelerator.device)
        _patch_fused_head(self.ref_model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        with torch.no_grad():
            ref_outputs = self.ref_model(**inputs, fused_lm_head=True)
        labels = inputs["labels"][:, 1:]
        seq = labels.size(1)
        logp = outputs.log_probs[:, -seq:]
        logp_ref = ref_outputs.log_probs[:, -seq:]
        mask = labels != -100
        weights = constrained_token_weights(logp, logp_ref, token_position_betas(labels, self.beta_schedule)) * mask
        count = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -(weights * logp.float()).sum() / torch.as_tensor(count, device=logp.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())

        n_valid = mask.sum().clamp(min=1)
        metrics = self._metrics[mode]
        metrics["constrained/mean_weight"].append((weights.sum() / n_valid).item())
        metrics["constrained/mean_delta"].append((((logp - logp_ref) * mask).sum() / n_valid).item())
        if outputs.is_top1 is not None:
            metrics["mean_token_accuracy"].append(((outputs.is_top1[:, -seq:] * mask).sum() / n_valid).item())
        return (loss, outputs) if return_outputs else loss
