"""Manifests, skip-if-done, rerun on change, resume after a kill."""

import json

import pytest

from nlsr.config import ExperimentConfig
from nlsr.pipeline import RunContext, Stage, run_stages


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
    assert calls[-3:] == ["a", "b", "c"] or calls[-1] == "a"


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
    assert calls[5:] == ["a"]                                # --force reruns instead of copying
