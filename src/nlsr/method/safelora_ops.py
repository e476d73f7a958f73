"""SafeLoRA (Hsu et al., NeurIPS 2024): project fine-tuned LoRA updates onto the alignment direction.

Per module, ``V = W_aligned - W_unaligned`` and ``C = V Vᵀ / ||V||_F`` (the official code's
normalisation). If ``cos(C ΔW, ΔW)`` is low, the update is replaced by ``C ΔW``, i.e. ``B ← C B``.
Here ``V = P Q`` is itself low rank (a difference of LoRA deltas), so ``C B`` and the cosine are
computed without any ``d_out x d_out`` or ``d_out x d_in`` matrix.
"""

from __future__ import annotations

import torch

from nlsr.method.select import product_cosine, product_inner


def projected_B(P: torch.Tensor, Q: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``C B`` with ``C = V Vᵀ / ||V||_F`` and ``V = P Q`` (``P: d_out x m``, ``Q: m x d_in``)."""
    P64, Q64, B64 = P.double(), Q.double(), B.double()
    norm = product_inner(Q64, P64, Q64, P64).clamp_min(0).sqrt().clamp_min(1e-30)
    return (P64 @ ((Q64 @ Q64.T) @ (P64.T @ B64)) / norm).to(B.dtype)


def projection_cosine(P: torch.Tensor, Q: torch.Tensor, A: torch.Tensor,
                      B: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(cos(C ΔW, ΔW), C B)`` for an update ``ΔW ∝ B A``."""
    cb = projected_B(P, Q, B)
    return product_cosine(A, cb, A, B), cb


def projected_dense(V: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``C ΔW`` with ``C = V Vᵀ / ||V||_F`` for dense ``V`` and ``ΔW`` (``d_out x d_in``), float64.

    Multiplies in the cheaper order: ``(V Vᵀ) ΔW`` (``4 d_out² d_in`` flops) when ``d_out <= d_in``,
    else ``V (Vᵀ ΔW)`` (``4 d_out d_in²``); no ``d_out x d_out`` matrix in the second case.
    """
    V64, D64 = V.to(torch.float64), delta.to(torch.float64)
    norm = V64.norm().clamp_min(1e-30)
    if V.shape[0] <= V.shape[1]:
        return (V64 @ V64.T) @ D64 / norm
    return V64 @ (V64.T @ D64) / norm
