"""Step 3: which modules to repair (Sec. 3.3), from the per-module similarities of
:mod:`nlsr.method.similarity`.

A rule maps the similarities ``S_j`` to a repair probability and a draw per module. The paper's rule
repairs the least similar modules most often; the authors' public code ranks the other way round
(``reverse``); ``threshold`` and ``all`` are deterministic; ``random`` ignores the similarities
(a control).
"""
from __future__ import annotations

import torch

from nlsr.errors import NlsrError
from nlsr.method import SELECTION_RULES


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


def select_paper(similarity: torch.Tensor, *, p_base: float = 0.5, epsilon: float = 0.2,
                 seed: int = 0, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's rule: the least similar module is repaired with probability ``P_L + ε``,
    the most similar with ``P_L - ε``, linearly in the normalized rank in between."""
    u = normalized_rank(similarity)
    prob = (p_base + epsilon - 2 * epsilon * u).clamp(0, 1)
    return prob, _bernoulli(prob, seed)


def select_reverse(similarity: torch.Tensor, *, p_base: float = 0.5, epsilon: float = 0.2,
                   seed: int = 0, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' public code: the *most* similar module gets probability ``P_L + ε``."""
    u = normalized_rank(similarity, descending=True)
    prob = (p_base + epsilon - 2 * epsilon * u).clamp(0, 1)
    return prob, _bernoulli(prob, seed)


def select_threshold(similarity: torch.Tensor, *, threshold: float | None = None,
                     **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Repair every module with ``S_j < τ``."""
    assert threshold is not None, "the threshold rule needs a threshold"
    repaired = similarity < threshold
    return repaired.to(torch.float64), repaired


def select_all(similarity: torch.Tensor, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Repair every module (an ablation: transplant without layer selection)."""
    ones = torch.ones(similarity.numel(), dtype=torch.float64)
    return ones, ones.bool()


def select_random(similarity: torch.Tensor, *, p_base: float = 0.5, seed: int = 0,
                  **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Repair each module with probability ``P_L`` (0.5 by default), ignoring the similarities: the
    control of the layer selection (a random half of the modules; the seed draws which)."""
    prob = torch.full((similarity.numel(),), float(p_base), dtype=torch.float64)
    return prob, _bernoulli(prob, seed)


def check_rule(select: str, threshold: float | None, p_base: float, epsilon: float, **_: object) -> None:
    """Refuse an unknown rule, a threshold rule without τ, or probabilities outside [0, 1]."""
    SELECTION_RULES.check(select)
    if select == "threshold" and threshold is None:
        raise NlsrError("the 'threshold' rule needs --threshold T (repair modules with S < T)")
    if not (p_base - epsilon >= 0 and p_base + epsilon <= 1):
        raise NlsrError(f"p_base ± epsilon must stay in [0, 1] (got {p_base} ± {epsilon})")


def decide(similarity: torch.Tensor, *, select: str, threshold: float | None = None, p_base: float = 0.5,
           epsilon: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(repair probability, repaired)`` per module by the rule ``select`` (checked first)."""
    check_rule(select, threshold, p_base, epsilon)
    return SELECTION_RULES.get(select)(similarity, p_base=p_base, epsilon=epsilon, seed=seed, threshold=threshold)
