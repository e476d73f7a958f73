"""RESTA (Bhardwaj et al., 2024, "Language Models are Homer Simpson!"): restore safety after a
fine-tune by adding the safety vector back, ``W'' = W_t + γ V``, with no training.

Here the safety vector is the aligned adapter's update ``V = ΔW_a = s_a B_a A_a`` (what the DPO
alignment added on top of ``W_0``; the fine-tune is measured from the same ``W_0``), so the repaired
update is ``ΔW'' = ΔW_t + γ ΔW_a``: for LoRA factors the rank-2r adapter
``B'' = [B_t | γ (s_a / s_t) B_a]``, ``A'' = [A_t ; A_a]`` at the fine-tune's scale ``s_t``, a
standard PEFT adapter (per-module rank via ``rank_pattern``). γ is the knob (the paper adds the
vector once, γ = 1). The dense alignment direction (the SFT merged into ``W_0`` as well) is not used:
it has no low-rank form and the fine-tune never moved it.
"""
from __future__ import annotations

import torch

from nlsr.errors import NlsrError
from nlsr.method.checks import check_same_modules
from nlsr.method.controls import EditResult
from nlsr.method.similarity import update_change
from nlsr.weights.adapters import LoraAdapter, LoraFactors


def resta(aligned: LoraAdapter, finetuned: LoraAdapter, gamma: float = 1.0) -> EditResult:
    """``ΔW_t + γ ΔW_a`` in every module (rank ``r_t + r_a``); ``relative_change`` is
    ``||γ ΔW_a||_F / ||ΔW_t||_F`` over the adapter."""
    if not gamma >= 0:
        raise NlsrError(f"RESTA's gamma must be >= 0 (got {gamma})")
    check_same_modules(aligned, finetuned)
    modules, changed, total = {}, 0.0, 0.0
    for name, t in finetuned:
        a = aligned.modules[name]      # same modules and shapes (checked above); ranks may differ
        A = torch.cat([t.A, a.A.to(t.A.dtype)], dim=0)
        B = torch.cat([t.B, (gamma * a.scale / t.scale) * a.B.to(t.B.dtype)], dim=1)
        modules[name] = LoraFactors(A=A, B=B, scale=t.scale)
        diff, old = update_change((t.scale * t.B, t.A), (t.scale * B, A))
        changed, total = changed + diff, total + old
    return EditResult(finetuned.with_modules(modules), {"method": "resta", "gamma": gamma},
                      {"modules": len(modules), "repaired": len(modules),
                       "relative_change": (changed / total) ** 0.5 if total > 0 else 0.0})
