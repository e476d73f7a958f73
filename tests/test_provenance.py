"""Stage keys carry the code version, the data files' contents and the trained judge's content, so
``reuse_from`` (and skip-if-done) never takes a stage made from other code or data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import shared_data_dir
from nlsr.data.disjoint import prompt_keys
from nlsr.experiment import provenance
from nlsr.experiment.config import ExperimentConfig
from nlsr.experiment.pipeline import RunContext, Stage, run_stages, stage_key
from nlsr.experiment.plan import build_stages
from nlsr.experiment.stages import reads

DATA = shared_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="the offline data folder (shared/data) is absent")
SPARD_TEST = "beavertails_derived_spard/eval_beaverTails_test.jsonl"   # harmful_eval, in every gate


def _code(monkeypatch, commit: str, version: str = "0.1.0", dirty: bool = False) -> None:
    monkeypatch.setattr(provenance, "source_state", lambda: {"nlsr": version, "commit": commit, "dirty": dirty})


def _data_copy(tmp_path: Path) -> Path:
    """A data folder of links to shared/data, except a real copy of the harmful_eval file."""
    root = tmp_path / "data"
    root.mkdir()
    for entry in Path(DATA).iterdir():
        if entry.name != "beavertails_derived_spard":
            (root / entry.name).symlink_to(entry)
    spard = root / "beavertails_derived_spard"
    spard.mkdir()
    for entry in (Path(DATA) / "beavertails_derived_spard").iterdir():
        if entry.name == Path(SPARD_TEST).name:
            (spard / entry.name).write_bytes(entry.read_bytes())
        else:
            (spard / entry.name).symlink_to(entry)
    return root


def _keys(cfg: ExperimentConfig, data_dir: Path, names: tuple[str, ...]) -> dict[str, str]:
    """The keys of the named (input-free) stages, computed as run_stages does."""
    ctx = RunContext(cfg, data_dir / "run", data_dir)
    stages = {s.name: s for s in build_stages(cfg)}
    return {n: stage_key(stages[n], {}, stages[n].content(ctx)) for n in names}


@needs_data
def test_changing_a_data_file_changes_the_data_stage_keys(tmp_path, monkeypatch):
    _code(monkeypatch, "a" * 40)
    root = _data_copy(tmp_path)
    cfg = ExperimentConfig()
    before = _keys(cfg, root, ("data", "data-align"))
    assert before == _keys(cfg, root, ("data", "data-align"))           # deterministic
    assert before == _keys(cfg, Path(DATA), ("data", "data-align"))     # same bytes elsewhere: same key
    path = root / SPARD_TEST
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    record["prompt"] += " (edited)"
    path.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    after = _keys(cfg, root, ("data", "data-align"))
    assert after["data"] != before["data"]
    assert after["data-align"] != before["data-align"]     # the gate reads the evaluation sets too
    content = reads.eval_content(RunContext(cfg, root / "run", root))
    assert content["datasets"]["harmful_eval"] == {SPARD_TEST: provenance.content_hash(path)}


def test_another_commit_or_version_changes_every_key_and_dirty_does_not(monkeypatch):
    stage = Stage("s", lambda c, o, i: {}, {"x": 1})
    _code(monkeypatch, "a" * 40)
    key = stage_key(stage, {})
    _code(monkeypatch, "a" * 40, dirty=True)
    assert stage_key(stage, {}) == key                     # uncommitted edits: recorded, not keyed
    _code(monkeypatch, "b" * 40)
    assert stage_key(stage, {}) != key
    _code(monkeypatch, "a" * 40, version="0.2.0")
    assert stage_key(stage, {}) != key
    _code(monkeypatch, "a" * 40)
    assert stage_key(stage, {}, {"f": "1"}) != stage_key(stage, {}, {"f": "2"}) != key


def test_reuse_from_refuses_a_stage_made_by_other_code_or_data(tmp_path, monkeypatch):
    content = {"file": "1"}
    graph = [Stage("a", lambda c, o, i: {"line": "a"}, {"x": 1}, content=lambda ctx: dict(content)),
             Stage("b", lambda c, o, i: {"line": "b"}, {}, ["a"])]

    def run(name: str, reuse: list[Path]) -> list[str]:
        logs: list[str] = []
        ctx = RunContext(ExperimentConfig(), tmp_path / name, tmp_path)
        run_stages(ctx, graph, log=logs.append, reuse_from=reuse)
        return [line.split(":")[0] for line in logs if line.startswith(("[run]", "[reuse]", "[skip]"))]

    _code(monkeypatch, "a" * 40, dirty=True)
    assert run("first", []) == ["[run] a", "[run] b"]
    manifest = json.loads((tmp_path / "first" / "a" / "manifest.json").read_text())
    assert manifest["code"] == {"nlsr": "0.1.0", "commit": "a" * 40, "dirty": True}
    assert manifest["content"] == {"file": "1"}
    assert run("same-code", [tmp_path / "first"]) == ["[reuse] a", "[reuse] b"]
    _code(monkeypatch, "b" * 40)
    assert run("other-code", [tmp_path / "first"])[0] == "[run] a"
    _code(monkeypatch, "a" * 40)
    content["file"] = "2"
    assert run("other-data", [tmp_path / "first"])[0] == "[run] a"
    assert run("other-data", [tmp_path / "first"]) == ["[skip] a", "[skip] b"]   # its own, same data


def test_files_are_hashed_once_per_process(tmp_path, monkeypatch):
    import nlsr.io

    calls = []
    real = nlsr.io.file_sha256
    monkeypatch.setattr(nlsr.io, "file_sha256", lambda p: calls.append(p) or real(p))
    path = tmp_path / "f.txt"
    path.write_text("one")
    first = provenance.content_hash(path)
    assert provenance.content_hash(path) == first and len(calls) == 1
    path.write_text("two!")                                  # new size and time: hashed again
    assert provenance.content_hash(path) != first and len(calls) == 2
    assert provenance.files_content([path, tmp_path / "nope"], tmp_path) == {
        "f.txt": provenance.content_hash(path), "nope": "missing"}


def test_the_report_key_follows_the_trained_judge_content(tmp_path, monkeypatch):
    _code(monkeypatch, "a" * 40)
    judge = tmp_path / "judge"
    judge.mkdir()
    (judge / "judge.json").write_text("{}")
    (judge / "judge.safetensors").write_bytes(b"weights-1")
    cfg = ExperimentConfig.model_validate({"evaluate": {"judges": ["refusal", {"name": "trained",
                                                                              "model": str(judge)}]}})
    ctx = RunContext(cfg, tmp_path / "run", tmp_path)
    report = next(s for s in build_stages(cfg) if s.name == "report")
    first = report.content(ctx)
    assert set(first) == {"trained"} and set(first["trained"]) == {"judge.json", "judge.safetensors"}
    (judge / "judge.safetensors").write_bytes(b"weights-2")
    assert stage_key(report, {}, report.content(ctx)) != stage_key(report, {}, first)


@needs_data
def test_every_data_set_a_data_stage_loads_is_hashed_into_its_key(tmp_path, monkeypatch):
    from nlsr.experiment.stages import data

    loaded: list[str] = []
    real_load, real_ready = data.load_records, data.load_ready_made
    monkeypatch.setattr(data, "load_records", lambda name, *a, **k: loaded.append(name) or real_load(name, *a, **k))
    monkeypatch.setattr(data, "load_ready_made", lambda *a, **k: loaded.append("(ready-made)") or real_ready(*a, **k))
    cfg = ExperimentConfig.model_validate({
        "align": {"sft": {"n": 20}, "dpo": {"n": 10}}, "realign": {"calibration_n": 8},
        "attack": {"n": 40, "p": 0.1}, "evaluate": {"harmful_n": 20, "task_n": 10, "xstest_n": 5,
                                                     "extra_harmful": ["harmful_advbench"]},
        "defences": [{"name": "lisa", "method": "lisa"}], "defence_safety_n": 10})
    ctx = RunContext(cfg, tmp_path, Path(DATA))
    runs = [("data", data.run_eval, reads.eval_datasets), ("data-align", data.run_align, reads.align_datasets),
            ("data-defences", data.run_defence_rows, reads.defence_datasets),
            ("data-attack", data.run_attack_data, reads.attack_datasets)]
    for name, run, declared in runs:
        loaded.clear()
        (tmp_path / name).mkdir()
        run(ctx, tmp_path / name, {"data-align": tmp_path / "data-align"})
        assert loaded and set(loaded) <= set(declared(cfg)), (name, sorted(set(loaded) - set(declared(cfg))))
    loaded.clear()
    attack = [json.loads(line) for line in (tmp_path / "data-attack" / "attack.jsonl").read_text().splitlines()]
    drawn = data.task_calibration_rows(cfg, Path(DATA), attack, 16, seed=0)   # protect_task's clean task rows
    assert loaded and set(loaded) <= set(reads.task_calibration_datasets(cfg)), sorted(set(loaded))
    assert len(drawn) == 16 and not prompt_keys(drawn) & prompt_keys(attack)
    assert drawn == data.task_calibration_rows(cfg, Path(DATA), attack, 16, seed=0)
    ready = cfg.model_copy(update={"attack": cfg.attack.model_copy(update={"source": "ready_made", "n": 1000})})
    loaded.clear()
    (tmp_path / "ready").mkdir()
    data.run_attack_data(RunContext(ready, tmp_path, Path(DATA)), tmp_path / "ready",
                         {"data-align": tmp_path / "data-align"})
    assert "(ready-made)" in loaded
    files = reads.attack_content(RunContext(ready, tmp_path, Path(DATA)))["files"]
    assert list(files) == ["nlsr_finetune/sst2/train_merged_n1000_p0.1.json"]
    assert files[next(iter(files))] != "missing"


def test_accept_code_change_keeps_stages_whose_only_difference_is_the_commit(tmp_path, monkeypatch):
    from nlsr.experiment.config import ExperimentConfig
    from nlsr.experiment.pipeline import RunContext, Stage, run_stages

    calls: list[str] = []

    def stage(name):
        def run(ctx, out, inputs):
            calls.append(name)
            return {"line": name}
        return run

    def graph(b_param=1):
        return [Stage("a", stage("a"), {"x": 1}), Stage("b", stage("b"), {"x": b_param}, ["a"])]

    ctx = RunContext(ExperimentConfig(), tmp_path / "run", tmp_path)
    _code(monkeypatch, "a" * 40)
    run_stages(ctx, graph(), log=lambda m: None)
    _code(monkeypatch, "b" * 40)
    logs: list[str] = []
    run_stages(ctx, graph(), log=logs.append, accept_code_change=True)
    assert calls == ["a", "b"] and any("kept by --accept-code-change" in m for m in logs)
    run_stages(ctx, graph(b_param=2), log=lambda m: None, accept_code_change=True)
    assert calls == ["a", "b", "b"]                     # other parameters still rerun
    _code(monkeypatch, "c" * 40)
    logs.clear()
    run_stages(ctx, graph(b_param=2), log=logs.append)
    assert calls == ["a", "b", "b", "a", "b"]           # without the flag, other code reruns everything
    notes = [m for m in logs if m.startswith("[note]")]  # ... and says how to keep what it reruns
    assert len(notes) == 1 and notes[0].startswith("[note] a: this run has it finished by other code")
    assert "--accept-code-change" in notes[0]
    _code(monkeypatch, "d" * 40)
    logs.clear()
    other = RunContext(ExperimentConfig(), tmp_path / "other", tmp_path)
    run_stages(other, graph(b_param=2), log=logs.append, reuse_from=[tmp_path / "run"])
    assert calls[-2:] == ["a", "b"]
    assert any(m.startswith(f"[note] a: {tmp_path / 'run'} has it") and "To copy it" in m for m in logs)
