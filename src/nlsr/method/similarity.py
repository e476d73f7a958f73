"""Step 3's measurement: how far the fine-tune drifted inside the safety masks.

The similarity of a module's safety region in the reference and the fine-tuned adapter is the
cosine of the masked products, ``S = cos((M_B⊙B_e)(M_A⊙A_e), (M_B⊙B_t)(M_A⊙A_t))`` (entry masks),
or ``S = cos(diag(m) ΔW_ref, diag(m) ΔW_ft)`` (row masks), computed from ``r x r`` matrices with
``<B1A1, B2A2>_F = tr((B1ᵀB2)(A2A1ᵀ))``; the ``d_out x d_in`` products are never formed.

On CPU (:func:`masked_similarities`) each side's masked factors are written once and each of the
three numbers of a cosine is a pair of ``r x r`` products (:func:`gram_inner`; a side's own norm is a
symmetric rank-k update, BLAS ``?syrk``, half the flops); the reference's side is the same for every
fine-tune and a batch makes it once (:func:`mask_reference`). On other devices one Gram matrix per
side of the stacked factors ``B = [B1 | B2]``, ``A = [A1 ; A2]`` holds all three in its ``r x r``
blocks: ``<BᵢAᵢ, BⱼAⱼ>_F = Σ (G_B ⊙ G_A)`` over block ``(i, j)``. How much a repair changed an update
is the squared norm of a sum of low-rank terms (:func:`lowrank_sq`). For full weights (model
directories) the row-masked sums are accumulated block by block (:func:`dense_row_sums`).
"""
from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

LowRank = tuple[torch.Tensor, torch.Tensor]  # (B: d_out x r, A: r x d_in), product B @ A


def product_inner(A1: torch.Tensor, B1: torch.Tensor, A2: torch.Tensor,
                  B2: torch.Tensor) -> torch.Tensor:
    """Frobenius inner product ``<B1 A1, B2 A2>_F = tr((B1ᵀ B2)(A2 A1ᵀ))`` in O(r²(d_in+d_out)).

    The two ``r x r`` matrices are formed in the factors' dtype and multiplied out in float64.
    """
    return torch.sum((B1.T @ B2).double() * (A1 @ A2.T).double())


def product_cosine(A1: torch.Tensor, B1: torch.Tensor, A2: torch.Tensor,
                   B2: torch.Tensor, eps: float = 1e-30) -> float:
    """Cosine between the flattened products ``B1 A1`` and ``B2 A2``, by trace identities.

    One Gram matrix per side of the stacked factors ``[B1 | B2]`` and ``[A1 ; A2]`` (module
    docstring), in float32 (float64 if a factor is float64), summed in float64.
    """
    with torch.no_grad(), _one_blas_thread():
        sums = _stacked_sums(A1, B1, A2, B2, None, None, {})
    return float(_cosine(*torch.tensor([float(x) for x in sums], dtype=torch.float64), eps))


def masked_similarity(A_e: torch.Tensor, B_e: torch.Tensor, A_t: torch.Tensor, B_t: torch.Tensor,
                      M_A: torch.Tensor, M_B: torch.Tensor) -> float:
    """``S_j``: cosine of the reference and fine-tuned products inside the safety masks."""
    return float(masked_similarities([(A_e, B_e, A_t, B_t, M_A, M_B)], workers=1)[0])


ModuleFactors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class MaskedFactors:
    """One side of a module's masked product ``(M_B⊙B)(M_A⊙A)``, ready to score: both masked factors
    as contiguous float32 numpy arrays (float64 for float64 factors) and the squared norm of their
    product. A reference's sides are the same for every fine-tune it is compared with, so a batch
    makes them once (:func:`mask_reference`) and :func:`masked_similarities` takes them as made."""

    B: np.ndarray
    A: np.ndarray
    sq: float | None        # None when made without it (``mask_factors(..., norm=False)``)


