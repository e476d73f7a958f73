import torch

from nlsr.method import TRANSPLANTS
from nlsr.method.extrapolate import extrapolate_factors


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
