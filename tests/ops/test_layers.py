import pytest
import torch

from nlsr.method import SELECTION_RULES
from nlsr.method.select import normalized_rank
from nlsr.method.similarity import (
    flat_cosines,
    gram_sum,
    lowrank_sq,
    masked_similarities,
    masked_similarity,
    product_cosine,
)


def _dense_cos(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.flatten().double(), y.flatten().double()
    return float(x @ y / (x.norm() * y.norm()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_trace_cosine_equals_dense_cosine(seed):
    gen = torch.Generator().manual_seed(seed)
    A1, A2 = torch.randn(8, 40, generator=gen), torch.randn(8, 40, generator=gen)
    B1, B2 = torch.randn(30, 8, generator=gen), torch.randn(30, 8, generator=gen)
    B2 = B2 + 2 * B1                                    # correlated, so the cosine is not ~0
    A2 = A2 + 2 * A1
    got = product_cosine(A1, B1, A2, B2)
    assert got == pytest.approx(_dense_cos(B1 @ A1, B2 @ A2), abs=1e-6)
    assert 0.2 < got < 1.0


def test_masked_similarity_is_the_cosine_of_masked_products():
    gen = torch.Generator().manual_seed(4)
    A_e, A_t = torch.randn(4, 12, generator=gen), torch.randn(4, 12, generator=gen)
    B_e, B_t = torch.randn(10, 4, generator=gen), torch.randn(10, 4, generator=gen)
    M_A, M_B = torch.rand(4, 12, generator=gen) < 0.3, torch.rand(10, 4, generator=gen) < 0.3
    expected = _dense_cos((M_B * B_e) @ (M_A * A_e), (M_B * B_t) @ (M_A * A_t))
    assert masked_similarity(A_e, B_e, A_t, B_t, M_A, M_B) == pytest.approx(expected, abs=1e-6)
    assert masked_similarity(A_e, B_e, A_e, B_e, M_A, M_B) == pytest.approx(1.0)


def test_normalized_rank():
    values = torch.tensor([0.3, 0.1, 0.9, 0.5])
    assert normalized_rank(values).tolist() == pytest.approx([1 / 3, 0, 1, 2 / 3])
    assert normalized_rank(values, descending=True).tolist() == pytest.approx([2 / 3, 1, 0, 1 / 3])


def test_paper_rule_gives_least_similar_module_p_plus_epsilon():
    sims = torch.tensor([0.9, 0.2, 0.5, 0.7, 0.4])
    prob, _ = SELECTION_RULES.get("paper")(sims, p_base=0.5, epsilon=0.2, seed=0)
    assert prob[1] == pytest.approx(0.7)           # least similar
    assert prob[0] == pytest.approx(0.3)           # most similar
    assert prob[2] == pytest.approx(0.5)           # the median
    assert torch.all(prob[torch.argsort(sims)].diff() < 0)


def test_reverse_rule_is_the_authors_direction():
    sims = torch.tensor([0.9, 0.2, 0.5, 0.7, 0.4])
    prob, _ = SELECTION_RULES.get("reverse")(sims, p_base=0.5, epsilon=0.2, seed=0)
    assert prob[0] == pytest.approx(0.7) and prob[1] == pytest.approx(0.3)


def test_probabilistic_draw_is_seeded_and_follows_the_probabilities():
    sims = torch.linspace(0, 1, 200)
    _, first = SELECTION_RULES.get("paper")(sims, seed=7)
    _, again = SELECTION_RULES.get("paper")(sims, seed=7)
    assert torch.equal(first, again)
    hits = torch.zeros(200)
    for seed in range(300):
        hits += SELECTION_RULES.get("paper")(sims, seed=seed)[1].double()
    freq = hits / 300
    assert freq[:20].mean() == pytest.approx(0.69, abs=0.05)     # least similar: ~0.7
    assert freq[-20:].mean() == pytest.approx(0.31, abs=0.05)    # most similar: ~0.3


def test_threshold_and_all_rules():
    sims = torch.tensor([0.9, 0.2, 0.5])
    _, repaired = SELECTION_RULES.get("threshold")(sims, threshold=0.6)
    assert repaired.tolist() == [False, True, True]
    _, repaired = SELECTION_RULES.get("all")(sims)
    assert repaired.all()


# ---- the batched similarity: stacked Gram matrices, shared buffers, worker threads ----

def _old_masked_similarity(A_e, B_e, A_t, B_t, M_A, M_B) -> float:
    """The previous implementation: three separate pairs of r x r products of masked copies."""
    def inner(A1, B1, A2, B2):
        return torch.sum((B1.T @ B2).double() * (A1 @ A2.T).double())
    A1, B1, A2, B2 = A_e * M_A, B_e * M_B, A_t * M_A, B_t * M_B
    norm1, norm2 = inner(A1, B1, A1, B1).clamp_min(0).sqrt(), inner(A2, B2, A2, B2).clamp_min(0).sqrt()
    return float(inner(A1, B1, A2, B2) / (norm1 * norm2).clamp_min(1e-30))


def _dense_masked(A_e, B_e, A_t, B_t, M_A, M_B) -> float:
    """Float64 ground truth from the dense d_out x d_in masked products."""
    d = torch.float64
    return _dense_cos((M_B * B_e).to(d) @ (M_A * A_e).to(d), (M_B * B_t).to(d) @ (M_A * A_t).to(d))


def _modules(seed=0, shapes=((40, 24, 6), (40, 24, 6), (17, 50, 3), (64, 8, 8), (40, 24, 6)),
             q=0.3, dtype=torch.float32):
    """Modules ``(A_e, B_e, A_t, B_t, M_A, M_B)``: repeated and distinct shapes, fine-tune ≈ reference."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for d_out, d_in, r in shapes:
        A_e = torch.randn(r, d_in, generator=gen, dtype=dtype)
        B_e = torch.randn(d_out, r, generator=gen, dtype=dtype)
        A_t = A_e + 0.5 * torch.randn(r, d_in, generator=gen, dtype=dtype)
        B_t = B_e + 0.5 * torch.randn(d_out, r, generator=gen, dtype=dtype)
        out.append((A_e, B_e, A_t, B_t, torch.rand(r, d_in, generator=gen) < q,
                    torch.rand(d_out, r, generator=gen) < q))
    return out


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_batched_similarities_equal_per_module(workers):
    modules = _modules()
    batched = masked_similarities(modules, workers=workers)
    assert batched.dtype == torch.float64 and batched.shape == (len(modules),)
    assert batched.tolist() == [masked_similarity(*m) for m in modules]     # bit for bit
    assert torch.equal(batched, masked_similarities(modules, workers=1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_similarities_match_float64_dense_and_the_previous_implementation(seed):
    modules = _modules(seed)
    got = masked_similarities(modules)
    dense = torch.tensor([_dense_masked(*m) for m in modules], dtype=torch.float64)
    old = torch.tensor([_old_masked_similarity(*m) for m in modules], dtype=torch.float64)
    assert (got - dense).abs().max() < 1e-6
    assert (got - old).abs().max() < 1e-6
    assert torch.equal(torch.argsort(got), torch.argsort(dense))             # same ranking
    assert got.min() > 0.2 and got.max() < 1.0


def test_float64_factors_give_float64_accuracy():
    modules = _modules(3, dtype=torch.float64)
    got = masked_similarities(modules)
    dense = torch.tensor([_dense_masked(*m) for m in modules], dtype=torch.float64)
    assert (got - dense).abs().max() < 1e-12


def test_bf16_factors_are_widened_not_rounded():
    modules = [tuple(t.bfloat16() if t.is_floating_point() else t for t in m) for m in _modules(4)]
    got = masked_similarities(modules)
    dense = torch.tensor([_dense_masked(*m) for m in modules], dtype=torch.float64)
    assert (got - dense).abs().max() < 1e-6


def test_similarity_edge_cases():
    assert masked_similarities([]).shape == (0,)
    A_e, B_e, A_t, B_t, M_A, M_B = _modules(5)[0]
    assert masked_similarity(A_e, B_e, A_t, B_t, M_A, torch.zeros_like(M_B)) == 0.0   # empty region
    assert masked_similarity(A_e, B_e, -A_e, B_e, M_A, M_B) == pytest.approx(-1.0)


def test_product_cosine_of_different_ranks():
    gen = torch.Generator().manual_seed(6)
    A1, B1 = torch.randn(3, 30, generator=gen), torch.randn(20, 3, generator=gen)
    A2 = torch.cat([A1, torch.randn(2, 30, generator=gen)])
    B2 = torch.cat([B1, 0.3 * torch.randn(20, 2, generator=gen)], dim=1)
    assert product_cosine(A1, B1, A2, B2) == pytest.approx(_dense_cos(B1 @ A1, B2 @ A2), abs=1e-6)


def test_flat_cosines():
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(4, 50, generator=gen) for _ in range(3)]
    pairs = [(x, x + 0.5 * torch.randn(x.shape, generator=gen)) for x in xs] + [(xs[0], -xs[0])]
    got = flat_cosines(pairs)
    assert got.tolist() == pytest.approx([_dense_cos(x, y) for x, y in pairs], abs=1e-6)
    assert got[-1] == pytest.approx(-1.0)


def test_lowrank_sq_with_shared_factors_equals_the_dense_norm():
    gen = torch.Generator().manual_seed(11)
    B1, B2 = (torch.randn(40, 4, generator=gen, dtype=torch.float64).numpy() for _ in range(2))
    A1, A2 = (torch.randn(4, 30, generator=gen, dtype=torch.float64).numpy() for _ in range(2))
    terms = [(B1, A1), (B2, A1), (B1, A2), (B2, A2)]        # factors shared between terms
    dense = sum(b @ a for b, a in terms)
    grams: dict = {}
    assert lowrank_sq(terms, grams) == pytest.approx(float((dense ** 2).sum()), rel=1e-12)
    assert len(grams) == 6            # B1ᵀB1, B1ᵀB2, B2ᵀB2 and the A side's three (swaps are transposes)
    # the kept products serve a later sum: ||B1 A1||² from them alone
    assert gram_sum(B1, A1, B1, A1, grams) == pytest.approx(float(((B1 @ A1) ** 2).sum()), rel=1e-12)
    assert len(grams) == 6
