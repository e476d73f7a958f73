"""Step 3: which modules to repair (Sec. 3.3).

The similarity of a module's safety region in the reference and the fine-tuned adapter is the
cosine of the masked products, ``S = cos((M_B⊙B_e)(M_A⊙A_e), (M_B⊙B_t)(M_A⊙A_t))``, computed
from ``r x r`` matrices with ``<B1A1, B2A2>_F = tr((B1ᵀB2)(A2A1ᵀ))``; the ``d_out x d_in``
products are never formed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def product_inner(A1: torch.Tensor, B1: torch.Tensor, A2: torch.Tensor,
                  B2: torch.Tensor) -> torch.Tensor:
    """Frobenius inner product ``<B1 A1, B2 A2>_F = tr((B1ᵀ B2)(A2 A1ᵀ))`` in O(r²(d_in+d_out)).

    The two ``r x r`` matrices are formed in the factors' dtype and multiplied out in float64.
    """
    return torch.sum((B1.T @ B2).double() * (A1 @ A2.T).double())


def product_cosine(A1: torch.Tensor, B1: torch.Tensor, A2: torch.Tensor,
                   B2: torch.Tensor, eps: float = 1e-30) -> float:
    """Cosine between the flattened products ``B1 A1`` and ``B2 A2``, by trace identities."""
    inner = product_inner(A1, B1, A2, B2)
    norm1 = product_inner(A1, B1, A1, B1).clamp_min(0).sqrt()
    norm2 = product_inner(A2, B2, A2, B2).clamp_min(0).sqrt()
    return float(inner / (norm1 * norm2).clamp_min(eps))


def masked_similarity(A_e: torch.Tensor, B_e: torch.Tensor, A_t: torch.Tensor, B_t: torch.Tensor,
                      M_A: torch.Tensor, M_B: torch.Tensor) -> float:
    """``S_j``: cosine of the reference and fine-tuned products inside the safety masks."""
    return product_cosine(A_e * M_A, B_e * M_B, A_t * M_A, B_t * M_B)


# ---- selection rules: similarities -> (repair probability, repaired) per module ----

SelectionRule = Callable[..., tuple[torch.Tensor, torch.Tensor]]
SELECTION_RULES: dict[str, SelectionRule] = {}


def register_rule(name: str) -> Callable[[SelectionRule], SelectionRule]:
    """Register a selection rule under ``name`` (used by the CLI's ``--select``)."""
    def wrap(fn: SelectionRule) -> SelectionRule:
        SELECTION_RULES[name] = fn
        return fn
    return wrap


def normalized_rank(values: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """``u_j ∈ [0, 1]``: 0 for the smallest value (largest if ``descending``), 1 for the other end."""
    n = values.numel()
    order = torch.argsort(values, descending=descending, stable=True)
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    return ranks / max(n - 1, 1)


def _bernoulli(prob: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(prob.numel(), generator=gen, dtype=torch.float64) < prob


@register_rule("paper")
def select_paper(similarity: torch.Tensor, *, p_base: float = 0.5, epsilon: float = 0.2,
                 seed: int = 0, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's rule: the least similar module is repaired with probability ``P_L + ε``,
    the most similar with ``P_L - ε``, linearly in the normalized rank in between."""
    u = normalized_rank(similarity)
    prob = (p_base + epsilon - 2 * epsilon * u).clamp(0, 1)
    return prob, _bernoulli(prob, seed)


@register_rule("reverse")
def select_reverse(similarity: torch.Tensor, *, p_base: float = 0.5, epsilon: float = 0.2,
                   seed: int = 0, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' public code: the *most* similar module gets probability ``P_L + ε``."""
    u = normalized_rank(similarity, descending=True)
    prob = (p_base + epsilon - 2 * epsilon * u).clamp(0, 1)
    return prob, _bernoulli(prob, seed)


@register_rule("threshold")
def select_threshold(similarity: torch.Tensor, *, threshold: float | None = None,
                     **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Repair every module with ``S_j < τ``."""
    assert threshold is not None, "the threshold rule needs a threshold"
    repaired = similarity < threshold
    return repaired.to(torch.float64), repaired


@register_rule("all")
def select_all(similarity: torch.Tensor, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Repair every module (an ablation: transplant without layer selection)."""
    ones = torch.ones(similarity.numel(), dtype=torch.float64)
    return ones, ones.bool()
