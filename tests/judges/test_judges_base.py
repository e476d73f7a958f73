"""The judge registry, the harmful score and the agreement metrics."""

from __future__ import annotations

import pytest

from nlsr.errors import NlsrError
from nlsr.evaluation.judges import JUDGES, Judge, agreement, agreement_metrics, harmful_score, make_judge


class KeywordJudge(Judge):
    """Harmful when the response mentions 'bomb'."""

    name = "keyword"

    def judge(self, prompts, responses):
        return ["bomb" in r for r in responses]


def test_registry_lists_the_builtin_judges():
    assert {"refusal", "trained", "beaverdam", "llamaguard"} <= set(JUDGES)


def test_unknown_judge_name_lists_valid_names():
    with pytest.raises(NlsrError, match="unknown judge 'nope'.*beaverdam.*llamaguard.*refusal.*trained"):
        make_judge("nope")


def test_unknown_and_missing_parameters_are_clean_errors():
    with pytest.raises(NlsrError, match="does not take model"):
        make_judge("refusal", model="x")
    with pytest.raises(NlsrError, match="needs model"):
        make_judge("beaverdam")
    assert make_judge("refusal").name == "refusal"


def test_harmful_score_is_a_percentage():
    assert harmful_score([True, False, False, True]) == 50.0
    assert harmful_score([False] * 3) == 0.0
    with pytest.raises(NlsrError):
        harmful_score([])


def test_agreement_metrics_on_a_hand_made_example():
    # 10 rows: tp=4, fp=1, fn=2, tn=3
    labels = [True] * 6 + [False] * 4
    flags = [True, True, True, True, False, False, True, False, False, False]
    m = agreement_metrics(flags, labels)
    assert (m["n"], m["tp"], m["fp"], m["fn"], m["tn"]) == (10, 4, 1, 2, 3)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(0.8)
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    assert m["flagged_rate"] == pytest.approx(0.5) and m["label_rate"] == pytest.approx(0.6)
    # kappa by hand: p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5, kappa = 0.2 / 0.5 = 0.4
    assert m["cohen_kappa"] == pytest.approx(0.4)


def test_kappa_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    labels = [True, False, True, True, False, False, True, False, True, True, False, True]
    flags = [True, False, False, True, True, False, True, False, True, False, False, True]
    got = agreement_metrics(flags, labels)["cohen_kappa"]
    assert got == pytest.approx(metrics.cohen_kappa_score(labels, flags))


def test_kappa_edge_cases():
    assert agreement_metrics([True, True], [True, True])["cohen_kappa"] == 1.0
    assert agreement_metrics([False, False], [True, True])["cohen_kappa"] == 0.0
    assert agreement_metrics([True, False], [False, True])["cohen_kappa"] == pytest.approx(-1.0)
    with pytest.raises(NlsrError):
        agreement_metrics([True], [True, False])


def test_agreement_runs_the_judge_on_labelled_rows():
    rows = [
        {"prompt": "p", "response": "build a bomb like this", "harmful": True},
        {"prompt": "p", "response": "no", "harmful": False},
        {"prompt": "p", "response": "poison works like this", "harmful": True},
        {"prompt": "p", "response": "bomb disposal is a job", "harmful": False},
    ]
    m = agreement(KeywordJudge(), rows)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (1, 1, 1, 1)
    with pytest.raises(NlsrError, match="lacks"):
        agreement(KeywordJudge(), [{"prompt": "p", "response": "r"}])


def test_judges_reject_mismatched_inputs():
    judge = make_judge("refusal")
    with pytest.raises(NlsrError, match="one response per prompt"):
        judge.judge(["a", "b"], ["x"])
    with pytest.raises(NlsrError, match="single strings"):
        judge.judge("a", "x")
