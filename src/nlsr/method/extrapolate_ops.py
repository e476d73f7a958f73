"""Step 1: the super-aligned reference by ExPO extrapolation (NLSR paper, Sec. 3.1).

If the medium aligned model is a mix ``W_a = α W_e + (1-α) W_0`` of an unknown stronger model and
the weak one, then ``W_e = (1+β) W_a - β W_0`` with ``β = (1-α)/α``. With LoRA on top of ``W_0``
this is ``ΔW_e = (1+β) ΔW_a``: keep ``A_e = A_a`` and set ``B_e = (1+β) B_a``.
"""

from __future__ import annotations

import torch


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
