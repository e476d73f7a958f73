"""Step 2: safety-critical neurons by low-rank projection on safety activations (Sec. 3.2).

For one LoRA module of the reference adapter, ``A_e`` maps each module input ``x_t`` to
``z_t = A_e x_t`` and ``B_e`` maps ``z_t`` to ``B_e z_t``. Over the response tokens of a safety
calibration set, keep the rank-k (``k = ceil(ρ r)``) output subspace of each map, project the
weights onto it, ``Â = U_A U_Aᵀ A_e`` and ``B̂ = U_B U_Bᵀ B_e``, and mark the top-q fraction of
``|Â|`` and ``|B̂|`` as safety-critical.

Everything depends on the data only through the ``r x r`` Gram matrix ``G = Σ_t z_t z_tᵀ``:
``U_A`` is the top-k eigenvectors of ``G``; since ``Z_B Z_Bᵀ = B_e G B_eᵀ``, with the thin QR
``B_e = Q R`` the top-k eigenvectors ``V`` of ``R G Rᵀ`` give ``U_B = Q V``. This is exact (not an
approximation of the authors' randomized SVD over stored activations) and needs O(r²) memory.
"""

from __future__ import annotations

import math

import torch


class GramAccumulator:
    """Streams ``G = Σ_t z_t z_tᵀ`` (float64) over batches of ``z`` rows of width ``r``."""

    def __init__(self, rank: int, device: torch.device | str = "cpu") -> None:
        self.gram = torch.zeros(rank, rank, dtype=torch.float64, device=device)
        self.count = 0

    def update(self, z: torch.Tensor) -> None:
        """Add the rows of ``z`` (``N x r``) to the Gram matrix."""
        z = z.reshape(-1, z.shape[-1]).to(torch.float64)
        self.gram.addmm_(z.T, z)
        self.count += z.shape[0]


def subspace_rank(rank: int, rho: float) -> int:
    """``k = ceil(ρ r)``, at least 1 and at most ``r``."""
    return min(rank, max(1, math.ceil(rho * rank - 1e-9)))


def top_eigenvectors(sym: torch.Tensor, k: int) -> torch.Tensor:
    """The eigenvectors of the ``k`` largest eigenvalues of a symmetric matrix, as columns."""
    _, vectors = torch.linalg.eigh(sym)
    return vectors[:, -k:]


def project_factors(A: torch.Tensor, B: torch.Tensor, gram: torch.Tensor,
                    rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(Â, B̂)``: ``A`` and ``B`` projected onto the top-k output subspaces.

    Args:
        A: ``r x d_in`` reference factor. B: ``d_out x r`` reference factor.
        gram: ``r x r`` Gram matrix of ``A``'s outputs on the calibration tokens.
        rho: fraction of the rank to keep, ``k = ceil(ρ r)``.
    """
    gram = gram.to(torch.float64)
    a64, b64 = A.to(torch.float64), B.to(torch.float64)
    k = subspace_rank(A.shape[0], rho)
    u_a = top_eigenvectors(gram, k)                      # r x k
    a_hat = u_a @ (u_a.T @ a64)
    q, r = torch.linalg.qr(b64)                          # d_out x r, r x r
    v = top_eigenvectors(r @ gram @ r.T, k)              # r x k
    b_hat = q @ (v @ (v.T @ r))                          # = U_B U_Bᵀ B with U_B = Q V
    return a_hat.to(A.dtype), b_hat.to(B.dtype)


def top_fraction_mask(values: torch.Tensor, q: float) -> torch.Tensor:
    """Boolean mask of the ``ceil(q · numel)`` entries of largest ``|values|`` (ties: first)."""
    flat = values.abs().flatten()
    count = min(flat.numel(), math.ceil(q * flat.numel() - 1e-9))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=values.device)
    if count > 0:
        mask[torch.topk(flat, count, sorted=False).indices] = True
    return mask.view_as(values)


def safety_masks(A: torch.Tensor, B: torch.Tensor, gram: torch.Tensor, rho: float,
                 q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks ``(M_A, M_B)`` of the safety-critical entries of one reference module."""
    a_hat, b_hat = project_factors(A, B, gram, rho)
    return top_fraction_mask(a_hat, q), top_fraction_mask(b_hat, q)
