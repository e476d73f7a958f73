"""Antidote (Huang et al., 2024, "Antidote: Post-fine-tuning safety alignment for large language
models against harmful fine-tuning"): after the fine-tune, prune the weights most salient for harmful
outputs, in one shot, with no training.

Salience is Wanda's score ``|W_ij| · ||X_j||_2`` (the weight's magnitude times the norm of its input
feature over the tokens of a calibration set), measured on harmful (prompt, harmful answer) pairs.
For a LoRA fine-tune the weights pruned here are the entries of the fine-tune's factors, so the
output is still a PEFT adapter of the same rank:

* ``A_t`` (``r x d_in``) reads the module input ``x``: ``score_A[k, j] = |A_t[k, j]| · ||x_j||``;
* ``B_t`` (``d_out x r``) reads ``z = A_t x``: ``score_B[i, k] = |B_t[i, k]| · ||z_k||``;

norms over the response (harmful answer) tokens of the fine-tuned model ``W_0 + s B_t A_t``. In every
factor the ``ceil(sparsity · numel)`` entries of largest score are set to zero (the sparsity is the
knob). The activations come from one forward pass (:func:`harmful_activation_norms`); the pruning
itself (:func:`antidote`) needs only their norms.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from nlsr.errors import NlsrError
from nlsr.method.calibration import CalibrationRow, make_batches
from nlsr.method.controls import EditResult
from nlsr.method.projection import top_fraction_mask
from nlsr.method.similarity import update_change
from nlsr.weights.adapters import LoraAdapter, LoraFactors, attach_adapter


@torch.inference_mode()
def harmful_activation_norms(model, finetuned: LoraAdapter, rows: Sequence[CalibrationRow], tokenizer, *,
                             batch_size: int = 8, max_length: int = 512, template: str | None = None
                             ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, ``(||x_j||, ||z_k||)``: the L2 norms over the response tokens of ``rows`` of the
    inputs of ``A_t`` (``d_in``) and of ``B_t`` (``r``, ``z = A_t x``), float64, with the fine-tune
    attached to ``model`` (``W_0``; it is removed afterwards)."""
    if not rows:
        raise NlsrError("Antidote needs harmful (prompt, answer) rows; none were given")
    sums: dict[str, list[torch.Tensor]] = {}
    state: dict = {}
    peft_model = attach_adapter(model, finetuned, adapter_name="nlsr_antidote")
    handles = []
    try:
        modules = dict(peft_model.named_modules())
        for name in finetuned.modules:
            lora_a = modules[f"base_model.model.{name}"].lora_A["nlsr_antidote"]

            def hook(_module, inputs, output, name=name):
                mask = state["mask"].to(output.device)
                x, z = inputs[0][mask].double(), output[mask].double()
                acc = sums.setdefault(name, [torch.zeros(x.shape[-1], dtype=torch.float64),
                                             torch.zeros(z.shape[-1], dtype=torch.float64)])
                acc[0] += x.pow(2).sum(0).cpu()
                acc[1] += z.pow(2).sum(0).cpu()
            handles.append(lora_a.register_forward_hook(hook))
        device = next(model.parameters()).device
        tokens = 0
        for batch in make_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length, template=template):
            state["mask"] = batch.response_mask
            tokens += int(batch.response_mask.sum())
            peft_model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                       use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        peft_model.unload()
    if tokens == 0:
        raise NlsrError("the harmful rows have no answer tokens (all truncated?); raise max_length")
    return {name: (x.sqrt(), z.sqrt()) for name, (x, z) in sums.items()}


def antidote(finetuned: LoraAdapter, norms: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
             sparsity: float) -> EditResult:
    """The fine-tune with the ``sparsity`` fraction of each factor's entries of largest Wanda score
    (``|entry| ·`` the norm of its input feature on the harmful rows) set to zero."""
    if not 0 <= sparsity < 1:
        raise NlsrError(f"Antidote's sparsity must be in [0, 1) (got {sparsity})")
    modules, pruned, changed, total = {}, 0, 0.0, 0.0
    for name, f in finetuned:
        if name not in norms:
            raise NlsrError(f"no activation norms for module '{name}'; measure them on this fine-tune")
        x_norm, z_norm = norms[name]
        if x_norm.numel() != f.A.shape[1] or z_norm.numel() != f.A.shape[0]:
            raise NlsrError(f"the activation norms of '{name}' do not fit its factors "
                            f"({x_norm.numel()}, {z_norm.numel()} vs {f.A.shape[1]}, {f.A.shape[0]})")
        cut_a = top_fraction_mask(f.A.double().abs() * x_norm.reshape(1, -1), sparsity)
        cut_b = top_fraction_mask(f.B.double().abs() * z_norm.reshape(1, -1), sparsity)
        A, B = f.A.masked_fill(cut_a, 0), f.B.masked_fill(cut_b, 0)
        modules[name] = LoraFactors(A=A, B=B, scale=f.scale)
        pruned += int(cut_a.sum()) + int(cut_b.sum())
        diff, old = update_change((f.scale * f.B, f.A), (f.scale * B, A))
        changed, total = changed + diff, total + old
    return EditResult(finetuned.with_modules(modules), {"method": "antidote", "sparsity": sparsity},
                      {"modules": len(modules), "repaired": len(modules), "pruned_entries": pruned,
                       "relative_change": (changed / total) ** 0.5 if total > 0 else 0.0})
