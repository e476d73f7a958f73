"""Neuron granularity, steps 3-4: row-masked similarity and the row transplant.

With a row mask ``m`` (``d_out``, the reference's safety neurons), a repaired module keeps the
reference's update in the masked rows and the fine-tune's elsewhere:

    ΔW''[i] = ΔW_ref[i] if m_i else ΔW_ft[i].

For low-rank updates ``ΔW_ref = B_r A_r`` and ``ΔW_ft = B_f A_f`` (scales folded into ``B``) this is
the LoRA of rank ``r_r + r_f``

    B'' = [diag(m) B_r | diag(1-m) B_f] / s'',   A'' = [A_r ; A_f],

whatever the two ranks and initialisations; for full weights it is a row copy. The similarity of a
module, ``S = cos(diag(m) ΔW_ref, diag(m) ΔW_ft)``, uses the trace identity
``<B1 A1, B2 A2>_F = tr((B1ᵀB2)(A2A1ᵀ))`` through :func:`nlsr.method.select.masked_similarities`
(the row mask broadcast over the columns of ``B``); no ``d_out x d_in`` product is formed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from nlsr.method.select import masked_similarities

LowRank = tuple[torch.Tensor, torch.Tensor]  # (B: d_out x r, A: r x d_in), product B @ A


def subtract_lowrank(first: LowRank, second: LowRank) -> LowRank:
    """``B1 A1 - B2 A2`` as low-rank factors: rank r when ``A1`` equals ``A2`` (then
    ``(B1 - B2) A1``, as for an ExPO reference minus its aligned adapter), else the stacked
    ``[B1 | -B2] [A1 ; A2]``."""
    (b1, a1), (b2, a2) = first, second
    if a1.shape == a2.shape and torch.equal(a1, a2):
        return b1 - b2, a1
    return torch.cat([b1, -b2], dim=1), torch.cat([a1, a2], dim=0)


@torch.no_grad()
def row_masked_similarities(modules: Sequence[tuple[LowRank, LowRank, torch.Tensor]],
                            workers: int | None = None) -> torch.Tensor:
    """``S_j = cos(diag(m) B_r A_r, diag(m) B_f A_f)`` per ``((B_r, A_r), (B_f, A_f), m)``,
    as a float64 vector (ranks may differ between the two sides)."""
    everything = torch.ones(1, 1, dtype=torch.bool)  # no column mask on A: broadcast
    return masked_similarities(
        [(a_r, b_r, a_f, b_f, everything, m.reshape(-1, 1)) for (b_r, a_r), (b_f, a_f), m in modules],
        workers=workers)


def row_transplant_lowrank(reference: LowRank, finetuned: LowRank, rows: torch.Tensor,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A'', B'')`` with ``scale · B'' A'' = diag(m) B_r A_r + diag(1-m) B_f A_f``.

    Args:
        reference, finetuned: ``(B, A)`` with the LoRA scale folded into ``B``.
        rows: bool ``d_out`` mask, True where the reference's row is taken.
        scale: the PEFT scale ``s''`` the output adapter declares for this module.
    Returns:
        ``A''`` (``(r_r + r_f) x d_in``) and ``B''`` (``d_out x (r_r + r_f)``).
    """
    (b_r, a_r), (b_f, a_f) = reference, finetuned
    m = rows.reshape(-1, 1).to(b_r.dtype)
    B = torch.cat([b_r * m, b_f * (1 - m)], dim=1) / scale
    return torch.cat([a_r, a_f], dim=0), B


def row_transplant_dense(reference: torch.Tensor, finetuned: torch.Tensor,
                         rows: torch.Tensor) -> torch.Tensor:
    """``finetuned`` with the masked rows replaced by ``reference``'s (cast to its dtype); the other
    rows are the fine-tune's values bit for bit."""
    return torch.where(rows.reshape(-1, 1), reference.to(finetuned.dtype), finetuned)


def dense_row_sums(reference_delta: torch.Tensor, finetuned_delta: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:
    """``(<P_r, P_f>, ||P_r||², ||P_f||²)`` (float64) of ``P = diag(m) ΔW`` for one block of rows;
    sums over row blocks give a module's similarity."""
    r = reference_delta[rows].to(torch.float64)
    f = finetuned_delta[rows].to(torch.float64)
    return torch.stack([(r * f).sum(), (r * r).sum(), (f * f).sum()])


def cosine_of_sums(sums: torch.Tensor, eps: float = 1e-30) -> float:
    """The cosine from :func:`dense_row_sums` totals."""
    inner, sq_r, sq_f = (float(x) for x in sums)
    return inner / max((max(sq_r, 0.0) ** 0.5) * (max(sq_f, 0.0) ** 0.5), eps)
