"""How the command line reports errors (--debug, unexpected exceptions, failed writes) and prints."""

from __future__ import annotations

import errno

import pytest
from typer.testing import CliRunner

from conftest import random_adapter
from nlsr.cli import app
from nlsr.errors import NlsrError
from nlsr.weights.adapters import LoraAdapter, save_adapter

runner = CliRunner()


def invoke(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv("NLSR_DEBUG", raising=False)


def test_debug_option_and_env_show_the_exception(tmp_path, monkeypatch):
    r = invoke("inspect", tmp_path / "nope")
    assert r.exit_code == 2 and r.output.startswith("error:") and r.exception.__class__ is SystemExit
    r = invoke("--debug", "inspect", tmp_path / "nope")
    assert isinstance(r.exception, NlsrError)              # propagates: typer prints the traceback
    r = invoke("inspect", tmp_path / "nope")                # the option does not stick
    assert r.exit_code == 2
    monkeypatch.setenv("NLSR_DEBUG", "1")
    r = invoke("inspect", tmp_path / "nope")
    assert isinstance(r.exception, NlsrError)
    monkeypatch.setenv("NLSR_DEBUG", "0")
    assert invoke("inspect", tmp_path / "nope").exit_code == 2


def test_unexpected_exception_is_one_line_naming_debug(tmp_path, shapes, monkeypatch):
    save_adapter(random_adapter(shapes), tmp_path / "a")

    def broken(*_args, **_kwargs):
        raise TypeError("something internal")
    monkeypatch.setattr("nlsr.method.extrapolate.extrapolate", broken)
    r = invoke("extrapolate", "--aligned", tmp_path / "a", "--out", tmp_path / "ref")
    assert r.exit_code == 1
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert lines == ["error: unexpected TypeError: something internal (a bug or an unusual input; "
                     "--debug (or NLSR_DEBUG=1) shows the traceback)"]
    assert not (tmp_path / "ref").exists()


def test_failed_write_is_one_line_and_leaves_nothing(tmp_path, shapes, monkeypatch):
    save_adapter(random_adapter(shapes), tmp_path / "a")

    def full_disk(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))
    monkeypatch.setattr("nlsr.weights.adapters.save_file", full_disk)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = invoke("extrapolate", "--aligned", tmp_path / "a", "--out", tmp_path / "ref")
    assert r.exit_code == 2, r.output
    assert "writing" in r.output and "No space left on device" in r.output and "nothing was written" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_os_errors_outside_atomic_writes_name_the_file(tmp_path):
    from nlsr.cli.common import describe_unexpected

    line, status = describe_unexpected(OSError(errno.EROFS, "Read-only file system", "/ro/x"))
    assert status == 2 and "'/ro/x'" in line and "writable" in line


def test_inspect_never_cuts_module_names(tmp_path):
    import torch

    from nlsr.weights.adapters import LoraFactors

    name = "model.layers.0." + "very_long_submodule_name." * 4 + "q_proj"
    adapter = LoraAdapter(config={"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": "b"},
                          modules={name: LoraFactors(torch.ones(2, 3), torch.ones(5, 2), 2.0)})
    save_adapter(adapter, tmp_path / "a")
    r = invoke("inspect", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert name in r.output


def test_similarity_legend_draws_kinds_hollow(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    from nlsr.experiment.plots import plot_similarity_by_layer
    from nlsr.method.realign import ModuleDecision

    decisions = [ModuleDecision(f"model.layers.{i}.self_attn.{k}", i, k, 0.5, 0.5, repaired=(k == "v_proj"))
                 for i in range(3) for k in ("q_proj", "v_proj")]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    plot_similarity_by_layer(decisions, tmp_path / "p.png")
    handles = figures[0].axes[0].get_legend().legend_handles
    faces = {h.get_label(): h.get_markerfacecolor() for h in handles}
    assert set(faces) == {"q_proj", "v_proj", "repaired", "kept"}
    assert to_rgba(faces["v_proj"])[3] == 0 and to_rgba(faces["q_proj"])[3] == 0   # hollow
    assert to_rgba(faces["repaired"])[3] == 1


def test_progress_outside_a_terminal_prints_plain_lines(capsys):
    from nlsr.progress import track

    assert list(track(list(range(4)), "calibration pass")) == [0, 1, 2, 3]
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "calibration pass: 4 batches" and err[-1].startswith("calibration pass: 4/4 batches in")
    assert list(track([1], "x", enabled=False)) == [1] and capsys.readouterr().err == ""


def test_generation_reports_progress_in_a_log(tiny_model, tiny_tokenizer, capsys):
    from nlsr.evaluation.generation import generate

    generate(tiny_model, tiny_tokenizer, ["a", "b", "c"], max_new_tokens=2, batch_size=1, description="answering")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "answering: 3 prompts" and err[-1].startswith("answering: 3/3 prompts in")


def test_progress_in_a_terminal_draws_a_bar(monkeypatch):
    import io

    from rich.console import Console

    from nlsr import progress

    buffer = io.StringIO()
    monkeypatch.setattr("rich.console.Console", lambda **kw: Console(file=buffer, force_terminal=True, width=80))
    assert list(progress.track(list(range(3)), "calibration pass")) == [0, 1, 2]
    assert "calibration pass" in buffer.getvalue() and "100%" in buffer.getvalue()


def test_closed_pipe_ends_quietly(tmp_path, shapes, monkeypatch):
    save_adapter(random_adapter(shapes), tmp_path / "a")

    def closed(_message):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")
    monkeypatch.setattr("nlsr.cli.repair.say", closed)
    r = invoke("inspect", tmp_path / "a")                   # e.g. `nlsr inspect DIR | head`
    assert r.exit_code == 0 and "error" not in r.output
