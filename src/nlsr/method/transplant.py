"""Step 4: neuron transplant (Sec. 3.4).

Inside the safety masks take the reference's entries, outside keep the fine-tuned ones.

Entry masks (``M_A``, ``M_B`` over the LoRA factors; the fine-tune continued the aligned adapter):

* ``exact`` (the paper's formula): ``ΔW'' = s[(M_B⊙B_e)(M_A⊙A_e) + ((1-M_B)⊙B_t)((1-M_A)⊙A_t)]``,
  itself a rank-2r LoRA with ``B'' = [M_B⊙B_e | (1-M_B)⊙B_t]`` and
  ``A'' = [M_A⊙A_e ; (1-M_A)⊙A_t]`` at the same scale ``s``.
* ``factor`` (the authors' code): ``A'' = (1-M_A)⊙A_t + M_A⊙A_e``, ``B'' = (1-M_B)⊙B_t + M_B⊙B_e``
  (rank r; the product mixes both adapters in cross terms).
* ``block`` (an identity when nothing drifted): ``ΔW'' = ΔW_t + s[(M_B⊙B_e)(M_A⊙A_e) - (M_B⊙B_t)(M_A⊙A_t)]``:
  the fine-tune's masked block is swapped for the reference's and every other term of ``ΔW_t``, the
  cross terms included, is kept. A rank-3r LoRA ``B'' = [B_t | M_B⊙B_e | -(M_B⊙B_t)]``,
  ``A'' = [A_t ; M_A⊙A_e ; M_A⊙A_t]``. ``exact`` drops the cross terms
  ``(M_B⊙B_t)((1-M_A)⊙A_t) + ((1-M_B)⊙B_t)(M_A⊙A_t)``, so repairing an adapter against itself
  changes it; ``block`` (and ``factor``) leave it as it is (:func:`self_transplant_change`).

Row masks (``m`` over output neurons; any fine-tune of the same base): ``ΔW''[i] = ΔW_ref[i]`` for
masked rows and ``ΔW_ft[i]`` otherwise. For low-rank updates ``ΔW_ref = B_r A_r`` and
``ΔW_ft = B_f A_f`` (scales folded into ``B``) this is the LoRA of rank ``r_r + r_f``
``B'' = [diag(m) B_r | diag(1-m) B_f] / s''``, ``A'' = [A_r ; A_f]`` (:func:`row_transplant_lowrank`);
for full weights a row copy (:func:`row_transplant_dense`).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from nlsr.method.similarity import LowRank, MaskedFactors


def transplant_exact(A_e: torch.Tensor, B_e: torch.Tensor, A_t: torch.Tensor, B_t: torch.Tensor,
                     M_A: torch.Tensor, M_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-2r factors ``(A'', B'')`` whose product is exactly the paper's transplant.

    Each masked factor is written once, straight into its half of the output (no temporary
    copies). The four writes of a large module run on ``torch.get_num_threads()`` threads, the
    largest first: writing fresh memory is bound by memory and page faults, not arithmetic.
    """
    r = A_e.shape[0]
    A = torch.empty(2 * r, A_e.shape[1], dtype=torch.result_type(A_e, A_t), device=A_e.device)
    B = torch.empty(B_e.shape[0], 2 * r, dtype=torch.result_type(B_e, B_t), device=B_e.device)
    writes = sorted([(A[:r], A_e, M_A, True), (A[r:], A_t, M_A, False),
                     (B[:, :r], B_e, M_B, True), (B[:, r:], B_t, M_B, False)],
                    key=lambda w: -w[0].numel())
    workers = torch.get_num_threads()
    if workers > 1 and A.numel() + B.numel() >= _PARALLEL_MIN and _numpy_ok(A, B, A_e, A_t, B_e, B_t):
        with ThreadPoolExecutor(min(workers, len(writes))) as pool:
            list(pool.map(lambda w: _masked_into(*w), writes))      # numpy releases the GIL
    else:
        for write in writes:
            _masked_into(*write)
    return A, B


_PARALLEL_MIN = 1 << 20     # output entries from which the writes of one module run in threads


def transplant_factor(A_e: torch.Tensor, B_e: torch.Tensor, A_t: torch.Tensor, B_t: torch.Tensor,
                      M_A: torch.Tensor, M_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors with the reference's entries swapped in inside the masks."""
    return select_entries(M_A, A_e, A_t), select_entries(M_B, B_e, B_t)


_SAME_WIDTH_INT = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
                   torch.float16: torch.int16}


