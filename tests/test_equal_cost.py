"""Curves read at equal FA cost (nlsr.experiment.equal_cost) and the grouped bootstrap under it."""
import numpy as np
import pytest

from nlsr.evaluation.scoring import Outcomes
from nlsr.evaluation.stats import resampled_means, resampled_means_sets
from nlsr.experiment.equal_cost import equal_cost, equal_cost_markdown, value_at_cost


def test_value_at_cost_interpolates_the_first_segment_that_reaches_the_cost():
    costs = np.array([[0.0, 1.0, 4.0, 9.0],       # reaches 2 between 1 and 4
                      [0.0, -1.0, 3.0, 1.0],      # dips below 0 first, reaches 2 between -1 and 3
                      [0.0, 0.5, 1.0, 1.5]])      # never costs 2
    gains = np.array([[0.0, 10.0, 40.0, 50.0],
                      [0.0, 2.0, 10.0, 99.0],
                      [0.0, 1.0, 2.0, 3.0]])
    out = value_at_cost(costs, gains, 2.0)
    assert out[0] == pytest.approx(20.0)          # 10 + (2 - 1) / 3 * 30
    assert out[1] == pytest.approx(8.0)           # 2 + (2 + 1) / 4 * 8: the first crossing, not the later dip
    assert np.isnan(out[2])
    assert value_at_cost(costs[:1], gains[:1], 9.0)[0] == pytest.approx(50.0)   # the curve's end is reached


def test_one_set_draws_exactly_as_before_and_sets_share_the_seed_draw():
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, 2, (3, 40)).astype(float) for _ in range(2))
    task = rng.integers(0, 2, (3, 25)).astype(float)
    np.testing.assert_array_equal(resampled_means_sets([[a, b]], 500)[0], resampled_means([a, b], 500))
    harm, fa = resampled_means_sets([[a, b], [task]], 500)
    assert harm.shape == (500, 2) and fa.shape == (500, 1)
    np.testing.assert_array_equal(harm, resampled_means([a, b], 500))   # adding a set does not move the first
    with pytest.raises(ValueError, match="number of seeds"):
        resampled_means_sets([[a], [task[:2]]])


def _outcomes(label: str, refused: float, harmful: float, correct: float, seeds=(0, 1, 2)) -> Outcomes:
    """Outcomes with the given rates: the first k of 200 harmful prompts refused / flagged harmful, the
    first k of 100 task rows correct; one row more in odd seeds, as in every model, so that paired
    differences are exact."""
    out = Outcomes(label, list(seeds))

    def rows(rate: float, n: int) -> list[list[float]]:
        k = round(rate * n)
        return [[1.0 if i < k + (s % 2) else 0.0 for i in range(n)] for s in seeds]

    out.add("harmful_refused_v2/test", rows(refused, 200))
    out.add("hs/trained/test", rows(harmful, 200))
    out.add("fa", rows(correct, 100))
    return out


@pytest.fixture
def two_curves():
    outcomes = {"attacked": _outcomes("attacked", 0.30, 0.30, 0.90)}
    # "good": +10 refusal per 2 FA points; "poor": +4 per 2 FA points, and it stops at 6 points
    for q, (cost, gain) in {0.1: (2, 10), 0.2: (6, 30), 0.4: (12, 60)}.items():
        outcomes[f"good-q{q}"] = _outcomes("g", 0.30 + gain / 100, 0.30 - gain / 200, 0.90 - cost / 100)
    for q, (cost, gain) in {0.1: (3, 6), 0.4: (6, 12)}.items():
        outcomes[f"poor-q{q}"] = _outcomes("p", 0.30 + gain / 100, 0.30 - gain / 200, 0.90 - cost / 100)
    curves = {"good-q": ["good-q0.1", "good-q0.2", "good-q0.4"], "poor-q": ["poor-q0.1", "poor-q0.4", "missing"]}
    return outcomes, curves


