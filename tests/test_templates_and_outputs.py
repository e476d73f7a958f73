"""The template travels with the outputs (never guessed), and a repaired adapter loads anywhere."""

import json
import os
import stat

import pytest
from typer.testing import CliRunner

from conftest import CALIBRATION_ROWS, perturbed, random_adapter, write_jsonl
from nlsr.cli import app
from nlsr.method.checks import check_template
from nlsr.method.masks import load_masks
from nlsr.weights.adapters import save_adapter
from nlsr.weights.records import DEFAULT_TEMPLATE, RECORD_FILE, record_bytes, recorded_template

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def made(tmp_path, shapes, tiny_model_dir):
    aligned = random_adapter(shapes, base=str(tiny_model_dir))
    save_adapter(aligned, tmp_path / "aligned", extra_files={RECORD_FILE: record_bytes(template="chat")})
    save_adapter(perturbed(aligned, 0.2), tmp_path / "ft-chat",
                 extra_files={RECORD_FILE: record_bytes(template="chat")})
    save_adapter(perturbed(aligned, 0.2), tmp_path / "ft-alpaca",
                 extra_files={RECORD_FILE: record_bytes(template="alpaca")})
    write_jsonl(tmp_path / "calib.jsonl", CALIBRATION_ROWS)
    r = invoke("extrapolate", "--aligned", tmp_path / "aligned", "--out", tmp_path / "ref")
    assert r.exit_code == 0, r.output
    return tmp_path


def identify(d, tiny_model_dir, out, *extra):
    return invoke("identify", "--base", tiny_model_dir, "--reference", d / "ref", "--calibration",
                  d / "calib.jsonl", "--out", d / out, "--batch-size", 2, *extra)


def test_reference_records_the_aligned_template_and_identify_uses_it(made, tiny_model_dir):
    assert recorded_template(made / "ref") == "chat"
    r = identify(made, tiny_model_dir, "m.safetensors")
    assert r.exit_code == 0, r.output
    assert "chat template: recorded in" in r.output
    assert load_masks(made / "m.safetensors").metadata["template"] == "chat"
    (made / "ref" / RECORD_FILE).unlink()                   # a reference that records nothing
    r = identify(made, tiny_model_dir, "m2.safetensors")
    assert r.exit_code == 0 and load_masks(made / "m2.safetensors").metadata["template"] == DEFAULT_TEMPLATE


def test_realign_refuses_masks_of_another_template_unless_told(made, tiny_model_dir):
    assert identify(made, tiny_model_dir, "m.safetensors").exit_code == 0     # chat masks
    args = ("realign", "--reference", made / "ref", "--masks", made / "m.safetensors")
    r = invoke(*args, "--finetuned", made / "ft-alpaca", "--out", made / "out")
    assert r.exit_code == 2 and "identified with the 'chat' template" in r.output, r.output
    assert not (made / "out").exists()
    r = invoke(*args, "--finetuned", made / "ft-alpaca", "--out", made / "out", "--template", "alpaca")
    assert r.exit_code == 0, r.output
    assert recorded_template(made / "out") == "alpaca"
    r = invoke(*args, "--finetuned", made / "ft-chat", "--out", made / "out-chat")
    assert r.exit_code == 0 and recorded_template(made / "out-chat") == "chat"


def test_check_template_rules():
    assert check_template("alpaca", None) == "alpaca"
    assert check_template(None, "chat") == "chat"
    assert check_template("alpaca", "chat", explicit="chat") == "chat"
    with pytest.raises(Exception, match="--template"):
        check_template("alpaca", "chat")


def test_repaired_adapter_loads_from_another_directory(tmp_path, shapes, tiny_model_dir, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    work = tmp_path / "work"
    work.mkdir()
    os.symlink(tiny_model_dir, work / "base")
    monkeypatch.chdir(work)                       # the base named by a relative path, as users do
    aligned = random_adapter(shapes, base="base")
    save_adapter(aligned, "aligned")
    save_adapter(perturbed(aligned, 0.2), "ft")
    write_jsonl(work / "calib.jsonl", CALIBRATION_ROWS)
    for args in (("extrapolate", "--aligned", "aligned", "--out", "ref"),
                 ("identify", "--base", "base", "--reference", "ref", "--calibration", "calib.jsonl",
                  "--out", "m.safetensors", "--batch-size", 2),
                 ("realign", "--reference", "ref", "--finetuned", "ft", "--masks", "m.safetensors", "--out", "out")):
        r = invoke(*args)
        assert r.exit_code == 0, r.output
    config = json.loads((work / "out" / "adapter_config.json").read_text())
    assert os.path.isabs(config["base_model_name_or_path"])
    for file in (work / "out").iterdir():
        assert file.stat().st_mode & stat.S_IROTH, f"{file.name} is not readable by others"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = AutoPeftModelForCausalLM.from_pretrained(str(work / "out"))
    assert model.peft_config["default"].r >= 1


def test_realign_self_check_reports_what_the_form_alone_erases(made, tiny_model_dir):
    assert identify(made, tiny_model_dir, "m.safetensors").exit_code == 0
    for form, erases in (("exact", True), ("block", False)):
        r = invoke("realign", "--reference", made / "ref", "--masks", made / "m.safetensors", "--finetuned",
                   made / "ft-chat", "--out", made / f"out-{form}", "--transplant", form, "--self-check")
        assert r.exit_code == 0, r.output
        change = json.loads((made / f"out-{form}" / "realign_report.json").read_text())["summary"]
        assert (change["self_transplant_change"] > 0.05) if erases else (change["self_transplant_change"] < 1e-6)
        assert "form alone" in r.output