def select_entries(mask: torch.Tensor, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, inside, outside)``, bit for bit. CPU tensors of one float dtype and the
    mask's shape are blended branch-free on their bits, ``o ^ ((o ^ i) * mask)``: a selection by a
    scattered mask (most entries of a safety mask are not neighbours) makes ``where`` mispredict a
    branch per entry, several times slower than three passes of integer arithmetic."""
    ints = _SAME_WIDTH_INT.get(outside.dtype)
    if ints is None or inside.dtype != outside.dtype or mask.dtype != torch.bool \
            or not (mask.shape == inside.shape == outside.shape) or inside.requires_grad or outside.requires_grad \
            or any(t.device.type != "cpu" for t in (mask, inside, outside)):
        return torch.where(mask, inside, outside)
    o = outside.detach().contiguous().view(ints).numpy()
    i = inside.detach().contiguous().view(ints).numpy()
    out = np.bitwise_xor(o, i)
    np.multiply(out, mask.contiguous().numpy(), out=out)
    np.bitwise_xor(out, o, out=out)
    return torch.from_numpy(out).view(outside.dtype)


def transplant_block(A_e: torch.Tensor, B_e: torch.Tensor, A_t: torch.Tensor, B_t: torch.Tensor,
                     M_A: torch.Tensor, M_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-3r factors of ``B_t A_t + (M_B⊙B_e)(M_A⊙A_e) - (M_B⊙B_t)(M_A⊙A_t)``: the fine-tune with
    its masked block replaced by the reference's, nothing else dropped."""
    r = A_t.shape[0]
    A = torch.empty(3 * r, A_t.shape[1], dtype=torch.result_type(A_e, A_t), device=A_t.device)
    B = torch.empty(B_t.shape[0], 3 * r, dtype=torch.result_type(B_e, B_t), device=B_t.device)
    A[:r].copy_(A_t)
    B[:, :r].copy_(B_t)
    for out, factor, mask in ((A[r:2 * r], A_e, M_A), (A[2 * r:], A_t, M_A),
                              (B[:, r:2 * r], B_e, M_B), (B[:, 2 * r:], B_t, M_B)):
        _masked_into(out, factor, mask, True)
    B[:, 2 * r:].neg_()
    return A, B


def _numpy_ok(*tensors: torch.Tensor) -> bool:
    """CPU tensors numpy can read (float32/float64 factors, bool masks), none needing grad.

    numpy runs the elementwise work single-threaded, which on a shared machine is faster than a
    multi-threaded torch kernel that waits for a core another process holds; the results are
    bit-for-bit those of torch (one IEEE multiplication by 0 or 1, or a selection, per entry).
    """
    return all(t.device.type == "cpu" and not t.requires_grad
               and t.dtype in (torch.float32, torch.float64, torch.bool) for t in tensors)


def _masked_into(out: torch.Tensor, factor: torch.Tensor, mask: torch.Tensor, inside: bool) -> None:
    """``out = factor ⊙ M`` (``inside``) or ``factor ⊙ (1 - M)``, written in place. A bf16/fp16
    factor on CPU is masked on its bits (integer times 0 or 1: the kept entries bit for bit, the others
    +0), which numpy does in one pass where a narrow-float multiplication would widen every entry."""
    narrow = _narrow_ok(out, factor, mask)
    if narrow or _numpy_ok(out, factor, mask):
        keep = mask.numpy() if inside else np.logical_not(mask.numpy())
        if narrow:
            factor, out = factor.view(_SAME_WIDTH_INT[factor.dtype]), out.view(_SAME_WIDTH_INT[factor.dtype])
        np.multiply(factor.numpy(), keep, out=out.numpy())
    else:
        torch.mul(factor, mask if inside else ~mask, out=out)


def _narrow_ok(out: torch.Tensor, factor: torch.Tensor, mask: torch.Tensor) -> bool:
    """CPU bf16/fp16 factor and output of one dtype and a bool mask, none needing grad."""
    return (factor.dtype in (torch.bfloat16, torch.float16) and out.dtype == factor.dtype
            and mask.dtype == torch.bool and out.shape == factor.shape == mask.shape
            and not (out.requires_grad or factor.requires_grad)
            and all(t.device.type == "cpu" for t in (out, factor, mask)))


def _change_exact(ref: MaskedFactors, A_t: np.ndarray, B_t: np.ndarray, ft: MaskedFactors) -> list:
    # s[(M_B⊙B_e)(M_A⊙A_e) + ((1-M_B)⊙B_t)((1-M_A)⊙A_t)] - s B_t A_t, the cross terms it drops included
    return [(ref.B, ref.A), (-B_t, ft.A), (-ft.B, A_t - ft.A)]


