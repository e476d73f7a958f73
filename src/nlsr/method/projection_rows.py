"""Neuron granularity, step 2: the output neurons (weight rows) that carry the reference's update.

An *output neuron* of a module is row ``i`` of its weight; it is the same parameter in every
fine-tune of the same base, whatever its LoRA factors, so masks over rows apply to fresh LoRAs of
any rank and to full fine-tunes alike.

The principle is the paper's (Sec. 3.2): keep the part of the reference's update that acts on the
subspace the module's inputs occupy on the safety calibration data, and mark the strongest q
fraction. With the module inputs ``X`` (``N x d_in``, response tokens only) and the covariance
``C = XᵀX``, let ``U_k`` hold the top-k eigenvectors of ``C`` (``k = ceil(ρ rank(C))``). The
projected update is ``ΔŴ = ΔW U_k U_kᵀ`` and row ``i`` scores ``||ΔŴ[i]|| = ||ΔW[i] U_k||``,
the part of neuron i's update that the calibration inputs can excite. ``C`` is accumulated in one
streaming pass (``d_in x d_in`` per distinct module input) and is exact: ``U_k`` equals the top
right singular vectors of the stored ``X`` (a test checks it).

For a LoRA reference ``ΔW = s B A`` the scores are ``s ||B[i] (A U_k)||``: the ``d_out x d_in``
update is never formed.
"""

from __future__ import annotations

import torch

from nlsr.method.projection import subspace_rank, top_fraction_mask


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
