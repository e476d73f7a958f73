"""Neuron granularity end to end: a fresh LoRA of another rank (through a PEFT merge), a LoRA on the
merged aligned model (rebased reference), and a full fine-tune given as model directories (through
``from_pretrained``): every weight row of a repaired module is the reference's update or the
fine-tune's, unrepaired modules and every other tensor unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import CALIBRATION_ROWS, random_adapter, write_jsonl
from nlsr.cli import app
from nlsr.errors import NlsrError
from nlsr.method.activations import accumulate_input_covariances
from nlsr.method.calibration import CalibrationRow
from nlsr.method.extrapolate import extrapolate
from nlsr.method.identify import identify
from nlsr.method.masks import SafetyMasks, load_masks, neuron_key
from nlsr.method.realign import realign
from nlsr.weights import synthetic
from nlsr.weights.adapters import fingerprint, load_adapter, save_adapter
from nlsr.weights.model_dirs import ModelDir, merge_adapter, model_fingerprint, module_of

runner = CliRunner()


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def random_neuron_masks(reference, q: float = 0.3, seed: int = 0) -> SafetyMasks:
    """Neuron masks with the provenance of ``reference`` (an adapter), for tests that skip identify."""
    gen = torch.Generator().manual_seed(seed)
    masks = {neuron_key(n): torch.rand(f.B.shape[0], generator=gen) < q for n, f in reference}
    meta = {"granularity": "neuron", "reference_fingerprint": json.dumps(fingerprint(reference))}
    return SafetyMasks(masks, meta)


def load_causal_lm(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def merged_weights(model_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """Weights of ``model_dir`` + the adapter, merged by PEFT."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_causal_lm(model_dir), str(adapter_dir)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def check_rows(name, new, base, ref_delta, ft_delta, rows, atol=1e-5):
    """Every row of ``new - base`` is ``ref_delta``'s (masked) or ``ft_delta``'s (others)."""
    delta = new.double() - base.double()
    assert torch.allclose(delta[rows], ref_delta[rows].double(), atol=atol), name
    assert torch.allclose(delta[~rows], ft_delta[~rows].double(), atol=atol), name
    # and not the other one, where they differ: the test could fail
    differs = (ref_delta.double() - ft_delta.double()).abs().amax(dim=1) > 10 * atol
    if (rows & differs).any():
        assert not torch.allclose(delta[rows & differs], ft_delta[rows & differs].double(), atol=atol)


# ---- identification -------------------------------------------------------------------------

def test_input_covariances_equal_stored_inputs_and_share_q_v(tiny_model, tiny_tokenizer, shapes):
    from nlsr.method.calibration import make_batches

    rows = [CalibrationRow(**r) for r in CALIBRATION_ROWS]
    modules = dict(tiny_model.named_modules())
    targets = {n: modules[n] for n in shapes}
    covs, owner, tokens = accumulate_input_covariances(tiny_model, targets, rows, tiny_tokenizer,
                                                       batch_size=2, progress=False, dtype=torch.float64,
                                                       template="chat")
    layer0 = "model.layers.0"
    assert owner[f"{layer0}.self_attn.v_proj"] == f"{layer0}.self_attn.q_proj"   # same input tensor
    assert owner[f"{layer0}.mlp.up_proj"] == f"{layer0}.mlp.up_proj"
    assert len(covs) == 2 * 3                                                      # q(=v), up, down per layer
    stored: dict[str, list] = {n: [] for n in covs}
    mask = {}
    handles = [modules[n].register_forward_pre_hook(
        lambda m, a, n=n: stored[n].append(a[0][mask["m"]].double())) for n in covs]
    with torch.no_grad():
        for batch in make_batches(tiny_tokenizer, rows, batch_size=2, max_length=1024, template="chat"):
            mask["m"] = batch.response_mask
            tiny_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for h in handles:
        h.remove()
    for name, acc in covs.items():
        X = torch.cat(stored[name])
        assert X.shape[0] == tokens == acc.count
        torch.testing.assert_close(acc.cov, X.T @ X)


