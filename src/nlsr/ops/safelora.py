"""SafeLoRA (Hsu et al., NeurIPS 2024): project fine-tuned LoRA updates onto the alignment direction.

Per module, ``V = W_aligned - W_unaligned`` and ``C = V Vᵀ / ||V||_F`` (the official code's
normalisation). If ``cos(C ΔW, ΔW)`` is low, the update is replaced by ``C ΔW``, i.e. ``B ← C B``.
Here ``V = P Q`` is itself low rank (a difference of LoRA deltas), so ``C B`` and the cosine are
computed without any ``d_out x d_out`` or ``d_out x d_in`` matrix.
"""

from __future__ import annotations

import torch

from nlsr.ops.layers import product_cosine, product_inner


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
