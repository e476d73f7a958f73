"""What a transplant costs the task, entry by entry (``protect_task_score: fisher``; beyond the paper).

The fine-tuned adapter sits near a minimum of its task loss, where the first-order change of the
loss vanishes and moving entry ``i`` from its fine-tuned value ``t_i`` to the reference's ``e_i``
costs about ``½ F_ii (e_i - t_i)²`` (the quadratic term, with the diagonal Fisher information
``F_ii = E[(∂ log p(y|x) / ∂θ_i)²]`` standing in for the Hessian, as in EWC and Fisher merging).
``F`` is estimated on clean task rows, one row at a time (the expectation is over rows; a batch's
summed gradient would square the sum, not sum the squares), on response tokens only.

Unlike the magnitude score (the paper's identification run on the fine-tuned adapter), this score
ranks an entry by what reverting *it* would cost, whatever its size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from nlsr.adapters import LoraAdapter, attach_adapter, weight_key
from nlsr.calibration import CalibrationRow, make_batches
from nlsr.errors import NlsrError
from nlsr.identification import SafetyMasks, provenance


def fisher_diagonal(model, adapter: LoraAdapter, rows: Sequence[CalibrationRow], tokenizer,
                    max_length: int = 512, template: str | None = None) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of ``adapter``'s factor entries on ``rows`` (float32, keyed like the factors).

    ``model`` (the base, ``W_0``) runs with the adapter attached and is left as it was. Each row's
    gradient is that of its summed response-token log-likelihood; ``F`` is the mean of their squares.
    """
    if not rows:
        raise NlsrError("no task rows given for the Fisher information")
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    peft_model = attach_adapter(model, adapter, adapter_name="nlsr_task")
    try:
        params = {}
        for name, param in peft_model.named_parameters():
            param.requires_grad_(False)
            if ".lora_A.nlsr_task." in name or ".lora_B.nlsr_task." in name:
                param.requires_grad_(True)
                params[name.replace(".nlsr_task.", ".")] = param
        missing = [weight_key(n, f) for n, _ in adapter for f in "AB" if weight_key(n, f) not in params]
        if missing:
            raise NlsrError(f"the adapter's factor '{missing[0]}' was not attached; is it an adapter of this model?")
        fisher = {key: torch.zeros_like(p, dtype=torch.float32) for key, p in params.items()}
        device = next(peft_model.parameters()).device
        counted = 0
        for batch in make_batches(tokenizer, rows, batch_size=1, max_length=max_length, template=template):
            if not batch.response_mask[0, 1:].any():
                continue                                  # truncated to its prompt: no response token
            ids = batch.input_ids.to(device)
            logits = peft_model(input_ids=ids, attention_mask=batch.attention_mask.to(device),
                                use_cache=False).logits[0, :-1].float()
            target = ids[0, 1:]
            keep = batch.response_mask[0, 1:].to(device)
            loss = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
            grads = torch.autograd.grad(loss, list(params.values()))
            for key, grad in zip(params, grads, strict=True):
                fisher[key] += grad.float() ** 2
            counted += 1
        if counted == 0:
            raise NlsrError("the task rows have no response tokens (all truncated?); raise max_length")
        return {key: (value / counted).detach().cpu() for key, value in fisher.items()}
    finally:
        peft_model.unload()
        for name, p in model.named_parameters():
            p.requires_grad_(trainable.get(name, p.requires_grad))


def transplant_cost(fisher: dict[str, torch.Tensor], reference: LoraAdapter,
                    finetuned: LoraAdapter) -> dict[str, torch.Tensor]:
    """``½ F_ii (e_i - t_i)²`` per factor entry: the task loss an entry's move to the reference costs."""
    out = {}
    for name, f in finetuned:
        ref = reference.modules[name]
        for factor, t, e in (("A", f.A, ref.A), ("B", f.B, ref.B)):
            key = weight_key(name, factor)
            if key not in fisher or fisher[key].shape != t.shape:
                raise NlsrError(f"the Fisher information lacks '{key}' or differs in shape; compute it again")
            out[key] = 0.5 * fisher[key] * (e.float() - t.float()) ** 2
    return out


def costliest_entries(cost: dict[str, torch.Tensor], fraction: float, finetuned: LoraAdapter) -> SafetyMasks:
    """Masks of the ``ceil(fraction · numel)`` costliest entries of each factor (ties: first)."""
    masks = {}
    for key, value in cost.items():
        flat = value.flatten()
        count = min(flat.numel(), math.ceil(fraction * flat.numel() - 1e-9))
        mask = torch.zeros(flat.numel(), dtype=torch.bool)
        if count > 0:
            mask[torch.topk(flat, count, sorted=False).indices] = True
        masks[key] = mask.view_as(value)
    return SafetyMasks(masks, provenance(finetuned, score="fisher", keep_fraction=fraction))