def test_identify_neurons_masks_rows_with_provenance(tiny_model, tiny_tokenizer, shapes):
    reference = random_adapter(shapes)
    rows = [CalibrationRow(**r) for r in CALIBRATION_ROWS]
    masks = identify(tiny_model, reference, rows, tiny_tokenizer, granularity="neuron", rho=0.8, q=0.25,
                             batch_size=2, progress=False)
    assert set(masks.masks) == {neuron_key(n) for n in shapes}
    for name, (d_out, _) in shapes.items():
        m = masks.masks[neuron_key(name)]
        assert m.dtype == torch.bool and m.shape == (d_out,) and int(m.sum()) == -(-d_out // 4)
    assert masks.metadata["granularity"] == "neuron"
    assert json.loads(masks.metadata["reference_fingerprint"]) == fingerprint(reference)
    # the model is left as it was (the reference adapter was removed)
    assert not any("lora" in n for n, _ in tiny_model.named_modules())


# ---- adapters -------------------------------------------------------------------------------

def test_fresh_lora_of_another_rank_rows_are_reference_or_finetune_through_peft(tmp_path, tiny_model_dir, shapes):
    base = str(tiny_model_dir)
    reference = random_adapter(shapes, rank=4, alpha=8, seed=0, base=base)
    finetuned = random_adapter(shapes, rank=8, alpha=4, seed=5, base=base)   # fresh, other rank and scale
    save_adapter(reference, tmp_path / "ref")
    save_adapter(finetuned, tmp_path / "ft")
    write_jsonl(tmp_path / "calib.jsonl", CALIBRATION_ROWS)
    invoke("identify", "--granularity", "neuron", "--base", base, "--reference", tmp_path / "ref",
           "--calibration", tmp_path / "calib.jsonl", "--batch-size", 2, "--keep", 0.3,
           "--out", tmp_path / "m.safetensors")
    out = invoke("realign", "--granularity", "neuron", "--reference", tmp_path / "ref", "--finetuned",
                 tmp_path / "ft", "--masks", tmp_path / "m.safetensors", "--seed", 3, "--out", tmp_path / "out")
    assert "both adapters are on base" in out.output
    report = json.loads((tmp_path / "out" / "realign_report.json").read_text())
    repaired = {d["module"] for d in report["modules"] if d["repaired"]}
    assert 0 < len(repaired) < len(shapes), "choose a seed that repairs some modules and not others"
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["r"] in (8, 12) and len(config["rank_pattern"]) in (len(repaired), len(shapes) - len(repaired))
    masks = load_masks(tmp_path / "m.safetensors")
    merged = merged_weights(tiny_model_dir, tmp_path / "out")
    original = load_causal_lm(tiny_model_dir).state_dict()
    for name in shapes:
        key = f"{name}.weight"
        rows = masks.masks[neuron_key(name)]
        if name not in repaired:
            rows = torch.zeros_like(rows)
        check_rows(name, merged[key], original[key], reference.modules[name].delta(),
                   finetuned.modules[name].delta(), rows)
    for key, value in original.items():   # everything else untouched
        if module_of(key) not in shapes:
            assert torch.equal(merged[key], value), key


def test_lora_on_merged_aligned_model_takes_beta_times_aligned_update(tmp_path, tiny_model_dir, shapes):
    base = str(tiny_model_dir)
    save_adapter(random_adapter(shapes, rank=4, seed=1, base=base), tmp_path / "aligned")
    aligned = load_adapter(tmp_path / "aligned")
    reference = extrapolate(aligned, 0.9)
    merge_adapter(ModelDir(tiny_model_dir), aligned, tmp_path / "W_a")     # records what was merged
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "W_a" / "tokenizer.json")
    finetuned = random_adapter(shapes, rank=2, alpha=4, seed=6, base=str(tmp_path / "W_a"))
    masks = random_neuron_masks(reference, seed=2)
    result = realign(reference, finetuned, masks, select="all")
    assert result.settings["rebased"] and "recorded in" in result.notes[0]
    save_adapter(result.adapter, tmp_path / "out")
    merged = merged_weights(tmp_path / "W_a", tmp_path / "out")
    w_a = load_causal_lm(tmp_path / "W_a").state_dict()
    w_0 = load_causal_lm(tiny_model_dir).state_dict()
    for name in shapes:
        key = f"{name}.weight"
        torch.testing.assert_close(w_a[key].double() - w_0[key].double(), aligned.modules[name].delta(),
                                   atol=1e-5, rtol=0)
        check_rows(name, merged[key], w_a[key], 0.9 * aligned.modules[name].delta(),
                   finetuned.modules[name].delta(), masks.masks[neuron_key(name)])
    # the same with the merged adapter named explicitly, and refused without it when no record exists
    renamed = finetuned.with_modules(finetuned.modules)
    renamed.config["base_model_name_or_path"] = "org/aligned-merged"
    with pytest.raises(NlsrError, match="--rebase ADAPTER"):
        realign(reference, renamed, masks, select="all")
    explicit = realign(reference, renamed, masks, select="all", rebase=aligned)
    for name in shapes:
        torch.testing.assert_close(explicit.adapter.modules[name].B, result.adapter.modules[name].B)


