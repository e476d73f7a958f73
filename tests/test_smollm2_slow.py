"""The real thing: identify and realign on the embedded SmolLM2-135M-Instruct (slow)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import TARGETS, module_shapes, perturbed, pipeline_data_dir, random_adapter
from nlsr.cli import app
from nlsr.weights.adapters import load_adapter, save_adapter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from nlsr.weights.models import load_model, load_tokenizer, resolve_model_path

    return resolve_model_path("smollm2"), load_model("smollm2"), load_tokenizer("smollm2")


def test_identify_and_realign_on_smollm2(tmp_path, smollm2):
    data = pipeline_data_dir()   # 8 SPARD rows: the bundled subset has them when the full data is absent
    path, model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and tokenizer.eos_token == "<|im_end|>"
    aligned = random_adapter(module_shapes(model, TARGETS), rank=4, alpha=8, base=path)
    aligned = aligned.with_modules({n: type(f)(f.A, f.B * 0.05, f.scale) for n, f in aligned})
    save_adapter(aligned, tmp_path / "aligned")
    save_adapter(perturbed(aligned, noise=0.01), tmp_path / "finetuned")
    spard = data / "beavertails_derived_spard" / "train_beaverTails_train.jsonl"
    runner = CliRunner()

    def ok(*args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    ok("extrapolate", "--aligned", tmp_path / "aligned", "--beta", 0.9, "--out", tmp_path / "ref")
    out = ok("identify", "--base", "smollm2", "--reference", tmp_path / "ref", "--calibration", spard,
             "--response-field", "safe", "--limit", 8, "--max-length", 256,
             "--out", tmp_path / "masks.safetensors")
    assert "masks for 120 modules from 8 rows" in out
    ok("realign", "--reference", tmp_path / "ref", "--finetuned", tmp_path / "finetuned", "--masks",
       tmp_path / "masks.safetensors", "--out", tmp_path / "repaired")
    report = json.loads((tmp_path / "repaired" / "realign_report.json").read_text())
    assert report["summary"]["modules"] == 120
    assert 0 < report["summary"]["repaired"] < 120
    assert all(-1 <= row["similarity"] <= 1 for row in report["modules"])

    from peft import PeftModel

    repaired = load_adapter(tmp_path / "repaired")
    peft_model = PeftModel.from_pretrained(model, tmp_path / "repaired")
    ids = tokenizer("Hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(peft_model(input_ids=ids).logits).all()
    # a repaired module becomes rank 3r under the default block form (the fine-tune, plus the reference's
    # masked block, minus its own), and its update changed
    name = next(row["module"] for row in report["modules"] if row["repaired"])
    before = load_adapter(tmp_path / "finetuned").modules[name]
    assert repaired.modules[name].rank == 3 * 4
    assert not torch.allclose(repaired.modules[name].delta(), before.delta())
    layer = peft_model.get_submodule(f"base_model.model.{name}")
    assert torch.equal(layer.lora_A["default"].weight, repaired.modules[name].A)
    peft_model.unload()
