"""Step 4: neuron transplant (Sec. 3.4).

Inside the safety masks take the reference's entries, outside keep the fine-tuned ones.

* ``exact`` (the paper's formula): ``ΔW'' = s[(M_B⊙B_e)(M_A⊙A_e) + ((1-M_B)⊙B_t)((1-M_A)⊙A_t)]``,
  itself a rank-2r LoRA with ``B'' = [M_B⊙B_e | (1-M_B)⊙B_t]`` and
  ``A'' = [M_A⊙A_e ; (1-M_A)⊙A_t]`` at the same scale ``s``.
* ``factor`` (the authors' code): ``A'' = (1-M_A)⊙A_t + M_A⊙A_e``, ``B'' = (1-M_B)⊙B_t + M_B⊙B_e``
  (rank r; the product mixes both adapters in cross terms).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Transplant = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                       torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
TRANSPLANTS: dict[str, Transplant] = {}


def register_transplant(name: str) -> Callable[[Transplant], Transplant]:
    """Register a transplant form under ``name`` (used by the CLI's ``--transplant``)."""
    def wrap(fn: Transplant) -> Transplant:
        TRANSPLANTS[name] = fn
        return fn
    return wrap


@register_transplant("exact")
def transplant_exact(A_e: torch.Tensor, B_e: torch.Tensor, A_t: torch.Tensor, B_t: torch.Tensor,
                     M_A: torch.Tensor, M_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-2r factors ``(A'', B'')`` whose product is exactly the paper's transplant."""
    A = torch.cat([A_e * M_A, A_t * ~M_A], dim=0)
    B = torch.cat([B_e * M_B, B_t * ~M_B], dim=1)
    return A, B


@register_transplant("factor")
def transplant_factor(A_e: torch.Tensor, B_e: torch.Tensor, A_t: torch.Tensor, B_t: torch.Tensor,
                      M_A: torch.Tensor, M_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors with the reference's entries swapped in inside the masks."""
    return torch.where(M_A, A_e, A_t), torch.where(M_B, B_e, B_t)