# ---- model directories ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_finetune(tmp_path_factory, tiny_model_dir):
    """W_0 (tiny), W_a = W_0 + aligned LoRA (one file), a full fine-tune of W_a in 40 KB shards,
    and a calibration file."""
    from conftest import TARGETS
    from nlsr.weights.synthetic import module_shapes

    d = tmp_path_factory.mktemp("fullft")
    model = load_causal_lm(tiny_model_dir)
    # sizes like real updates: the aligned LoRA and the fine-tune change the weights (std 0.02) by
    # a few percent, so that the base check (median relative change <= 0.5) accepts them
    aligned = synthetic.random_adapter(module_shapes(model, TARGETS), rank=4, alpha=8, seed=1,
                                       base=str(tiny_model_dir), a_std=0.02, b_std=0.02)
    merge_adapter(ModelDir(tiny_model_dir), aligned, d / "W_a")
    ft = load_causal_lm(d / "W_a")
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, module in ft.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight += 0.002 * torch.randn(module.weight.shape, generator=gen)
    ft.save_pretrained(d / "ft", max_shard_size="40KB")
    for file in tiny_model_dir.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(file, d / "ft" / file.name)
    write_jsonl(d / "calib.jsonl", CALIBRATION_ROWS)
    assert (d / "ft" / "model.safetensors.index.json").is_file()
    return d


def test_extrapolate_model_dirs(full_finetune, tiny_model_dir, tmp_path):
    d = full_finetune
    invoke("extrapolate", "--aligned", d / "W_a", "--weak", tiny_model_dir, "--beta", 0.9, "--out", tmp_path / "ref")
    w_e = ModelDir(tmp_path / "ref")
    w_a, w_0 = ModelDir(d / "W_a"), ModelDir(tiny_model_dir)
    changed = 0
    for name in w_a.infos:
        a, z, e = w_a.tensor(name), w_0.tensor(name), w_e.tensor(name)
        if torch.equal(a, z):
            assert torch.equal(e, a), name            # untouched tensors: bit for bit
        else:
            changed += 1
            torch.testing.assert_close(e, a + 0.9 * (a - z))
    assert changed == 8
    assert json.loads((tmp_path / "ref" / "nlsr_reference.json").read_text())["beta"] == 0.9


