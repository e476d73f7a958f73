"""Identification of a model dispatched by accelerate (device_map / max_memory / offload_folder):
same Gram matrices and masks as the model on one device, and the model left as it was."""

import pytest
import torch
from typer.testing import CliRunner

from conftest import CALIBRATION_ROWS, random_adapter, write_jsonl
from nlsr.errors import NlsrError
from nlsr.method.activations import accumulate_grams
from nlsr.method.calibration import CalibrationRow
from nlsr.method.identify import identify
from nlsr.method.masks import load_masks
from nlsr.weights.adapters import save_adapter
from nlsr.weights.models import load_model, parse_max_memory
from nlsr.weights.synthetic import module_shapes

ROWS = [CalibrationRow(r["prompt"], r["response"]) for r in CALIBRATION_ROWS]
# Room for the embeddings and the first decoder layer of the tiny model (about 64 KB); the second
# layer, the final norm and the LM head go to disk.
CPU_CAP = "cpu=100000"


@pytest.fixture
def dispatched(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir, device="cpu", precision="float32", max_memory=CPU_CAP,
                       offload_folder=tmp_path / "offload")
    placed = set(model.hf_device_map.values())
    assert {"cpu", "disk"} <= placed, model.hf_device_map       # the test needs both
    return model


@pytest.mark.parametrize("targets", [("q_proj", "v_proj", "up_proj", "down_proj"), ("q_proj", "lm_head")])
def test_offloaded_model_gives_the_same_grams_and_masks(tiny_model, tiny_tokenizer, dispatched, targets):
    reference = random_adapter(module_shapes(tiny_model, targets), rank=4)
    plain, plain_tokens = accumulate_grams(tiny_model, reference, ROWS, tiny_tokenizer, batch_size=2,
                                           progress=False)
    spread, spread_tokens = accumulate_grams(dispatched, reference, ROWS, tiny_tokenizer, batch_size=2,
                                             progress=False)
    assert plain_tokens == spread_tokens
    assert list(plain) == list(spread) == list(reference.modules)
    for name in plain:
        torch.testing.assert_close(spread[name].gram.cpu(), plain[name].gram, rtol=1e-6, atol=1e-8)
    a = identify(tiny_model, reference, ROWS, tiny_tokenizer, rho=0.5, q=0.25, batch_size=2, progress=False)
    b = identify(dispatched, reference, ROWS, tiny_tokenizer, rho=0.5, q=0.25, batch_size=2, progress=False)
    assert set(a.masks) == set(b.masks)
    for key in a.masks:
        assert torch.equal(a.masks[key], b.masks[key]), key


def test_offloaded_pass_leaves_the_model_as_it_was(tiny_model, tiny_tokenizer, dispatched):
    reference = random_adapter(module_shapes(tiny_model, ("q_proj", "down_proj")))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        before = dispatched(input_ids=ids).logits
    names = [n for n, _ in dispatched.named_modules()]
    accumulate_grams(dispatched, reference, ROWS[:2], tiny_tokenizer, progress=False)
    assert [n for n, _ in dispatched.named_modules()] == names
    assert not any(m._forward_hooks for m in dispatched.modules())
    with torch.no_grad():
        torch.testing.assert_close(dispatched(input_ids=ids).logits, before, rtol=0, atol=0)
        torch.testing.assert_close(tiny_model(input_ids=ids).logits, before, rtol=1e-6, atol=1e-6)


def test_offloaded_model_refuses_an_adapter_of_another_model(tiny_tokenizer, dispatched):
    wrong = random_adapter({"model.layers.0.self_attn.q_proj": (16, 32)})
    with pytest.raises(NlsrError, match="does not fit"):
        accumulate_grams(dispatched, wrong, ROWS[:1], tiny_tokenizer, progress=False)
    missing = random_adapter({"model.layers.9.self_attn.q_proj": (32, 32)})
    with pytest.raises(NlsrError, match="does not fit"):
        accumulate_grams(dispatched, missing, ROWS[:1], tiny_tokenizer, progress=False)
    assert not any(m._forward_hooks for m in dispatched.modules())


def test_parse_max_memory():
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200000") == {0: "70GiB", 1: "70GiB", "cpu": 200000}
    assert parse_max_memory(None) is None and parse_max_memory(" ") is None
    with pytest.raises(NlsrError, match="DEVICE=SIZE"):
        parse_max_memory("70GiB")


def test_cli_identify_with_offload_matches_the_plain_run(tmp_path, tiny_model, tiny_model_dir):
    from nlsr.cli import app

    reference = random_adapter(module_shapes(tiny_model, ("q_proj", "v_proj")), base=str(tiny_model_dir))
    save_adapter(reference, tmp_path / "ref")
    write_jsonl(tmp_path / "calib.jsonl", CALIBRATION_ROWS)
    common = ["identify", "--base", str(tiny_model_dir), "--reference", str(tmp_path / "ref"),
              "--calibration", str(tmp_path / "calib.jsonl"), "--batch-size", "2", "--device", "cpu",
              "--precision", "float32"]
    runner = CliRunner()
    plain = runner.invoke(app, [*common, "--out", str(tmp_path / "plain.safetensors")])
    assert plain.exit_code == 0, plain.output
    spread = runner.invoke(app, [*common, "--out", str(tmp_path / "spread.safetensors"),
                                 "--max-memory", CPU_CAP, "--offload-folder", str(tmp_path / "offload")])
    assert spread.exit_code == 0, spread.output
    a, b = load_masks(tmp_path / "plain.safetensors"), load_masks(tmp_path / "spread.safetensors")
    assert set(a.masks) == set(b.masks)
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
