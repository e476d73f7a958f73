"""``nlsr judge train`` / ``nlsr judge validate`` through the typer sub-app."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import shared_data_dir
from nlsr.cli.judge import judge_app
from nlsr.evaluation.judges import load_labelled_rows, split_rows

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
    assert "model: " + str(out) in r.output              # says how to use it in a config
    # the rows it was trained and measured on, each with its split, lie next to it
    rows = [json.loads(line) for line in (out / "training_rows.jsonl").read_text().splitlines()]
    expected = split_rows(load_labelled_rows(DATA, 30, 0), 0)
    assert len(rows) == sum(len(part) for part in expected.values())
    for name, part in expected.items():
        mine = [r for r in rows if r["split"] == name]
        assert [(r["prompt"], r["response"], r["source"], r["harmful"]) for r in mine] == \
               [(r["prompt"], r["response"], r["source"], r["harmful"]) for r in part]
    assert {r["split"] for r in rows if r["fitted"]} == {"train", "validation"}
    assert not any(r["fitted"] for r in rows if r["source"].startswith(("stl_safe", "spard_eval")))

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


def test_train_never_writes_the_default_judge_unasked(tmp_path, monkeypatch):
    monkeypatch.setenv("NLSR_CACHE_DIR", str(tmp_path / "cache"))
    default = tmp_path / "cache" / "judges" / "trained-v3"
    r = invoke("train", "--max-prompts", 5)
    assert r.exit_code == 2 and "give --out FOLDER" in r.output
    r = invoke("train", "--out", default, "--max-prompts", 5)
    assert r.exit_code == 2 and "is the default judge that every run uses; pass --force" in r.output
    assert not default.exists()


@pytest.mark.skipif(DATA is None, reason="the offline data folder (shared/data) is absent")
def test_train_into_an_empty_folder_or_the_default_with_force(tmp_path, monkeypatch):
    monkeypatch.setenv("NLSR_CACHE_DIR", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    r = invoke("train", "--data-dir", DATA, "--out", empty, "--max-prompts", 30)
    assert r.exit_code == 0, r.output
    assert (empty / "judge.json").is_file() and (empty / "training_rows.jsonl").is_file()
    default = tmp_path / "cache" / "judges" / "trained-v3"
    r = invoke("train", "--data-dir", DATA, "--out", default, "--max-prompts", 30, "--force")
    assert r.exit_code == 0, r.output
    assert (default / "judge.json").is_file()
