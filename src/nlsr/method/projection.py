"""Step 2's math: safety-critical neurons by low-rank projection on safety activations (Sec. 3.2).

Entry granularity. For one LoRA module of the reference adapter, ``A_e`` maps each module input ``x_t``
to ``z_t = A_e x_t`` and ``B_e`` maps ``z_t`` to ``B_e z_t``. Over the response tokens of a safety
calibration set, keep the rank-k (``k = ceil(ρ r)``) output subspace of each map, project the
weights onto it, ``Â = U_A U_Aᵀ A_e`` and ``B̂ = U_B U_Bᵀ B_e``, and mark the top-q fraction of
``|Â|`` and ``|B̂|`` as safety-critical. Everything depends on the data only through the ``r x r``
Gram matrix ``G = Σ_t z_t z_tᵀ``: ``U_A`` is the top-k eigenvectors of ``G``; since
``Z_B Z_Bᵀ = B_e G B_eᵀ``, with the thin QR ``B_e = Q R`` the top-k eigenvectors ``V`` of ``R G Rᵀ``
give ``U_B = Q V``. This is exact (not an approximation of the authors' randomized SVD over stored
activations) and needs O(r²) memory.

Neuron granularity. An *output neuron* is row ``i`` of a module's weight, the same parameter in every
fine-tune of the same base. With the module inputs' covariance ``C = XᵀX`` and ``U_k`` its top-k
eigenvectors (``k = ceil(ρ rank(C))``), row ``i`` scores ``||ΔW[i] U_k||``, the part of neuron i's
update that the calibration inputs can excite; the top q fraction of rows is kept. For a LoRA
reference ``ΔW = s B A`` the score is ``s ||B[i] (A U_k)||``: the update is never formed.
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



class InputCovariance:
    """Streams ``C = Σ_t x_t x_tᵀ`` over batches of module inputs ``x`` (rows of width ``d_in``).

    ``dtype`` float32 halves the memory of float64 (``d_in²`` entries per distinct input); the
    eigenproblem is solved in float64 either way.
    """

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.cov = torch.zeros(dim, dim, dtype=dtype, device=device)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (``... x d_in``) to the covariance."""
        x = x.reshape(-1, x.shape[-1]).to(self.cov.dtype)
        self.cov.addmm_(x.T, x)
        self.count += x.shape[0]


def numerical_rank(eigenvalues: torch.Tensor, dim: int, dtype: torch.dtype) -> int:
    """How many eigenvalues exceed ``λ_max · dim · eps(dtype)`` (numpy's ``matrix_rank`` rule,
    with the precision the covariance was accumulated in)."""
    top = float(eigenvalues.max()) if eigenvalues.numel() else 0.0
    if top <= 0:
        return 0
    return int((eigenvalues > top * dim * torch.finfo(dtype).eps).sum())


def activation_subspace(cov: torch.Tensor, rho: float) -> torch.Tensor:
    """``U_k`` (``d_in x k``, float64): the top-k eigenvectors of the input covariance ``C``.

    ``k = ceil(ρ · rank(C))`` with the numerical rank of :func:`numerical_rank`, so that directions
    the calibration inputs never visit (zero eigenvalues, e.g. when ``N < d_in``) are never kept.
    An all-zero covariance (a module the pass never reached) gives ``k = 0``.
    """
    c = cov.to(torch.float64)
    c = (c + c.T) / 2
    values, vectors = torch.linalg.eigh(c)
    k = subspace_rank(numerical_rank(values, c.shape[0], cov.dtype), rho)
    return vectors[:, vectors.shape[1] - k:]


def row_scores_lowrank(B: torch.Tensor, A: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``||(B A U_k)[i]||`` per row (float64, ``d_out``) for an update ``B A`` (scale folded in B).

    Costs ``r · d_in · k + d_out · r · k``; the ``d_out x d_in`` update is never formed.
    """
    return (B.to(torch.float64) @ (A.to(torch.float64) @ basis)).norm(dim=1)


def row_scores_dense(delta: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``||ΔW[i] U_k||`` per row (float64, ``d_out``) for a dense update ``ΔW`` (``d_out x d_in``)."""
    return (delta.to(torch.float64) @ basis).norm(dim=1)


def top_rows(scores: torch.Tensor, q: float) -> torch.Tensor:
    """Boolean row mask of the ``ceil(q · d_out)`` largest scores (ties: first)."""
    return top_fraction_mask(scores, q)

