"""``nlsr judge train`` / ``nlsr judge validate`` through the typer sub-app."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from conftest import shared_data_dir
from nlsr.cli_judge import judge_app

DATA = shared_data_dir()
runner = CliRunner()


def invoke(*args):
    return runner.invoke(judge_app, [str(a) for a in args])


def test_unknown_judge_is_a_clean_error():
    r = invoke("validate", "--judge", "nope")
    assert r.exit_code == 2
    assert "unknown judge 'nope'" in r.output and "refusal" in r.output


@pytest.mark.skipif(DATA is None, reason="the offline data folder (shared/data) is absent")
def test_train_then_validate(tmp_path):
    out = tmp_path / "judge"
    r = invoke("train", "--data-dir", DATA, "--out", out, "--max-prompts", 30)
    assert r.exit_code == 0, r.output
    assert "held-out agreement, trained judge" in r.output and "jailbreakbench" in r.output
    assert "held-out agreement, refusal judge" in r.output
    assert (out / "judge.json").is_file()

    r = invoke("train", "--data-dir", DATA, "--out", out, "--max-prompts", 30)
    assert r.exit_code == 2 and "already exists" in r.output

    r = invoke("validate", "--judge", "trained", "--model", out, "--data-dir", DATA, "--max-prompts", 30)
    assert r.exit_code == 0, r.output
    assert "trained judge (split seed 0)" in r.output and "spard_eval" in r.output

    r = invoke("validate", "--judge", "refusal", "--data-dir", DATA, "--max-prompts", 30)
    assert r.exit_code == 0, r.output
    assert "cohen_kappa" in r.output

    r = invoke("validate", "--judge", "refusal", "--model", out, "--data-dir", DATA)
    assert r.exit_code == 2 and "does not take model" in r.output
