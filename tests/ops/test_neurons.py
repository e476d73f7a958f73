import math

import torch

from nlsr.method.projection import GramAccumulator, project_factors, safety_masks, subspace_rank, top_fraction_mask


def _top_left_singular(z: torch.Tensor, k: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(z, full_matrices=False)
    return u[:, :k]


def _random_problem(seed=0, r=6, d_in=20, d_out=24, n=300):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=gen, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=gen, dtype=torch.float64)
    # Anisotropic inputs so that the kept subspace is well separated.
    X = torch.randn(n, d_in, generator=gen, dtype=torch.float64) * torch.logspace(0, -1.5, d_in)
    return A, B, X


def test_streaming_gram_projection_equals_direct_svd_of_stored_activations():
    A, B, X = _random_problem()
    acc = GramAccumulator(A.shape[0])
    for chunk in X.split(37):                     # streamed in uneven batches
        acc.update(chunk @ A.T)
    assert acc.count == X.shape[0]
    rho = 0.5
    a_hat, b_hat = project_factors(A, B, acc.gram, rho)

    k = subspace_rank(A.shape[0], rho)
    z_a = A @ X.T                                  # r x N: outputs of A
    u_a = _top_left_singular(z_a, k)
    z_b = B @ z_a                                  # d_out x N: outputs of B
    u_b = _top_left_singular(z_b, k)
    torch.testing.assert_close(a_hat, u_a @ u_a.T @ A, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b_hat, u_b @ u_b.T @ B, rtol=1e-9, atol=1e-9)


def test_projection_changes_the_factors_when_rank_is_cut():
    A, B, X = _random_problem(seed=3)
    acc = GramAccumulator(A.shape[0])
    acc.update(X @ A.T)
    a_hat, b_hat = project_factors(A, B, acc.gram, rho=0.5)
    assert not torch.allclose(a_hat, A) and not torch.allclose(b_hat, B)
    a_full, b_full = project_factors(A, B, acc.gram, rho=1.0)   # full rank: identity projection
    torch.testing.assert_close(a_full, A)
    torch.testing.assert_close(b_full, B)


def test_subspace_rank_is_ceil_of_rho_r():
    assert subspace_rank(128, 0.8) == math.ceil(0.8 * 128) == 103
    assert subspace_rank(8, 0.8) == 7
    assert subspace_rank(4, 0.01) == 1
    assert subspace_rank(5, 1.0) == 5


def test_top_fraction_mask_keeps_the_largest_magnitudes():
    values = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.05]])
    mask = top_fraction_mask(values, 1 / 3)
    assert mask.tolist() == [[False, True, False], [True, False, False]]
    assert top_fraction_mask(torch.randn(10, 10), 0.2).sum() == 20
    assert top_fraction_mask(torch.randn(7, 3), 0.2).sum() == math.ceil(0.2 * 21)


def test_safety_masks_have_factor_shapes_and_density():
    A, B, X = _random_problem()
    acc = GramAccumulator(A.shape[0])
    acc.update(X @ A.T)
    m_a, m_b = safety_masks(A.float(), B.float(), acc.gram, rho=0.8, q=0.2)
    assert m_a.shape == A.shape and m_b.shape == B.shape
    assert m_a.dtype == torch.bool
    assert m_a.sum() == math.ceil(0.2 * A.numel()) and m_b.sum() == math.ceil(0.2 * B.numel())