def test_equal_cost_reads_each_curve_at_the_same_fa_and_pairs_the_difference(two_curves):
    outcomes, curves = two_curves
    result = equal_cost(outcomes, curves, [4.0, 10.0], "trained", n_boot=400)
    good, poor = result["curves"]["good-q"], result["curves"]["poor-q"]
    assert poor["models"] == ["poor-q0.1", "poor-q0.4"]          # a model without outcomes is left out
    # observed means, interpolated by hand
    assert good["4"]["refusal"]["mean"] == pytest.approx(20.0, abs=1e-6)
    assert poor["4"]["refusal"]["mean"] == pytest.approx(8.0, abs=1e-6)
    assert good["4"]["hs_cut"]["mean"] == pytest.approx(10.0, abs=1e-6)
    assert good["10"]["refusal"]["mean"] == pytest.approx(50.0, abs=1e-6)
    assert poor["10"]["refusal"]["mean"] is None and poor["10"]["refusal"]["reached"] < 0.2   # a few draws do
    low, high = good["4"]["refusal"]["ci"]
    assert low < good["4"]["refusal"]["mean"] < high
    assert result["against"] == "good-q"
    diff = result["differences"]["poor-q"]["4"]["refusal"]
    assert diff["mean"] == pytest.approx(-12.0, abs=1.0) and diff["ci"][1] < 0   # resolved: poor buys less
    text = equal_cost_markdown(result)
    assert "| poor-q |" in text and "not reached" in text and "Minus the `good-q` curve" in text


def test_equal_cost_against_another_curve_and_without_an_attacked_model(two_curves):
    outcomes, curves = two_curves
    result = equal_cost(outcomes, curves, [4.0], "trained", against="poor-q", n_boot=200)
    assert result["against"] == "poor-q" and list(result["differences"]) == ["good-q"]
    assert result["differences"]["good-q"]["4"]["refusal"]["mean"] > 0
    assert equal_cost({k: v for k, v in outcomes.items() if k != "attacked"}, curves, [4.0], "trained") is None
    other_seeds = {**outcomes, "good-q0.1": _outcomes("g", 0.4, 0.25, 0.88, seeds=(0, 1))}
    kept = equal_cost(other_seeds, curves, [4.0], "trained", n_boot=100)["curves"]["good-q"]["models"]
    assert kept == ["good-q0.2", "good-q0.4"]                   # other seeds cannot be paired


def test_config_checks_the_equal_cost_settings_and_keeps_them_out_of_the_repair_keys():
    from nlsr.experiment.config import ExperimentConfig
    from nlsr.experiment.plan import Plan

    def cfg(**realign):
        return ExperimentConfig.model_validate({"realign": {
            "variants": [{"name": "exact-q0.2"}], "controls_summary": True,
            "sweeps": [{"variant": "exact-q0.2", "field": "q", "values": [0.4], "name": "exact-q{value}"}],
            **realign}})

    assert cfg(equal_fa_against="exact-q").realign.equal_fa_against == "exact-q"
    with pytest.raises(Exception, match="is not a curve"):
        cfg(equal_fa_against="random-q")
    with pytest.raises(Exception, match="above 0"):
        cfg(equal_fa_costs=[0.0, 5.0])
    a, b = Plan.of(cfg()), Plan.of(cfg(equal_fa_costs=[1.0]))
    assert a.realign_section == b.realign_section and "equal_fa_costs" not in a.realign_section


def test_a_lone_model_is_placed_against_each_curve_at_its_own_cost(two_curves):
    outcomes, curves = two_curves
    # 3 FA points for +25 refusals: the good curve gives 10 + (1/4) * 20 = 15 there, the poor one 6
    outcomes = {**outcomes, "lone": _outcomes("l", 0.55, 0.20, 0.87)}
    result = equal_cost(outcomes, curves, [4.0], "trained", points=["lone", "absent"], n_boot=400)
    assert list(result["points"]) == ["lone"]
    lone = result["points"]["lone"]
    assert lone["cost"]["mean"] == pytest.approx(3.0, abs=1e-6) and lone["refusal"]["mean"] == pytest.approx(25.0)
    above_good = lone["minus_curve"]["good-q"]["refusal"]
    assert above_good["mean"] == pytest.approx(10.0, abs=1e-6) and above_good["ci"][0] > 0
    assert lone["minus_curve"]["poor-q"]["refusal"]["mean"] == pytest.approx(19.0, abs=1e-6)
    assert lone["minus_curve"]["good-q"]["hs_cut"]["mean"] == pytest.approx(10.0 - 7.5, abs=1e-6)
    assert "| lone |" in equal_cost_markdown(result)