def _change_factor(ref: MaskedFactors, A_t: np.ndarray, B_t: np.ndarray, ft: MaskedFactors) -> list:
    # B''A'' - B_t A_t = D_B A_t + B_t D_A + D_B D_A with D = M⊙(X_e - X_t): every product but D's with
    # themselves and each other is one the fine-tune's own norm already formed (lowrank_sq's grams)
    dA, dB = ref.A - ft.A, ref.B - ft.B
    return [(dB, A_t), (B_t, dA), (dB, dA)]


def _change_block(ref: MaskedFactors, A_t: np.ndarray, B_t: np.ndarray, ft: MaskedFactors) -> list:
    # (M_B⊙B_e)(M_A⊙A_e) - (M_B⊙B_t)(M_A⊙A_t) = (M_B⊙B_e)(M_A⊙(A_e - A_t)) + (M_B⊙(B_e - B_t))(M_A⊙A_t)
    return [(ref.B, ref.A - ft.A), (ref.B - ft.B, ft.A)]


_CHANGES = {"exact": _change_exact, "factor": _change_factor, "block": _change_block}

SELECTING_FORMS = frozenset(_CHANGES)
"""The built-in forms: each output entry is an input entry, kept, zeroed or negated, never a sum, so a
form gives the same values in a narrow dtype (the reference rounded to it first) as in float32 with
the output rounded afterwards (:func:`~nlsr.method.realign.realign` uses that for bf16 fine-tunes)."""


def has_change_terms(transplant: str) -> bool:
    """Whether :func:`change_terms` knows the form (the built-in ones)."""
    return transplant in _CHANGES


def change_terms(transplant: str, ref: MaskedFactors, A_t: np.ndarray, B_t: np.ndarray,
                 ft: MaskedFactors) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """What the form ``transplant`` adds to one module's update, ``(ΔW'' - ΔW_t) / s``, as a sum of
    low-rank terms ``(Bᵢ, Aᵢ)`` (numpy) written through the differences ``M⊙(X_e - X_t)`` where the
    form has them, so that its norm (:func:`~nlsr.method.similarity.lowrank_sq`) is as accurate for a
    module that barely changed as for one that changed much, and exactly 0 for ``block`` and
    ``factor`` when the reference equals the fine-tune. ``ref`` and ``ft``: the masked factors of the
    reference (or the control's fill) and of the fine-tune; ``A_t``, ``B_t``: the fine-tune's factors.
    None for a form registered elsewhere (its change is then measured on its output)."""
    change = _CHANGES.get(transplant)
    return None if change is None else change(ref, A_t, B_t, ft)


# change_from_masked_sums answers only where its difference is at least this share of its two terms;
# below, the float32 Gram sums' rounding (about 1e-6 of each term) would show in the result
_SUMS_RESOLVE = 0.05


def _block_change_from_sums(inner: float, sq_ref: float, sq_ft: float) -> float:
    # block changes the update by exactly P_e - P_t
    return sq_ref + sq_ft - 2 * inner


_CHANGES_FROM_SUMS = {"block": _block_change_from_sums}   # the forms whose change the similarity's sums give


def change_from_masked_sums(transplant: str, inner: float, sq_ref: float, sq_ft: float) -> float | None:
    """``||ΔW'' - ΔW_t||² / s²`` of one module from the three sums its similarity already took,
    ``(<P_e, P_t>, ||P_e||², ||P_t||²)`` of the masked products ``P = (M_B⊙B)(M_A⊙A)``, where the form
    allows it: ``block`` changes the update by exactly ``P_e - P_t``, whose squared norm is
    ``||P_e||² + ||P_t||² - 2<P_e, P_t>``: no further product. None for the other forms, and where the
    difference is under 5% of ``||P_e||² + ||P_t||²`` (a module that barely drifted, the reference
    itself): there the caller measures the change on :func:`change_terms`, which stays accurate."""
    from_sums = _CHANGES_FROM_SUMS.get(transplant)
    if from_sums is None:
        return None
    change = from_sums(inner, sq_ref, sq_ft)
    return change if change >= _SUMS_RESOLVE * (sq_ref + sq_ft) else None


def subtract_lowrank(first: LowRank, second: LowRank) -> LowRank:
    """``B1 A1 - B2 A2`` as low-rank factors: rank r when ``A1`` equals ``A2`` (then
    ``(B1 - B2) A1``, as for an ExPO reference minus its aligned adapter), else the stacked
    ``[B1 | -B2] [A1 ; A2]``."""
    (b1, a1), (b2, a2) = first, second
    if a1.shape == a2.shape and torch.equal(a1, a2):
        return b1 - b2, a1
    return torch.cat([b1, -b2], dim=1), torch.cat([a1, a2], dim=0)


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

