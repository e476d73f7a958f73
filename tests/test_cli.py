"""The command line end to end on the tiny model, and its refusals of bad input."""

import json

import pytest
from typer.testing import CliRunner

from conftest import CALIBRATION_ROWS, perturbed, random_adapter, write_jsonl
from nlsr.cli import app
from nlsr.weights.adapters import load_adapter, save_adapter

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def adapters(tmp_path, shapes, tiny_model_dir):
    aligned = random_adapter(shapes, base=str(tiny_model_dir))
    save_adapter(aligned, tmp_path / "aligned")
    save_adapter(perturbed(aligned, 0.2), tmp_path / "finetuned")
    write_jsonl(tmp_path / "calib.jsonl", CALIBRATION_ROWS)
    return tmp_path


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_full_cli_chain(adapters, tiny_model_dir):
    d = adapters
    r = invoke("extrapolate", "--aligned", d / "aligned", "--beta", 0.9, "--out", d / "ref")
    assert r.exit_code == 0, r.output
    r = invoke("identify", "--base", tiny_model_dir, "--reference", d / "ref", "--calibration",
               d / "calib.jsonl", "--rank-ratio", 0.8, "--keep", 0.2, "--out", d / "masks.safetensors",
               "--batch-size", 2)
    assert r.exit_code == 0, r.output
    assert "response tokens" in r.output
    r = invoke("realign", "--reference", d / "ref", "--finetuned", d / "finetuned", "--masks",
               d / "masks.safetensors", "--select", "paper", "--transplant", "exact", "--out",
               d / "repaired")
    assert r.exit_code == 0, r.output
    report = json.loads((d / "repaired" / "realign_report.json").read_text())
    assert report["summary"]["modules"] == len(load_adapter(d / "finetuned"))
    assert (d / "repaired" / "similarity_by_layer.png").stat().st_size > 1000
    load_adapter(d / "repaired")
    r = invoke("safelora", "--aligned", d / "aligned", "--finetuned", d / "finetuned",
               "--num-modules", 2, "--out", d / "safelora")
    assert r.exit_code == 0, r.output
    assert "projected 2 of" in r.output
    r = invoke("inspect", d / "repaired")
    assert r.exit_code == 0 and "modules" in r.output


def test_existing_output_refused_without_force(adapters):
    d = adapters
    (d / "ref").mkdir()
    (d / "ref" / "keep.txt").write_text("user data")
    r = invoke("extrapolate", "--aligned", d / "aligned", "--out", d / "ref")
    assert r.exit_code == 2
    assert "already exists" in r.output and "--force" in r.output
    assert (d / "ref" / "keep.txt").read_text() == "user data"
    r = invoke("extrapolate", "--aligned", d / "aligned", "--out", d / "ref", "--force")
    assert r.exit_code == 0, r.output
    assert not (d / "ref" / "keep.txt").exists()
    load_adapter(d / "ref")


def test_empty_calibration_file_fails_and_writes_nothing(adapters, tiny_model_dir):
    d = adapters
    (d / "empty.jsonl").write_text("\n")
    before = _entries(d)
    r = invoke("identify", "--base", tiny_model_dir, "--reference", d / "aligned",
               "--calibration", d / "empty.jsonl", "--out", d / "m.safetensors")
    assert r.exit_code == 2
    assert "has no rows" in r.output
    assert _entries(d) == before


def test_calibration_rows_without_fields(adapters, tiny_model_dir):
    d = adapters
    write_jsonl(d / "bad.jsonl", [{"prompt": "x", "answer": "y"}])
    r = invoke("identify", "--base", tiny_model_dir, "--reference", d / "aligned",
               "--calibration", d / "bad.jsonl", "--out", d / "m.safetensors")
    assert r.exit_code == 2 and "bad.jsonl:1" in r.output and "'response'" in r.output


def test_nan_adapter_fails_and_writes_nothing(adapters, shapes):
    d = adapters
    broken = random_adapter(shapes)
    name = next(iter(broken.modules))
    broken.modules[name].A[0, 1] = float("nan")
    save_adapter(broken, d / "nan")
    before = _entries(d)
    r = invoke("extrapolate", "--aligned", d / "nan", "--out", d / "ref")
    assert r.exit_code == 2 and "NaN" in r.output and name in r.output
    assert _entries(d) == before


def test_mismatched_adapters_fail_without_partial_output(adapters, shapes, tiny_model_dir):
    d = adapters
    invoke("extrapolate", "--aligned", d / "aligned", "--out", d / "ref")
    save_adapter(random_adapter(shapes, rank=2, base=str(tiny_model_dir)), d / "rank2")
    r = invoke("identify", "--base", tiny_model_dir, "--reference", d / "ref", "--calibration",
               d / "calib.jsonl", "--out", d / "masks.safetensors")
    assert r.exit_code == 0, r.output
    before = _entries(d)
    r = invoke("realign", "--reference", d / "ref", "--finetuned", d / "rank2", "--masks",
               d / "masks.safetensors", "--out", d / "repaired")
    assert r.exit_code == 2
    assert "rank 4 in the reference adapter but 2" in r.output
    assert _entries(d) == before                     # no 'repaired', no '.repaired.partial-*'


def test_pickle_adapter_needs_opt_in(adapters):
    import torch

    d = adapters
    src = load_adapter(d / "aligned")
    (d / "pickled").mkdir()
    torch.save({f"base_model.model.{n}.lora_{x}.weight": getattr(f, x) for n, f in src for x in "AB"},
               d / "pickled" / "adapter_model.bin")
    (d / "pickled" / "adapter_config.json").write_text((d / "aligned" / "adapter_config.json").read_text())
    r = invoke("extrapolate", "--aligned", d / "pickled", "--out", d / "ref")
    assert r.exit_code == 2 and "pickle" in r.output and not (d / "ref").exists()
    r = invoke("extrapolate", "--aligned", d / "pickled", "--out", d / "ref", "--allow-pickle")
    assert r.exit_code == 0, r.output


def test_threshold_rule_without_threshold(adapters):
    d = adapters
    r = invoke("realign", "--reference", d / "aligned", "--finetuned", d / "finetuned", "--masks",
               d / "none.safetensors", "--select", "threshold", "--out", d / "x")
    assert r.exit_code == 2 and not (d / "x").exists()


def test_export_force_keeps_the_files_it_did_not_write(tmp_path):
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "report" / "manifest.json").write_text(json.dumps({"key": "k"}))
    (run / "report" / "report.md").write_text("new report")
    (run / "attack").mkdir()
    (run / "attack" / "manifest.json").write_text(json.dumps({"key": "a"}))
    (run / "attack" / "report.json").write_text("{}")
    out = tmp_path / "results"
    out.mkdir()
    (out / "README.md").write_text("the command that made this")
    (out / "report.md").write_text("old report")
    (out / "realign-gone.report.json").write_text("{}")              # a stage the new run lacks
    result = invoke("export", run, out)
    assert result.exit_code == 2 and "already exists" in result.output
    result = invoke("export", run, out, "--force")
    assert result.exit_code == 0, result.output
    assert (out / "README.md").read_text() == "the command that made this"
    assert (out / "report.md").read_text() == "new report"
    assert _entries(out) == ["README.md", "attack.report.json", "manifest.json",
                             "manifests.json", "report.md"]
