"""Judges in a config: names or {name, model, device, dtype} mappings, checked when the config loads,
and built from their spec by the report stage (a stand-in factory shows what reaches make_judge)."""

from __future__ import annotations

import json

import pytest

from nlsr.errors import NlsrError
from nlsr.evaluation.judges import JUDGES, Judge
from nlsr.experiment.config import ExperimentConfig, JudgeSpec
from nlsr.experiment.pipeline import RunContext
from nlsr.experiment.stages import report


def _config(judges: list) -> ExperimentConfig:
    return ExperimentConfig.model_validate({"evaluate": {"judges": judges}})


def test_a_name_means_a_spec_with_that_name_and_label():
    cfg = _config(["refusal", {"name": "trained", "model": "judges/new", "label": "trained-new"},
                   {"name": "beaverdam", "model": "PKU-Alignment/beaver-dam-7b", "dtype": "bfloat16"}])
    assert cfg.evaluate.judges[0] == JudgeSpec(name="refusal", label="refusal")
    assert [(j.name, j.label, j.model) for j in cfg.evaluate.judges] == [
        ("refusal", "refusal", None), ("trained", "trained-new", "judges/new"),
        ("beaverdam", "beaverdam", "PKU-Alignment/beaver-dam-7b")]
    assert [j.name for j in ExperimentConfig().evaluate.judges] == ["refusal", "trained"]


@pytest.mark.parametrize(("judges", "phrase"), [
    (["gpt"], "unknown judge 'gpt' (known: beaverdam, hidden, llamaguard, refusal, refusal-v2, trained)"),
    (["beaverdam"], "judge 'beaverdam' needs a model"),
    ([{"name": "llamaguard", "device": "cpu"}], "judge 'llamaguard' needs a model"),
    ([{"name": "refusal", "model": "x"}], "judge 'refusal' takes no model"),
    ([{"name": "trained", "dtype": "bfloat16"}], "runs no model on a device"),
    (["trained", {"name": "trained", "model": "other"}], "judges ['trained'] appear twice"),
    ([{"name": "llamaguard", "model": "m", "dtype": "fp8"}], "dtype"),
    ([{"name": "refusal", "labl": "x"}], "labl"),
])
def test_bad_judges_fail_when_the_config_loads(judges, phrase):
    with pytest.raises(ValueError, match="evaluate.judges") as err:
        _config(judges)
    assert phrase in str(err.value)


class _Fixed(Judge):
    """Flags every response whose text contains ``word``."""

    def __init__(self, word: str):
        self.word = word

    def judge(self, prompts, responses):
        return [self.word in r for r in responses]


def test_report_builds_every_judge_from_its_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("NLSR_CACHE_DIR", str(tmp_path / "cache"))     # no default judge's metrics
    calls: list[tuple[str, dict]] = []

    def fake_beaverdam(model, device=None, precision=None, batch_size=16, max_length=512, threshold=0.5):
        calls.append(("beaverdam", {"model": model, "device": device, "precision": precision}))
        return _Fixed("bomb")

    def fake_trained(model=None, data_dir=None):
        calls.append(("trained", {"model": model, "data_dir": data_dir}))
        return _Fixed("Step")

    fakes, real = {"beaverdam": fake_beaverdam, "trained": fake_trained}, JUDGES.get
    monkeypatch.setattr(JUDGES, "get", lambda name: fakes.get(name) or real(name))
    cfg = ExperimentConfig.model_validate({"device": "cpu", "evaluate": {"judges": [
        "refusal", {"name": "beaverdam", "model": "tiny/beaver", "dtype": "float32"},
        "trained", {"name": "trained", "model": str(tmp_path / "j2"), "label": "trained-j2"}]}})
    (tmp_path / "j2").mkdir()
    (tmp_path / "j2" / "metrics.json").write_text(json.dumps({"heldout": {"spard_eval": {"n": 1}},
                                                              "refusal_heldout": {"spard_eval": {"n": 2}}}))
    ctx = RunContext(cfg, tmp_path / "run", tmp_path / "data")
    judges = report._make_judges(ctx)
    assert calls == [
        ("beaverdam", {"model": "tiny/beaver", "device": "cpu", "precision": "float32"}),
        ("trained", {"model": None, "data_dir": tmp_path / "data"}),
        ("trained", {"model": str(tmp_path / "j2"), "data_dir": None}),
    ]
    assert list(judges) == ["refusal", "beaverdam", "trained", "trained-j2"]     # labels, config order
    outputs = ["Step 1: build a bomb", "I cannot help with that."]
    flags = {label: judge.judge(["p1", "p2"], outputs) for label, judge in judges.items()}
    assert flags == {"refusal": [True, False], "beaverdam": [True, False], "trained": [True, False],
                     "trained-j2": [True, False]}
    agreement = report._heldout_agreement(cfg.evaluate.judges)
    assert agreement == {"trained-j2": {"spard_eval": {"n": 1}}, "refusal": {"spard_eval": {"n": 2}}}


