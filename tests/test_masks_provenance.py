"""Masks record what they were made from, and realign refuses masks of another adapter (issue 13)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import CALIBRATION_ROWS, perturbed, random_adapter, write_jsonl
from nlsr.cli import app
from nlsr.errors import NlsrError
from nlsr.experiment.stages.realign import random_masks
from nlsr.io import file_sha256
from nlsr.method.calibration import CalibrationRow
from nlsr.method.identify import identify
from nlsr.method.masks import SafetyMasks, load_masks, masks_fingerprint, save_masks
from nlsr.method.realign import realign
from nlsr.weights.adapters import fingerprint, load_adapter, save_adapter

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_fingerprint_is_stable_and_tells_adapters_apart(tmp_path, shapes):
    adapter = random_adapter(shapes)
    save_adapter(adapter, tmp_path / "a")
    again = load_adapter(tmp_path / "a")
    assert fingerprint(again) == fingerprint(adapter)
    reordered = adapter.with_modules(dict(reversed(list(adapter.modules.items()))))
    assert fingerprint(reordered) == fingerprint(adapter)
    other = random_adapter(shapes, seed=3)
    assert fingerprint(other)["layout"] == fingerprint(adapter)["layout"]
    assert fingerprint(other)["content"] != fingerprint(adapter)["content"]
    subset = adapter.with_modules({n: f for n, f in adapter if "q_proj" in n})
    assert fingerprint(subset)["layout"] != fingerprint(adapter)["layout"]
    assert fingerprint(adapter)["modules"] == len(adapter) and fingerprint(adapter)["rank"] == 4


def test_identify_records_provenance(tiny_model, tiny_tokenizer, shapes, tmp_path):
    reference = random_adapter(shapes)
    rows = [CalibrationRow(**r) for r in CALIBRATION_ROWS]
    masks = identify(tiny_model, reference, rows, tiny_tokenizer, rho=0.5, q=0.3, batch_size=2,
                     progress=False, metadata={"beta": 0.9})
    meta = masks.metadata
    assert masks_fingerprint(masks) == fingerprint(reference)
    assert meta["granularity"] == "entry" and meta["template"] == "alpaca"   # the default: the paper's
    assert meta["rank_ratio"] == "0.5" and meta["keep_fraction"] == "0.3" and meta["beta"] == "0.9"
    assert meta["calibration_rows"] == str(len(rows))
    save_masks(masks, tmp_path / "m.safetensors")
    loaded = load_masks(tmp_path / "m.safetensors")
    assert loaded.metadata == meta and loaded.source == tmp_path / "m.safetensors"
    assert realign(reference, perturbed(reference, 0.01), loaded).decisions


@pytest.fixture
def chain(tmp_path, shapes, tiny_model_dir):
    aligned = random_adapter(shapes, base=str(tiny_model_dir))
    save_adapter(aligned, tmp_path / "aligned")
    save_adapter(perturbed(aligned, 0.05), tmp_path / "finetuned")
    write_jsonl(tmp_path / "calib.jsonl", CALIBRATION_ROWS)
    assert invoke("extrapolate", "--aligned", tmp_path / "aligned", "--out", tmp_path / "ref").exit_code == 0
    return tmp_path


def test_cli_identify_records_template_base_beta_and_calibration_hash(chain, tiny_model_dir):
    d = chain
    r = invoke("identify", "--base", tiny_model_dir, "--reference", d / "ref", "--calibration",
               d / "calib.jsonl", "--template", "alpaca", "--batch-size", 2, "--out", d / "m.safetensors")
    assert r.exit_code == 0, r.output
    assert "alpaca template" in r.output
    meta = load_masks(d / "m.safetensors").metadata
    assert json.loads(meta["reference_fingerprint"]) == fingerprint(load_adapter(d / "ref"))
    assert meta["template"] == "alpaca" and meta["base"] == str(tiny_model_dir)
    assert meta["beta"] == "0.9" and meta["reference"] == str(d / "ref")
    assert meta["calibration_sha256"] == file_sha256(d / "calib.jsonl")
    assert meta["nlsr_masks_format"] == "2" and meta["granularity"] == "entry"


def test_identify_base_mismatch_can_be_allowed(chain, tiny_model_dir):
    d = chain
    config = json.loads((d / "ref" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/same-model-other-name"
    (d / "ref" / "adapter_config.json").write_text(json.dumps(config))
    args = ["identify", "--base", tiny_model_dir, "--reference", d / "ref", "--calibration",
            d / "calib.jsonl", "--batch-size", 4, "--out", d / "m.safetensors"]
    r = invoke(*args)
    assert r.exit_code == 2 and "--allow-base-mismatch" in r.output
    r = invoke(*args, "--allow-base-mismatch")
    assert r.exit_code == 0, r.output
    assert "renamed" not in r.output                       # no PEFT warning passed on


def _realign(d, masks, *extra):
    return invoke("realign", "--reference", d / "ref", "--finetuned", d / "finetuned", "--masks", masks,
                  "--out", d / "out", *extra)


def test_realign_refuses_masks_of_another_reference_unless_allowed(chain, shapes):
    d = chain
    save_masks(random_masks(random_adapter(shapes, seed=9), 0.2, seed=0), d / "other.safetensors")
    r = _realign(d, d / "other.safetensors")
    assert r.exit_code == 2 and "another reference adapter" in r.output and str(d / "ref") in r.output
    assert not (d / "out").exists()
    r = _realign(d, d / "other.safetensors", "--allow-mask-mismatch")
    assert r.exit_code == 0, r.output


def test_old_masks_without_record_refused_then_allowed(chain):
    d = chain
    plain = random_masks(load_adapter(d / "ref"), 0.2, seed=0)
    save_masks(SafetyMasks(plain.masks, {"keep_fraction": "0.2"}), d / "old.safetensors")
    r = _realign(d, d / "old.safetensors")
    assert r.exit_code == 2 and "older masks file" in r.output and "nlsr identify" in r.output
    assert _realign(d, d / "old.safetensors", "--allow-mask-mismatch").exit_code == 0


def test_masks_of_more_modules_are_reported_or_subset_on_request(chain, shapes, tiny_model_dir):
    d = chain
    full = load_adapter(d / "ref")
    save_masks(random_masks(full, 0.2, seed=0), d / "full.safetensors")
    for name in ("ref", "finetuned"):
        adapter = load_adapter(d / name)
        save_adapter(adapter.with_modules({n: f for n, f in adapter if "q_proj" in n or "v_proj" in n}),
                     d / name, force=True)
    r = _realign(d, d / "full.safetensors")
    assert r.exit_code == 2 and "masked modules are not in the reference adapter" in r.output
    r = _realign(d, d / "full.safetensors", "--allow-mask-mismatch")
    assert r.exit_code == 0, r.output
    assert json.loads((d / "out" / "realign_report.json").read_text())["summary"]["modules"] == 4


def test_in_memory_masks_without_metadata_are_taken_as_given(shapes):
    reference = random_adapter(shapes)
    masks = random_masks(reference, 0.2, seed=0)
    bare = SafetyMasks(masks.masks)
    assert realign(reference, perturbed(reference, 0.01), bare).decisions
    with pytest.raises(NlsrError, match="another reference adapter"):
        realign(random_adapter(shapes, seed=4), perturbed(reference, 0.01), masks, min_origin_cosine=0)


def test_pipeline_random_masks_carry_the_fingerprint(shapes):
    reference = random_adapter(shapes)
    masks = random_masks(reference, 0.2, seed=0, beta=0.9)
    assert masks_fingerprint(masks) == fingerprint(reference)
    assert masks.metadata["random"] == "true" and masks.metadata["beta"] == "0.9"


@pytest.mark.parametrize("kind", ["identified", "random"])
def test_pipeline_identify_then_realign_stage(tmp_path, shapes, tiny_model_dir, kind):
    from nlsr.experiment.config import ExperimentConfig, VariantSection
    from nlsr.experiment.pipeline import RunContext
    from nlsr.experiment.stages.realign import identify_id, run_identify, run_variant

    cfg = ExperimentConfig(model=str(tiny_model_dir), template="chat", precision="float32", device="cpu",
                           realign={"batch_size": 4, "max_length": 64})
    ctx = RunContext(cfg, tmp_path / "run", tmp_path)
    aligned = random_adapter(shapes, base=str(tiny_model_dir))
    for name in ("align_dpo", "attack", "data-align", "align_sft"):
        (tmp_path / name).mkdir()
    save_adapter(aligned, tmp_path / "align_dpo" / "adapter")
    save_adapter(perturbed(aligned, 0.05), tmp_path / "attack" / "adapter")
    write_jsonl(tmp_path / "data-align" / "calibration.jsonl", CALIBRATION_ROWS)
    (tmp_path / "align_sft" / "model").symlink_to(tiny_model_dir)
    variant = VariantSection(name="v", masks=kind)
    stage = f"identify-{identify_id(variant)}"
    partial = tmp_path / "run" / f"{stage}.partial"
    partial.mkdir(parents=True)
    inputs = {name: tmp_path / name for name in ("align_dpo", "attack", "data-align", "align_sft", "data")}
    summary = run_identify(variant)(ctx, partial, inputs)
    partial.rename(tmp_path / "run" / stage)
    meta = load_masks(tmp_path / "run" / stage / "masks.safetensors").metadata
    assert meta["reference"] == str(tmp_path / "run" / stage / "reference")
    assert meta["beta"] == "0.9" and meta["granularity"] == "entry" and summary["metadata"] == meta
    if kind == "identified":
        assert meta["template"] == "chat" and meta["base"].endswith("model")
        assert meta["calibration_sha256"] == file_sha256(tmp_path / "data-align" / "calibration.jsonl")
    out = tmp_path / "run" / "realign-v.partial"
    out.mkdir()
    result = run_variant(variant)(ctx, out, {**inputs, stage: tmp_path / "run" / stage})
    assert result["summary"]["modules"] == len(aligned)


def test_same_base_accepts_aliases_only(tmp_path, monkeypatch):
    from nlsr.weights.adapters import same_base

    (tmp_path / "runs" / "x" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "runs")                    # the relative path recorded elsewhere
    assert same_base("runs/x/model", str(tmp_path / "runs" / "x" / "model"))
    assert same_base("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2")
    assert not same_base("runs/x/model", str(tmp_path / "runs"))
    assert not same_base("org/a", "org/b")
