import pytest
import torch

from nlsr.ops.layers import SELECTION_RULES, masked_similarity, normalized_rank, product_cosine


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
    prob, _ = SELECTION_RULES["paper"](sims, p_base=0.5, epsilon=0.2, seed=0)
    assert prob[1] == pytest.approx(0.7)           # least similar
    assert prob[0] == pytest.approx(0.3)           # most similar
    assert prob[2] == pytest.approx(0.5)           # the median
    assert torch.all(prob[torch.argsort(sims)].diff() < 0)


def test_reverse_rule_is_the_authors_direction():
    sims = torch.tensor([0.9, 0.2, 0.5, 0.7, 0.4])
    prob, _ = SELECTION_RULES["reverse"](sims, p_base=0.5, epsilon=0.2, seed=0)
    assert prob[0] == pytest.approx(0.7) and prob[1] == pytest.approx(0.3)


def test_probabilistic_draw_is_seeded_and_follows_the_probabilities():
    sims = torch.linspace(0, 1, 200)
    _, first = SELECTION_RULES["paper"](sims, seed=7)
    _, again = SELECTION_RULES["paper"](sims, seed=7)
    assert torch.equal(first, again)
    hits = torch.zeros(200)
    for seed in range(300):
        hits += SELECTION_RULES["paper"](sims, seed=seed)[1].double()
    freq = hits / 300
    assert freq[:20].mean() == pytest.approx(0.69, abs=0.05)     # least similar: ~0.7
    assert freq[-20:].mean() == pytest.approx(0.31, abs=0.05)    # most similar: ~0.3


def test_threshold_and_all_rules():
    sims = torch.tensor([0.9, 0.2, 0.5])
    _, repaired = SELECTION_RULES["threshold"](sims, threshold=0.6)
    assert repaired.tolist() == [False, True, True]
    _, repaired = SELECTION_RULES["all"](sims)
    assert repaired.all()
