import pytest
import torch

from nlsr.method import TRANSPLANTS
from nlsr.method.extrapolate import extrapolate_factors
from nlsr.method.similarity import masked_similarity_sums
from nlsr.method.transplant import change_from_masked_sums, select_entries


def _factors(seed=0, r=4, d_in=10, d_out=8):
    gen = torch.Generator().manual_seed(seed)
    A_e, A_t = torch.randn(r, d_in, generator=gen), torch.randn(r, d_in, generator=gen)
    B_e, B_t = torch.randn(d_out, r, generator=gen), torch.randn(d_out, r, generator=gen)
    M_A = torch.rand(r, d_in, generator=gen) < 0.3
    M_B = torch.rand(d_out, r, generator=gen) < 0.3
    return A_e, B_e, A_t, B_t, M_A, M_B


def test_exact_transplant_product_is_the_paper_formula():
    A_e, B_e, A_t, B_t, M_A, M_B = _factors()
    A, B = TRANSPLANTS.get("exact")(A_e, B_e, A_t, B_t, M_A, M_B)
    assert A.shape == (8, 10) and B.shape == (8, 8)          # rank 2r
    expected = (M_B * B_e) @ (M_A * A_e) + (~M_B * B_t) @ (~M_A * A_t)
    torch.testing.assert_close(B @ A, expected)


def test_factor_transplant_swaps_entries_inside_the_masks():
    A_e, B_e, A_t, B_t, M_A, M_B = _factors(1)
    A, B = TRANSPLANTS.get("factor")(A_e, B_e, A_t, B_t, M_A, M_B)
    torch.testing.assert_close(A, M_A * A_e + ~M_A * A_t)
    torch.testing.assert_close(B, M_B * B_e + ~M_B * B_t)
    assert A.shape == A_t.shape and B.shape == B_t.shape


def test_factor_transplant_is_identity_when_reference_equals_finetuned():
    # (The exact form is not: it drops the cross terms between masked and unmasked entries.)
    A_e, B_e, _, _, M_A, M_B = _factors(2)
    A, B = TRANSPLANTS.get("factor")(A_e, B_e, A_e, B_e, M_A, M_B)
    torch.testing.assert_close(B @ A, B_e @ A_e)


def test_block_transplant_product_keeps_the_finetune_and_swaps_the_masked_block():
    A_e, B_e, A_t, B_t, M_A, M_B = _factors(6)
    A, B = TRANSPLANTS.get("block")(A_e, B_e, A_t, B_t, M_A, M_B)
    assert A.shape == (12, 10) and B.shape == (8, 12)         # rank 3r
    torch.testing.assert_close(A[:4], A_t)
    torch.testing.assert_close(B[:, :4], B_t)
    expected = B_t @ A_t + (M_B * B_e) @ (M_A * A_e) - (M_B * B_t) @ (M_A * A_t)
    torch.testing.assert_close(B @ A, expected)
    # it differs from the paper's form by exactly the cross terms that form drops
    exact_A, exact_B = TRANSPLANTS.get("exact")(A_e, B_e, A_t, B_t, M_A, M_B)
    cross = (M_B * B_t) @ (~M_A * A_t) + (~M_B * B_t) @ (M_A * A_t)
    torch.testing.assert_close(B @ A - exact_B @ exact_A, cross)


def test_block_transplant_is_identity_when_reference_equals_finetuned():
    A_e, B_e, _, _, M_A, M_B = _factors(7)
    A, B = TRANSPLANTS.get("block")(A_e, B_e, A_e, B_e, M_A, M_B)
    torch.testing.assert_close(B @ A, B_e @ A_e)
    exact_A, exact_B = TRANSPLANTS.get("exact")(A_e, B_e, A_e, B_e, M_A, M_B)
    assert (exact_B @ exact_A - B_e @ A_e).norm() > 0.1 * (B_e @ A_e).norm()


def test_block_change_from_the_similarity_sums_is_the_dense_change():
    A_e, B_e, A_t, B_t, M_A, M_B = _factors(5, r=8, d_in=300, d_out=200)
    A, B = TRANSPLANTS.get("block")(A_e, B_e, A_t, B_t, M_A, M_B)
    dense = float(((B.double() @ A.double()) - B_t.double() @ A_t.double()).pow(2).sum())
    sums = masked_similarity_sums([(A_e, B_e, A_t, B_t, M_A, M_B)])[0].tolist()
    assert change_from_masked_sums("block", *sums) == pytest.approx(dense, rel=1e-5)
    # the other forms change more than the masked block: they have no such shortcut
    assert change_from_masked_sums("exact", *sums) is None and change_from_masked_sums("factor", *sums) is None


def test_block_change_from_sums_declines_where_they_cannot_resolve_it():
    A_e, B_e, _, _, M_A, M_B = _factors(6, r=8, d_in=300, d_out=200)
    gen = torch.Generator().manual_seed(0)
    A_t = A_e + 1e-4 * torch.randn(A_e.shape, generator=gen)       # barely drifted: a difference of
    sums = masked_similarity_sums([(A_e, B_e, A_t, B_e, M_A, M_B)])[0].tolist()   # ~1e-8 of the terms
    assert change_from_masked_sums("block", *sums) is None


def test_exact_transplant_with_full_masks_is_the_reference():
    A_e, B_e, A_t, B_t, M_A, M_B = _factors(5)
    ones_a, ones_b = torch.ones_like(M_A), torch.ones_like(M_B)
    A, B = TRANSPLANTS.get("exact")(A_e, B_e, A_t, B_t, ones_a, ones_b)
    torch.testing.assert_close(B @ A, B_e @ A_e)
    A, B = TRANSPLANTS.get("exact")(A_e, B_e, A_t, B_t, ~ones_a, ~ones_b)
    torch.testing.assert_close(B @ A, B_t @ A_t)


def test_extrapolation_scales_the_delta():
    A, B, *_ = _factors(3)
    A_e, B_e = extrapolate_factors(A, B, beta=0.9)
    torch.testing.assert_close(A_e, A)
    torch.testing.assert_close(B_e @ A_e, 1.9 * (B @ A))
    A_e, B_e = extrapolate_factors(A, B, beta=0.8, scale_both=True)
    torch.testing.assert_close(B_e @ A_e, 1.8 * 1.8 * (B @ A))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_entry_selection_is_torch_where_bit_for_bit(dtype):
    gen = torch.Generator().manual_seed(8)
    inside, outside = (torch.randn(33, 17, generator=gen).to(dtype) for _ in range(2))
    inside[0, :3] = torch.tensor([-0.0, float("nan"), float("inf")])
    outside[1, :3] = torch.tensor([-0.0, float("-inf"), float("nan")])
    mask = torch.rand(33, 17, generator=gen) < 0.3
    mask[0, :3], mask[1, :3] = True, False
    got, want = select_entries(mask, inside, outside), torch.where(mask, inside, outside)
    assert got.dtype == dtype and got.shape == want.shape
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    assert torch.equal(got.view(ints), want.view(ints))      # the same bits: signed zeros and NaNs too
    assert torch.equal(inside.view(ints), inside.clone().view(ints))  # inputs untouched


def test_entry_selection_falls_back_to_where_for_mixed_or_broadcast_inputs():
    gen = torch.Generator().manual_seed(9)
    inside, outside = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen).double()
    mask = torch.rand(6, 5, generator=gen) < 0.5
    assert torch.equal(select_entries(mask, inside, outside), torch.where(mask, inside, outside))
    rows = torch.rand(6, 1, generator=gen) < 0.5
    assert torch.equal(select_entries(rows, inside, inside * 2), torch.where(rows, inside, inside * 2))
