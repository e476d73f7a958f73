"""Neuron-granularity math: streaming covariance vs a direct SVD, trace-form similarity vs dense,
and the rank r_ref + r_ft transplant."""

from __future__ import annotations

import math

import torch

from nlsr.method.projection import InputCovariance, activation_subspace, row_scores_dense, row_scores_lowrank, top_rows
from nlsr.method.similarity import row_masked_similarities
from nlsr.method.transplant import row_transplant_dense, row_transplant_lowrank, subtract_lowrank


def _direct_scores(X: torch.Tensor, delta: torch.Tensor, rho: float) -> torch.Tensor:
    """Row norms of ΔW V_k V_kᵀ with V_k the top right singular vectors of the stored inputs."""
    _, s, vh = torch.linalg.svd(X.double(), full_matrices=False)
    rank = int((s ** 2 > s[0] ** 2 * X.shape[1] * torch.finfo(torch.float64).eps).sum())
    k = min(rank, max(1, math.ceil(rho * rank - 1e-9)))
    v = vh[:k].T
    return (delta.double() @ v @ v.T).norm(dim=1)


def test_streaming_covariance_masks_equal_direct_svd_of_stored_inputs():
    gen = torch.Generator().manual_seed(0)
    for tokens in (40, 300):                       # fewer tokens than d_in, and more
        d_in, d_out = 64, 48
        # inputs with a decaying spectrum, as activations have
        X = torch.randn(tokens, d_in, generator=gen, dtype=torch.float64) @ torch.diag(
            torch.linspace(3, 0.05, d_in, dtype=torch.float64))
        delta = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
        acc = InputCovariance(d_in, dtype=torch.float64)
        for chunk in X.split(7):                   # streamed in uneven batches
            acc.update(chunk)
        assert acc.count == tokens
        basis = activation_subspace(acc.cov, rho=0.8)
        expected_k = math.ceil(0.8 * min(tokens, d_in) - 1e-9)
        assert basis.shape == (d_in, expected_k)
        ours = row_scores_dense(delta, basis)
        direct = _direct_scores(X, delta, 0.8)
        torch.testing.assert_close(ours, direct, rtol=1e-9, atol=1e-9)
        assert torch.equal(top_rows(ours, 0.2), top_rows(direct, 0.2))
        assert int(top_rows(ours, 0.2).sum()) == math.ceil(0.2 * d_out)


def test_projection_changes_which_rows_are_kept():
    # rows whose update lies outside the inputs' subspace score zero after projection
    d_in = 8
    X = torch.zeros(20, d_in, dtype=torch.float64)
    X[:, :4] = torch.randn(20, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    delta = torch.zeros(4, d_in, dtype=torch.float64)
    delta[0, 6] = 10.0        # large, but on a direction the inputs never take
    delta[1, 1] = 1.0
    acc = InputCovariance(d_in, dtype=torch.float64)
    acc.update(X)
    scores = row_scores_dense(delta, activation_subspace(acc.cov, rho=1.0))
    assert scores[0] < 1e-9 and scores[1] > 0.5
    assert top_rows(scores, 0.25).nonzero().flatten().tolist() == [1]


def test_lowrank_scores_equal_dense_scores():
    gen = torch.Generator().manual_seed(2)
    B, A = torch.randn(30, 4, generator=gen), torch.randn(4, 20, generator=gen)
    acc = InputCovariance(20, dtype=torch.float64)
    acc.update(torch.randn(50, 20, generator=gen))
    basis = activation_subspace(acc.cov, 0.5)
    torch.testing.assert_close(row_scores_lowrank(B, A, basis),
                               row_scores_dense(B.double() @ A.double(), basis))


def test_row_masked_similarity_matches_dense_cosine_for_different_ranks():
    gen = torch.Generator().manual_seed(3)
    modules, expected = [], []
    for r_ref, r_ft in ((4, 8), (16, 2), (3, 3)):
        ref = (torch.randn(24, r_ref, generator=gen), torch.randn(r_ref, 40, generator=gen))
        ft = (torch.randn(24, r_ft, generator=gen), torch.randn(r_ft, 40, generator=gen))
        m = torch.rand(24, generator=gen) < 0.3
        modules.append((ref, ft, m))
        pr = (ref[0].double() @ ref[1].double())[m].flatten()
        pf = (ft[0].double() @ ft[1].double())[m].flatten()
        expected.append(float(pr @ pf / (pr.norm() * pf.norm())))
    ours = row_masked_similarities(modules, workers=1)
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_lowrank_transplant_rows_are_the_reference_or_the_finetune():
    gen = torch.Generator().manual_seed(4)
    ref = (torch.randn(12, 4, generator=gen) * 2.0, torch.randn(4, 10, generator=gen))
    ft = (torch.randn(12, 8, generator=gen) * 0.5, torch.randn(8, 10, generator=gen))
    m = torch.zeros(12, dtype=torch.bool)
    m[[0, 3, 7]] = True
    A, B = row_transplant_lowrank(ref, ft, m, scale=0.25)
    assert A.shape == (12, 10) and B.shape == (12, 12)
    product = 0.25 * B.double() @ A.double()
    d_ref, d_ft = ref[0].double() @ ref[1].double(), ft[0].double() @ ft[1].double()
    torch.testing.assert_close(product[m], d_ref[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(product[~m], d_ft[~m], rtol=1e-5, atol=1e-5)


def test_subtract_lowrank_shares_A_when_it_can():
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(4, 10, generator=gen)
    b1, b2 = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    B, A_out = subtract_lowrank((b1, A), (b2, A))
    assert A_out.shape == (4, 10)                      # ExPO minus its aligned adapter: rank r
    torch.testing.assert_close(B @ A_out, b1 @ A - b2 @ A)
    B, A_out = subtract_lowrank((b1, A), (b2, 2 * A))  # other A: stacked, rank 2r
    assert A_out.shape == (8, 10)
    torch.testing.assert_close(B @ A_out, b1 @ A - b2 @ (2 * A), rtol=1e-5, atol=1e-5)


def test_dense_transplant_keeps_unmasked_rows_bit_for_bit():
    ref = torch.randn(5, 3, dtype=torch.float32)
    ft = torch.randn(5, 3).to(torch.bfloat16)
    m = torch.tensor([True, False, False, True, False])
    out = row_transplant_dense(ref, ft, m)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[~m], ft[~m]) and torch.equal(out[m], ref[m].to(torch.bfloat16))
