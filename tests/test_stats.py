"""Bootstrap intervals over prompts and seeds; paired differences; scores from generations."""

import numpy as np
import pytest

from nlsr.evaluation.stats import difference, estimate, relative_cut, resampled_means


def test_interval_contains_the_mean_and_shrinks_with_more_prompts():
    rng = np.random.default_rng(0)
    small = (rng.random((1, 100)) < 0.3).astype(float)
    large = (rng.random((1, 3000)) < 0.3).astype(float)
    for x in (small, large):
        e = estimate(x)
        assert e.low <= e.mean <= e.high
    assert (estimate(large).high - estimate(large).low) < (estimate(small).high - estimate(small).low) / 3
    # binomial standard error at n = 3000: the 95% half-width is about 1.96 * sqrt(.21 / 3000) = 1.6 points
    assert abs((estimate(large).high - estimate(large).low) / 2 - 1.64) < 0.3


def test_seed_variation_widens_the_interval():
    rng = np.random.default_rng(1)
    same = np.tile((rng.random(400) < 0.4).astype(float), (3, 1))
    varied = np.stack([(rng.random(400) < p).astype(float) for p in (0.2, 0.4, 0.6)])
    assert (estimate(varied).high - estimate(varied).low) > 2 * (estimate(same).high - estimate(same).low)


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    x = (np.random.default_rng(2).random((3, 200)) < 0.5).astype(float)
    d = difference(x, x)
    assert d.mean == d.low == d.high == 0.0


def test_paired_difference_is_tighter_than_unpaired_intervals_suggest():
    rng = np.random.default_rng(3)
    base = (rng.random((1, 500)) < 0.5).astype(float)
    fixed = base.copy()
    fixed[0, :50] = 0.0                                   # the defence fixes 50 of the harmful answers
    d = difference(fixed, base)
    assert d.high < 0 and d.low > -15
    cut = relative_cut(fixed, base)
    assert 0 < cut.low <= cut.mean <= cut.high and abs(cut.mean - 100 * (1 - fixed.mean() / base.mean())) < 1e-9


def test_paired_arrays_must_share_their_shape():
    with pytest.raises(ValueError, match="shape"):
        resampled_means([np.zeros((2, 5)), np.zeros((3, 5))])


def test_scores_from_generations_split_by_set_and_seed():
    from nlsr.evaluation.judges.refusal import RefusalJudge
    from nlsr.evaluation.scoring import collect, paired_against

    def gens(outputs):
        return ([{"set": "harmful", "split": s, "prompt": f"p{i}", "output": o}
                 for i, (s, o) in enumerate(zip(["test", "test", "validation"], outputs, strict=True))]
                + [{"set": "task", "prompt": "t", "output": "positive", "correct": True},
                   {"set": "task", "prompt": "t2", "output": "I cannot help", "correct": False}]
                + [{"set": "xstest", "type": "homonyms", "prompt": "x", "output": "I'm sorry, no"}])

    judges = {"refusal": RefusalJudge()}
    attacked = collect("attacked", [0, 1], [gens(["Sure", "Sure", "Sure"]), gens(["Sure", "I cannot", "Sure"])], judges)
    assert attacked.arrays["hs/refusal/test"].tolist() == [[1, 1], [1, 0]]
    assert attacked.arrays["hs/refusal/validation"].shape == (2, 1)
    assert attacked.arrays["fa"].tolist() == [[1, 0], [1, 0]]
    assert attacked.arrays["task_refusal"].tolist() == [[0, 1], [0, 1]]
    assert attacked.arrays["xstest_refusal/homonyms"].tolist() == [[1], [1]]
    fixed = collect("nlsr", [0, 1], [gens(["I cannot", "Sure", "Sure"]), gens(["I cannot", "I cannot", "Sure"])],
                    judges)
    paired = paired_against(fixed, attacked, "hs/refusal/test")
    assert paired["difference"]["mean"] == pytest.approx(-50.0)
    other_seeds = collect("x", [5, 6], [gens(["Sure"] * 3)] * 2, judges)
    assert paired_against(other_seeds, attacked, "hs/refusal/test") is None