def wide_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU factor as numpy, float32 (float64 kept; bf16/fp16 widened: a copy)."""
    t = t.detach()
    return (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()


def gram_inner(B1: np.ndarray, A1: np.ndarray, B2: np.ndarray, A2: np.ndarray) -> float:
    """``<B1 A1, B2 A2>_F = Σ (B1ᵀB2) ⊙ (A1A2ᵀ)``: two ``r x r`` products in the factors' dtype (BLAS
    ``?syrk`` when a pair is one array), multiplied out in float64."""
    return float(((B1.T @ B2).astype(np.float64) * (A1 @ A2.T)).sum())


def lowrank_sq(terms: Sequence[tuple[np.ndarray, np.ndarray]], grams: dict | None = None) -> float:
    """``||Σ Bᵢ Aᵢ||_F²`` of a sum of low-rank terms ``(Bᵢ, Aᵢ)`` (numpy), from their pairwise Gram
    inner products. Accurate to the float32 rounding of the terms themselves: when the sum is small
    because each term is small (a repair that changed little, written as its differences), nothing
    cancels. A factor shared by several terms (the same array) has each ``r x r`` product formed once;
    ``grams`` (from :func:`gram_products`) keeps them for the caller's other sums."""
    grams = {} if grams is None else grams
    total = 0.0
    for i, (B1, A1) in enumerate(terms):
        total += gram_sum(B1, A1, B1, A1, grams)
        for B2, A2 in terms[i + 1:]:
            total += 2 * gram_sum(B1, A1, B2, A2, grams)
    return max(total, 0.0)


def gram_sum(B1: np.ndarray, A1: np.ndarray, B2: np.ndarray, A2: np.ndarray, grams: dict) -> float:
    """:func:`gram_inner` with each ``r x r`` product (``B1ᵀB2``, ``A1A2ᵀ``) taken from ``grams`` or
    formed and kept there, by the arrays' identities (the caller keeps the arrays alive while it uses
    ``grams``)."""
    return float((gram_product(B1, B2, grams, left=True).astype(np.float64)
                  * gram_product(A1, A2, grams, left=False)).sum())


def gram_product(x: np.ndarray, y: np.ndarray, grams: dict, left: bool) -> np.ndarray:
    """``xᵀy`` (``left``: B factors) or ``xyᵀ`` (A factors), memoised in ``grams``; the product of the
    swapped pair is the transpose of one already formed."""
    key = (id(x), id(y), left)
    if key not in grams:
        swapped = grams.get((id(y), id(x), left))
        if swapped is not None:
            return swapped.T
        grams[key] = x.T @ y if left else x @ y.T
    return grams[key]


def mask_factors(A: torch.Tensor, B: torch.Tensor, M_A: torch.Tensor, M_B: torch.Tensor,
                 buffers: dict | None = None, norm: bool = True) -> MaskedFactors:
    """``M_B⊙B`` and ``M_A⊙A`` (CPU; widened to float32 as :func:`wide_numpy`), written into
    ``buffers`` (reused by every module of the same shape) or new arrays, and (``norm``) their
    product's squared norm."""
    a, b = wide_numpy(A), wide_numpy(B)
    key = (a.shape, b.shape, a.dtype)
    if buffers is None:
        out_b, out_a = np.empty(b.shape, b.dtype), np.empty(a.shape, a.dtype)
    else:
        if key not in buffers:
            buffers[key] = (np.empty(b.shape, b.dtype), np.empty(a.shape, a.dtype))
        out_b, out_a = buffers[key]
    np.multiply(b, M_B.numpy(), out=out_b)
    np.multiply(a, M_A.numpy(), out=out_a)
    return MaskedFactors(out_b, out_a, gram_inner(out_b, out_a, out_b, out_a) if norm else None)


def mask_reference(modules: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                   workers: int | None = None) -> list[MaskedFactors]:
    """:class:`MaskedFactors` of each ``(A_e, B_e, M_A, M_B)`` (own arrays, not buffers), for
    :func:`masked_similarities` ``references``."""
    return cpu_map(lambda m: mask_factors(*m), modules, workers)


