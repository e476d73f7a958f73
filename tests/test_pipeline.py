"""Manifests, skip-if-done, rerun on change, resume after a kill."""

import json

import pytest

from nlsr.experiment.config import ExperimentConfig
from nlsr.experiment.pipeline import RunContext, Stage, run_stages


class Killed(Exception):
    pass


def _counting_stage(calls: list, name: str):
    def run(ctx, out, inputs):
        calls.append(name)
        upstream = {k: (v / "value.txt").read_text() for k, v in inputs.items()}
        (out / "value.txt").write_text(name + "|" + ",".join(sorted(upstream.values())))
        return {"line": f"{name} ok"}
    return run


def _graph(calls, b_param=1):
    return [Stage("a", _counting_stage(calls, "a"), {"x": 1}),
            Stage("b", _counting_stage(calls, "b"), {"x": b_param}, ["a"]),
            Stage("c", _counting_stage(calls, "c"), {}, ["b"])]


@pytest.fixture
def ctx(tmp_path):
    return RunContext(ExperimentConfig(), tmp_path / "run", tmp_path)


def test_finished_stages_are_skipped(ctx):
    calls = []
    first = run_stages(ctx, _graph(calls), log=lambda m: None)
    assert calls == ["a", "b", "c"]
    again = run_stages(ctx, _graph(calls), log=lambda m: None)
    assert calls == ["a", "b", "c"]
    assert {k: v["key"] for k, v in first.items()} == {k: v["key"] for k, v in again.items()}
    manifest = json.loads((ctx.run_dir / "b" / "manifest.json").read_text())
    assert manifest["inputs"] == {"a": first["a"]["key"]} and "torch" in manifest["versions"]


def test_changed_parameters_rerun_the_stage_and_everything_downstream(ctx):
    calls = []
    run_stages(ctx, _graph(calls), log=lambda m: None)
    run_stages(ctx, _graph(calls, b_param=2), log=lambda m: None)
    assert calls == ["a", "b", "c", "b", "c"]
    run_stages(ctx, _graph(calls, b_param=2), force={"a"}, log=lambda m: None)
    assert calls[-3:] == ["a", "b", "c"]          # a forced stage reruns everything downstream of it


def test_killed_stage_resumes_from_its_partial_state(ctx):
    attempts = []

    def resumable(ctx_, out, inputs):
        progress = out / "progress.txt"
        done = int(progress.read_text()) if progress.exists() else 0
        for step in range(done, 5):
            attempts.append(step)
            progress.write_text(str(step + 1))
            if step == 2 and len(attempts) == 3:
                raise Killed()
        return {"line": "finished"}

    graph = [Stage("a", resumable, {})]
    with pytest.raises(Killed):
        run_stages(ctx, graph, log=lambda m: None)
    assert (ctx.run_dir / "a.partial").exists() and not (ctx.run_dir / "a").exists()
    run_stages(ctx, graph, log=lambda m: None)
    assert attempts == [0, 1, 2, 3, 4]                    # steps 0-2 were not redone
    assert (ctx.run_dir / "a" / "manifest.json").exists() and not (ctx.run_dir / "a.partial").exists()


def test_partial_state_of_other_settings_is_discarded(ctx):
    def fail(ctx_, out, inputs):
        (out / "junk").write_text("x")
        raise Killed()

    with pytest.raises(Killed):
        run_stages(ctx, [Stage("a", fail, {"v": 1})], log=lambda m: None)

    def check(ctx_, out, inputs):
        assert not (out / "junk").exists()
        return {}
    run_stages(ctx, [Stage("a", check, {"v": 2})], log=lambda m: None)


def test_unknown_force_stage(ctx):
    from nlsr.errors import NlsrError

    with pytest.raises(NlsrError, match="unknown stages"):
        run_stages(ctx, _graph([]), force={"zz"}, log=lambda m: None)