def test_full_finetune_model_dirs_rows_are_reference_or_finetune_through_from_pretrained(
        full_finetune, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    d = full_finetune
    invoke("extrapolate", "--aligned", d / "W_a", "--weak", tiny_model_dir, "--out", tmp_path / "ref")
    invoke("identify", "--granularity", "neuron", "--reference", tmp_path / "ref", "--base", d / "W_a",
           "--calibration", d / "calib.jsonl", "--batch-size", 2, "--keep", 0.3, "--out", tmp_path / "m.safetensors")
    masks = load_masks(tmp_path / "m.safetensors")
    assert masks.metadata["granularity"] == "neuron" and masks.metadata["reference_kind"] == "model"
    assert len(masks.masks) == 8                         # the modules the aligned LoRA changed
    out = invoke("realign", "--granularity", "neuron", "--reference", tmp_path / "ref", "--finetuned", d / "ft",
                 "--base", d / "W_a", "--masks", tmp_path / "m.safetensors", "--seed", 3, "--out", tmp_path / "out")
    assert "updates measured from --base" in out.output
    report = json.loads((tmp_path / "out" / "realign_report.json").read_text())
    repaired = {d_["module"] for d_ in report["modules"] if d_["repaired"]}
    assert 0 < len(repaired) < 8, "choose a seed that repairs some modules and not others"
    new = load_causal_lm(tmp_path / "out").state_dict()
    ft = load_causal_lm(d / "ft").state_dict()
    ref = load_causal_lm(tmp_path / "ref").state_dict()
    w_a = load_causal_lm(d / "W_a").state_dict()
    for key, value in new.items():
        module = module_of(key)
        if module in repaired:
            rows = masks.masks[key]
            assert torch.equal(value[rows], ref[key][rows]) and torch.equal(value[~rows], ft[key][~rows]), key
            check_rows(key, value, w_a[key], ref[key] - w_a[key], ft[key] - w_a[key], rows)
        else:
            assert torch.equal(value, ft[key]), key
    # the files: shards, index and tokenizer copied; untouched shards byte for byte
    names = sorted(p.name for p in (d / "ft").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [*names, "realign_report.json", "similarity_by_layer.png"])
    index = json.loads((d / "ft" / "model.safetensors.index.json").read_text())["weight_map"]
    touched = {index[f"{m}.weight"] for m in repaired}
    for shard in set(index.values()) - touched:
        assert (tmp_path / "out" / shard).read_bytes() == (d / "ft" / shard).read_bytes()
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("hi").input_ids
    # masks are tied to the reference model they were made on
    assert json.loads(masks.metadata["reference_fingerprint"]) == model_fingerprint(
        ModelDir(tmp_path / "ref"), [module_of(k) for k in masks.masks])


def test_safelora_full_parameter_form(full_finetune, tiny_model_dir, tmp_path):
    from nlsr.method.safelora import projected_dense

    d = full_finetune
    invoke("safelora", "--aligned", d / "W_a", "--unaligned", tiny_model_dir, "--finetuned", d / "ft",
           "--num-modules", 2, "--out", tmp_path / "sl")
    report = json.loads((tmp_path / "sl" / "safelora_report.json").read_text())
    projected = {m["module"] for m in report["modules"] if m["projected"]}
    assert len(report["modules"]) == 8 and len(projected) == 2
    assert report["settings"]["modules_without_update"] == 6      # k, o, gate: no alignment direction
    new, ft = load_causal_lm(tmp_path / "sl").state_dict(), load_causal_lm(d / "ft").state_dict()
    w_a, w_0 = load_causal_lm(d / "W_a").state_dict(), load_causal_lm(tiny_model_dir).state_dict()
    for key, value in new.items():
        if module_of(key) in projected:
            V, delta = w_a[key].double() - w_0[key].double(), ft[key].double() - w_a[key].double()
            C = V @ V.T / V.norm()
            torch.testing.assert_close(value.double(), w_a[key].double() + C @ delta, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(projected_dense(V, delta), C @ delta)
            assert not torch.allclose(value, ft[key])
        else:
            assert torch.equal(value, ft[key]), key


def test_model_dir_reads_rows_in_blocks(full_finetune):
    model = ModelDir(full_finetune / "ft")
    name = "model.layers.0.mlp.up_proj.weight"
    blocks = list(model.row_blocks(name, block=100))
    assert len(blocks) > 1 and torch.equal(torch.cat([b for _, b in blocks]), model.tensor(name))
    assert [s for s, _ in blocks] == sorted(s for s, _ in blocks)
    assert Path(model.path / model.infos[name].file).is_file()
