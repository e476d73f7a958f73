"""What a transplant costs the task, entry by entry (``protect_task_score: fisher``; beyond the paper).

The fine-tuned adapter sits near a minimum of its task loss, where the first-order change of the
loss vanishes and moving entry ``i`` from its fine-tuned value ``t_i`` to the reference's ``e_i``
costs about ``½ F_ii (e_i - t_i)²`` (the quadratic term, with the diagonal Fisher information
``F_ii = E[(∂ log p(y|x) / ∂θ_i)²]`` standing in for the Hessian, as in EWC and Fisher merging).
``F`` is estimated on clean task rows from per-row gradients (the expectation is over rows; a
batch's summed gradient would square the sum, not sum the squares), on response tokens only.

Unlike the magnitude score (the paper's identification run on the fine-tuned adapter), this score
ranks an entry by what reverting *it* would cost, whatever its size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nlsr.errors import NlsrError
from nlsr.method.calibration import CalibrationRow, make_batches
from nlsr.method.masks import SafetyMasks, provenance
from nlsr.method.projection import top_fraction_mask
from nlsr.weights.adapters import LoraAdapter, attach_adapter, weight_key


def fisher_diagonal(model, adapter: LoraAdapter, rows: Sequence[CalibrationRow], tokenizer,
                    max_length: int = 512, template: str | None = None,
                    batch_size: int = 8) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of ``adapter``'s factor entries on ``rows`` (float32, keyed like the factors).

    ``model`` (the base, ``W_0``) runs with the adapter attached and is left as it was. Each row's
    gradient is that of its summed response-token log-likelihood; ``F`` is the mean of their squares.
    The rows of a batch share one backward pass: a LoRA factor's per-row gradient is a sum over the
    row's tokens of outer products of what its layer saw (``x`` or ``z = A x``) and the gradient at
    its output, both captured by hooks (rows do not interact, and padding gets no gradient).
    """
    if not rows:
        raise NlsrError("no task rows given for the Fisher information")
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    peft_model = attach_adapter(model, adapter, adapter_name="nlsr_task")
    handles = []
    try:
        for p in peft_model.parameters():
            p.requires_grad_(False)
        modules = dict(peft_model.named_modules())
        seen: dict[str, torch.Tensor] = {}          # weight key -> the layer's input, this batch
        grads_out: dict[str, torch.Tensor] = {}     # weight key -> the gradient at the layer's output
        factors = []
        for name, _ in adapter:
            layer = modules.get(f"base_model.model.{name}")
            if layer is None or "nlsr_task" not in getattr(layer, "lora_A", {}):
                raise NlsrError(f"the adapter's module '{name}' was not attached; is it an adapter of this model?")
            for factor, linear in (("A", layer.lora_A["nlsr_task"]), ("B", layer.lora_B["nlsr_task"])):
                key = weight_key(name, factor)
                linear.weight.requires_grad_(True)
                factors.append((key, linear.weight))

                def hook(_module, inputs, output, key=key):
                    seen[key] = inputs[0].detach()
                    output.register_hook(lambda grad, key=key: grads_out.__setitem__(key, grad.detach()))
                handles.append(linear.register_forward_hook(hook))
        fisher = {key: torch.zeros(w.shape, dtype=torch.float32) for key, w in factors}
        device = next(peft_model.parameters()).device
        counted = 0
        for batch in make_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length, template=template):
            keep = batch.response_mask[:, 1:].to(device)
            if not keep.any():
                continue                                  # truncated to their prompts: no response token
            ids = batch.input_ids.to(device)
            logits = peft_model(input_ids=ids, attention_mask=batch.attention_mask.to(device),
                                use_cache=False).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits[keep], ids[:, 1:][keep], reduction="sum")
            torch.autograd.grad(loss, [w for _, w in factors])      # runs the hooks; the sums are not needed
            for key, _ in factors:           # per row: sum over tokens of grad_out ⊗ input (out x in)
                per_row = torch.einsum("nto,nti->noi", grads_out[key].float(), seen[key].float())
                fisher[key] += (per_row ** 2).sum(0).cpu()
            counted += int(keep.any(dim=1).sum())
            seen.clear()
            grads_out.clear()
        if counted == 0:
            raise NlsrError("the task rows have no response tokens (all truncated?); raise max_length")
        return {key: value / counted for key, value in fisher.items()}
    finally:
        for handle in handles:
            handle.remove()
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
    masks = {key: top_fraction_mask(value, fraction) for key, value in cost.items()}   # costs are >= 0
    return SafetyMasks(masks, provenance(finetuned, score="fisher", keep_fraction=fraction))