def test_stages_done_elsewhere_with_the_same_key_are_reused(tmp_path):
    calls = []
    other = RunContext(ExperimentConfig(), tmp_path / "other", tmp_path)
    run_stages(other, _graph(calls), log=lambda m: None)
    source_manifest = (other.run_dir / "b" / "manifest.json").read_text()
    here = RunContext(ExperimentConfig(), tmp_path / "here", tmp_path)
    logs: list[str] = []
    manifests = run_stages(here, _graph(calls, b_param=2), log=logs.append, reuse_from=[other.run_dir])
    assert calls == ["a", "b", "c", "b", "c"]                # "a" copied; "b" changed, so it and "c" rerun
    assert manifests["a"]["reused_from"] == str(other.run_dir / "a")
    assert (here.run_dir / "a" / "value.txt").read_text() == "a|"
    assert any(m.startswith("[reuse] a") for m in logs)
    assert (other.run_dir / "b" / "manifest.json").read_text() == source_manifest   # source untouched
    assert "reused_from" not in json.loads((other.run_dir / "a" / "manifest.json").read_text())
    run_stages(here, _graph(calls, b_param=2), force={"a"}, reuse_from=[other.run_dir], log=lambda m: None)
    assert calls[5:] == ["a", "b", "c"]          # --force reruns instead of copying, and so does downstream


def test_a_bad_input_error_leaves_no_partial_folder(ctx):
    from nlsr.errors import NlsrError

    def bad(ctx_, out, inputs):
        (out / "half.txt").write_text("x")
        raise NlsrError("unknown dataset 'nope'")

    with pytest.raises(NlsrError):
        run_stages(ctx, [Stage("data-align", bad, {})], log=lambda m: None)
    assert not (ctx.run_dir / "data-align.partial").exists()


def test_a_bad_input_error_keeps_resumable_checkpoints(ctx):
    from nlsr.errors import NlsrError

    def bad(ctx_, out, inputs):
        (out / "adapter" / "checkpoint-25").mkdir(parents=True)
        raise NlsrError("disk full")

    with pytest.raises(NlsrError):
        run_stages(ctx, [Stage("attack", bad, {})], log=lambda m: None)
    assert (ctx.run_dir / "attack.partial" / "adapter" / "checkpoint-25").is_dir()


def test_resume_message_says_what_is_resumed(ctx, tmp_path):
    from nlsr.experiment.pipeline import describe_partial

    partial = tmp_path / "p"
    partial.mkdir()
    assert "nothing to resume" in describe_partial(partial)
    (partial / "harmful.cache.jsonl").write_text('{"i": 0, "output": "a"}\n{"i": 1, "output": "b"}\n')
    assert "2 answers" in describe_partial(partial)
    for step in (5, 25, 10):
        (partial / "adapter" / f"checkpoint-{step}").mkdir(parents=True)
    assert "checkpoint-25" in describe_partial(partial)

    state = {"runs": 0}

    def killed_once(ctx_, out, inputs):
        state["runs"] += 1
        if state["runs"] == 1:
            raise Killed()
        return {}

    with pytest.raises(Killed):
        run_stages(ctx, [Stage("a", killed_once, {})], log=lambda m: None)
    logs: list[str] = []
    run_stages(ctx, [Stage("a", killed_once, {})], log=logs.append)
    assert any(m.startswith("[resume] a: the interrupted run saved nothing") for m in logs)


def test_cli_outputs_get_ordinary_permissions(tmp_path):
    import os

    from nlsr.io import atomic_dir, atomic_file

    umask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
        with atomic_file(tmp_path / "f.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(umask)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644


def test_adapters_and_models_a_stage_writes_record_the_run_template(tmp_path):
    from nlsr.weights.records import recorded_template

    def writes_weights(ctx, out, inputs):
        for folder, config in (("adapter", "adapter_config.json"), ("model", "config.json"),
                               ("adapter/checkpoint-2", "adapter_config.json")):
            (out / folder).mkdir(parents=True, exist_ok=True)
            (out / folder / config).write_text("{}")
        return {"line": "ok"}

    cfg = ExperimentConfig(template="chat")
    run_stages(RunContext(cfg, tmp_path / "run", tmp_path), [Stage("w", writes_weights, {})], log=lambda m: None)
    stage = tmp_path / "run" / "w"
    assert recorded_template(stage / "adapter") == recorded_template(stage / "model") == "chat"
    assert not (stage / "adapter" / "checkpoint-2" / "nlsr.json").exists()
