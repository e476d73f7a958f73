"""Step 1: the super-aligned reference by ExPO extrapolation (NLSR paper, Sec. 3.1).

If the medium aligned model is a mix ``W_a = α W_e + (1-α) W_0`` of an unknown stronger model and
the weak one, then ``W_e = (1+β) W_a - β W_0`` with ``β = (1-α)/α``. With LoRA on top of ``W_0``
this is ``ΔW_e = (1+β) ΔW_a``: keep ``A_e = A_a`` and set ``B_e = (1+β) B_a``.
"""

from __future__ import annotations

import torch

from nlsr.errors import NlsrError
from nlsr.weights.adapters import LoraAdapter, LoraFactors


def extrapolate_factors(A: torch.Tensor, B: torch.Tensor, beta: float,
                        scale_both: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(A_e, B_e)`` with ``B_e A_e = (1+β) B A``.

    ``scale_both`` reproduces the authors' script, which multiplies *both* factors by ``1+β``
    (so the delta grows by ``(1+β)²``).
    """
    factor = 1.0 + beta
    if scale_both:
        return A * factor, B * factor
    return A.clone(), B * factor



def extrapolate(aligned: LoraAdapter, beta: float, scale_both: bool = False) -> LoraAdapter:
    """The reference adapter ``ΔW_e = (1+β) ΔW_a`` (``(1+β)² ΔW_a`` with ``scale_both``).

    Args:
        aligned: the safety-aligned adapter ``(A_a, B_a)`` on top of the weak model ``W_0``.
        beta: extrapolation strength β ≥ 0 (the paper reports 0.9).
        scale_both: scale both factors by ``1+β``, as the authors' script does.
    """
    if not beta >= 0:
        raise NlsrError(f"beta must be >= 0 (got {beta}); beta = 0 returns the aligned adapter")
    modules = {}
    for name, f in aligned:
        A, B = extrapolate_factors(f.A, f.B, beta, scale_both=scale_both)
        modules[name] = LoraFactors(A=A, B=B, scale=f.scale)
    return aligned.with_modules(modules)