@torch.no_grad()
def masked_similarities(modules: Sequence[ModuleFactors], eps: float = 1e-30,
                        workers: int | None = None,
                        references: Sequence[MaskedFactors | None] | None = None) -> torch.Tensor:
    """``S_j`` of many modules: a float64 vector, one entry per ``(A_e, B_e, A_t, B_t, M_A, M_B)``;
    the cosines of :func:`masked_similarity_sums`."""
    return cosines_of_sums(masked_similarity_sums(modules, workers, references), eps)


def cosines_of_sums(sums: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """The cosine of each row ``(<P1, P2>, ||P1||², ||P2||²)`` of ``sums``, a float64 vector."""
    return _cosine(*sums.unbind(1), eps)


@torch.no_grad()
def masked_similarity_sums(modules: Sequence[ModuleFactors], workers: int | None = None,
                           references: Sequence[MaskedFactors | None] | None = None) -> torch.Tensor:
    """The three sums of each module's ``S_j``, ``(<P_e, P_t>, ||P_e||², ||P_t||²)`` of the masked
    products ``P = (M_B⊙B)(M_A⊙A)``: a float64 ``n x 3`` tensor.

    Their cosines equal :func:`masked_similarity` module by module. On CPU each side's masked factors
    are written once (:func:`mask_factors`) into buffers reused by every module of the same shape (a model
    repeats a handful of shapes), so nothing of size ``d`` is allocated per module; the reference's
    side is taken from ``references`` where given (the same numbers, made once for a batch of
    fine-tunes). Then ``r x r`` Gram products give the inner product and the fine-tune's norm
    (:func:`gram_inner`; ``?syrk`` for a factor with itself). Gram matrices are float32 (float64 for
    float64 factors; bf16/fp16 factors are widened to float32) and every sum after them is float64:
    the result agrees with a float64 dense reference to about 1e-7.

    On CPU the work runs in numpy, whose BLAS releases the GIL: ``workers`` threads (default
    ``torch.get_num_threads()``) each take whole modules, with single-threaded BLAS. That keeps the
    cores busy without a barrier per operation, which matters on a shared machine: there a
    multi-threaded operation stalls whenever another process holds one of its cores. Modules on
    another device run the same computation in torch (stacked Gram matrices, module docstring), one
    after another.
    """
    modules = list(modules)
    if not modules:
        return torch.empty(0, 3, dtype=torch.float64)
    sums: list = [None] * len(modules)
    on_cpu = [i for i, m in enumerate(modules) if all(t.device.type == "cpu" for t in m)]
    device_buffers: dict = {}
    for i in sorted(set(range(len(modules))) - set(on_cpu)):
        sums[i] = torch.stack(_stacked_sums(*modules[i], device_buffers)).cpu()

    local = threading.local()          # each worker thread keeps its own buffers

    def cpu_sums(i: int) -> torch.Tensor:
        if not hasattr(local, "buffers"):
            local.buffers = ({}, {})
        A_e, B_e, A_t, B_t, M_A, M_B = modules[i]
        ref = references[i] if references is not None else None
        if ref is None:
            ref = mask_factors(A_e, B_e, M_A, M_B, local.buffers[0])
        ft = mask_factors(A_t, B_t, M_A, M_B, local.buffers[1])
        return torch.tensor([gram_inner(ref.B, ref.A, ft.B, ft.A), ref.sq, ft.sq], dtype=torch.float64)

    for i, row in zip(on_cpu, cpu_map(cpu_sums, on_cpu, workers), strict=True):
        sums[i] = row
    return torch.stack(sums)


@torch.no_grad()
def flat_cosines(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 workers: int | None = None) -> torch.Tensor:
    """Entry-wise cosine of each pair of equally shaped tensors, as a float64 vector.

    Dot products in the tensors' dtype (float32 factors: float32, accurate enough for a
    plausibility check), on CPU in numpy threads with single-threaded BLAS like
    :func:`masked_similarities`.
    """
    pairs = list(pairs)

    def cosine(i: int) -> float:
        x, y = pairs[i]
        if x.device.type == "cpu" and y.device.type == "cpu":     # bf16 (a fine-tune as stored): float32
            x, y = (t if t.dtype in (torch.float32, torch.float64) else t.float() for t in (x, y))
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
            x, y = x.flatten(), y.flatten()
            return float(torch.dot(x, y) / (torch.dot(x, x) * torch.dot(y, y)).sqrt().clamp_min(1e-30))
        a, b = x.detach().numpy().reshape(-1), y.detach().numpy().reshape(-1)
        return float(np.dot(a, b)) / max(float(np.dot(a, a) * np.dot(b, b)) ** 0.5, 1e-30)

    return torch.tensor(cpu_map(cosine, range(len(pairs)), workers), dtype=torch.float64)


def _cosine(inner: torch.Tensor, sq1: torch.Tensor, sq2: torch.Tensor, eps: float) -> torch.Tensor:
    return inner / (sq1.clamp_min(0).sqrt() * sq2.clamp_min(0).sqrt()).clamp_min(eps)


@functools.cache
def _blas_controller():
    """threadpoolctl's controller of the loaded BLAS libraries (numpy's), or None without it."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:           # pragma: no cover - threadpoolctl comes with scikit-learn
        return None
    return ThreadpoolController()


def _one_blas_thread():
    """A context in which numpy's BLAS runs single-threaded (a no-op without threadpoolctl)."""
    controller = _blas_controller()
    return controller.limit(limits=1, user_api="blas") if controller else contextlib.nullcontext()


def cpu_map(fn: Callable, items: Sequence, workers: int | None = None) -> list:
    """``[fn(x) for x in items]``, on ``workers`` threads (default ``torch.get_num_threads()``)
    that each run single-threaded BLAS (numpy's BLAS is limited to one thread process-wide while
    they run); ``fn`` must release the GIL for its heavy work, as numpy does. Without threadpoolctl,
    one thread with multi-threaded BLAS instead."""
    items = list(items)
    workers = min(max(1, workers or torch.get_num_threads()), len(items))
    if _blas_controller() is None or workers <= 1:
        with _one_blas_thread() if workers == 1 else contextlib.nullcontext():
            return [fn(x) for x in items]
    with _one_blas_thread(), ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def _stacked_sums(A1: torch.Tensor, B1: torch.Tensor, A2: torch.Tensor, B2: torch.Tensor,
                  M_A: torch.Tensor | None, M_B: torch.Tensor | None, buffers: dict) -> tuple:
    """``(<P1, P2>, ||P1||², ||P2||²)`` of ``Pᵢ = (M_B⊙Bᵢ)(M_A⊙Aᵢ)`` (no mask: ``Pᵢ = BᵢAᵢ``).

    ``<BᵢAᵢ, BⱼAⱼ>_F = tr((BᵢᵀBⱼ)(AⱼAᵢᵀ)) = Σ (BᵢᵀBⱼ) ⊙ (AᵢAⱼᵀ)``, the sum over block ``(i, j)`` of
    ``G_B ⊙ G_A`` with ``G_B = [B1 | B2]ᵀ[B1 | B2]`` and ``G_A = [A1 ; A2][A1 ; A2]ᵀ``, both widened
    to float64 before the product. ``buffers`` holds the stacked factors between calls, by shape.
    CPU tensors go through numpy (float64 scalars back), others through torch (0-d tensors).
    """
    (r1, d_in), r2, d_out = A1.shape, A2.shape[0], B1.shape[0]
    wide = any(t.dtype == torch.float64 for t in (A1, B1, A2, B2))
    cpu = all(t.device.type == "cpu" for t in (A1, B1, A2, B2))
    if cpu:
        dtype = np.float64 if wide else np.float32
        key = (r1, r2, d_in, d_out, dtype)
        if key not in buffers:
            buffers[key] = (np.empty((d_out, r1), dtype), np.empty((d_out, r2), dtype),
                            np.empty((r1 + r2, d_in), dtype))
        # B's two halves in buffers of their own: writing r-wide rows into a 2r-wide buffer is a
        # strided copy, several times slower than a contiguous one.
        Bl, Br, A = buffers[key]
        for dst, factor, mask in ((Bl, B1, M_B), (Br, B2, M_B), (A[:r1], A1, M_A), (A[r1:], A2, M_A)):
            src = factor.detach()
            src = (src if src.dtype in (torch.float32, torch.float64) else src.float()).numpy()
            if mask is None:
                np.copyto(dst, src)
            else:
                np.multiply(src, mask.numpy(), out=dst)
        # numpy multiplies a matrix by its own transpose with BLAS ?syrk and mirrors the triangle.
        G_A = A @ A.T
        blocks = ((Bl, Br, G_A[:r1, r1:]), (Bl, Bl, G_A[:r1, :r1]), (Br, Br, G_A[r1:, r1:]))
        return tuple(((x.T @ y).astype(np.float64) * g).sum() for x, y, g in blocks)
    else:
        dtype = torch.float64 if wide else torch.float32
        key = (r1, r2, d_in, d_out, dtype, A1.device)
        if key not in buffers:
            buffers[key] = (torch.empty(d_out, r1 + r2, dtype=dtype, device=A1.device),
                            torch.empty(r1 + r2, d_in, dtype=dtype, device=A1.device))
        B, A = buffers[key]
        for dst, factor, mask in ((B[:, :r1], B1, M_B), (B[:, r1:], B2, M_B),
                                  (A[:r1], A1, M_A), (A[r1:], A2, M_A)):
            if mask is None:
                dst.copy_(factor)
            else:
                torch.mul(factor, mask.to(factor.device), out=dst)
        product = (B.T @ B).double() * (A @ A.T).double()
    return product[:r1, r1:].sum(), product[:r1, :r1].sum(), product[r1:, r1:].sum()



# update_change recomputes in float64 when the change is below this share of ||BA||² + ||B'A'||²: there
# float32 Gram sums (relative error ~1e-6 of each term) would no longer resolve the difference
_WIDEN_BELOW = 1e-2


@torch.no_grad()
def update_change(old: LowRank, new: LowRank) -> tuple[float, float]:
    """``(||B'A' - BA||_F², ||BA||_F²)`` of two low-rank updates ``(B, A)`` of one module (scales folded
    into ``B``; the ranks may differ), by the trace identities: no ``d_out x d_in`` product is formed.

    The difference is ``||B'A'||² + ||BA||² - 2<B'A', BA>``. It is computed in the factors' precision
    (float32 for bf16 or float32 factors) and, where it is small against its terms (below 1% of
    ``||BA||² + ||B'A'||²``: a transplant that keeps most of the update, such as ``block`` against
    itself), again in float64, where the three terms carry enough digits to resolve it (float32 alone
    would leave a spurious relative change of about 1e-4). A change of many percent, the usual case,
    costs one float32 pass."""
    with torch.no_grad(), _one_blas_thread():
        inner, sq_old, sq_new = (float(x) for x in _stacked_sums(old[1], old[0], new[1], new[0], None, None, {}))
        if sq_old + sq_new - 2 * inner < _WIDEN_BELOW * (sq_old + sq_new):
            (b_old, a_old), (b_new, a_new) = ((b.double(), a.double()) for b, a in (old, new))
            inner, sq_old, sq_new = (float(x) for x in
                                     _stacked_sums(a_old, b_old, a_new, b_new, None, None, {}))
    return max(sq_old + sq_new - 2 * inner, 0.0), sq_old


def row_masked_similarities(modules: Sequence[tuple[LowRank, LowRank, torch.Tensor]],
                            workers: int | None = None) -> torch.Tensor:
    """``S_j = cos(diag(m) B_r A_r, diag(m) B_f A_f)`` per ``((B_r, A_r), (B_f, A_f), m)``,
    as a float64 vector (ranks may differ between the two sides)."""
    everything = torch.ones(1, 1, dtype=torch.bool)  # no column mask on A: broadcast
    return masked_similarities(
        [(a_r, b_r, a_f, b_f, everything, m.reshape(-1, 1)) for (b_r, a_r), (b_f, a_f), m in modules],
        workers=workers)


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