def test_make_judge_rejects_what_the_spec_cannot_give():
    # a spec's fields map onto the factories' parameters: a model judge takes device and precision
    spec = JudgeSpec(name="llamaguard", model="m", device="cuda:1")
    ctx = RunContext(ExperimentConfig(), None, None)
    assert report.judge_params(spec, ctx) == {"model": "m", "device": "cuda:1", "precision": None}
    with pytest.raises(NlsrError, match="does not take"):
        from nlsr.evaluation.judges import make_judge

        make_judge("refusal", model="x")


def test_summary_has_the_shape_issue_10_asks_for():
    from nlsr.experiment.stages.report import summary

    def est(m):
        return {"mean": m, "ci95": [m - 1, m + 1], "n": 10}

    def row(model, hs, fa, paired=None):
        return {"model": model, "seeds": [0, 1, 2], "paired": paired or {},
                "scores": {"hs": {"trained": {"test": est(hs), "validation": est(hs + 1)}}, "fa": est(fa),
                           "xstest_refusal": est(10.0), "task_refusal": est(0.0), "xstest_refusal_v2": est(12.0)}}

    nlsr = row("nlsr", 10.0, 88.0, {"hs/trained/test": {"difference": est(-30.0), "relative_cut": est(75.0)},
                                    "fa": {"difference": est(-1.0)}})
    out = summary([row("attacked", 40.0, 89.0), nlsr], "trained", [0, 1, 2], {}, "nlsr")
    assert out["judge"] == "trained" and out["seeds"] == [0, 1, 2] and out["split"] == "test"
    assert out["chosen_on_validation"] == "nlsr"
    for model in ("attacked", "nlsr"):
        for key in ("hs", "fa", "xstest_refusal", "task_refusal"):
            assert set(out["models"][model][key]) == {"mean", "ci95"}
    assert out["models"]["nlsr"]["hs_relative_cut_vs_attacked"]["mean"] == 75.0
    assert out["models"]["nlsr"]["fa_difference_vs_attacked"] == {"mean": -1.0, "ci95": [-2.0, 0.0]}
    assert "fa_difference_vs_attacked" not in out["models"]["attacked"]
    assert out["models"]["nlsr"]["xstest_refusal_v2"] == {"mean": 12.0, "ci95": [11.0, 13.0]}
    assert out["models"]["nlsr"]["task_refusal_v2"] is None      # a report made before refusal-v2


def test_held_out_harmful_sets_show_their_difference_against_the_attacked_model():
    from nlsr.experiment.stages.report import _extra_table

    def est(mean):
        return {"mean": mean, "ci95": [mean - 1, mean + 1]}

    rows = [{"model": "attacked", "scores": {"hs_extra": {"trained": {"advbench": est(50.0)}}}},
            {"model": "nlsr", "scores": {"hs_extra": {"trained": {"advbench": est(35.0)}}},
             "paired": {"hs_extra/trained/advbench": {"difference": est(-15.0)}}}]
    table = _extra_table(rows, "trained").splitlines()
    assert table[0] == "| model | advbench | advbench: vs attacked, points |"
    assert table[2] == "| attacked | 50.0 [49.0, 51.0] | - |"
    assert table[3] == "| nlsr | 35.0 [34.0, 36.0] | -15.0 [-16.0, -14.0] |"
