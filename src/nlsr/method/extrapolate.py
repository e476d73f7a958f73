"""Step 1 on whole adapters: the ExPO super-aligned reference."""

from __future__ import annotations

from nlsr.errors import NlsrError
from nlsr.method.extrapolate_ops import extrapolate_factors
from nlsr.weights.adapters import LoraAdapter, LoraFactors


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
