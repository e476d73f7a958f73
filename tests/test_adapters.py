import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import random_adapter
from nlsr.errors import NlsrError
from nlsr.weights.adapters import (
    WEIGHTS_NAME,
    LoraAdapter,
    LoraFactors,
    check_comparable,
    load_adapter,
    save_adapter,
    weight_key,
)


def test_save_load_round_trip(tmp_path, shapes):
    adapter = random_adapter(shapes)
    save_adapter(adapter, tmp_path / "a")
    loaded = load_adapter(tmp_path / "a")
    assert set(loaded.modules) == set(adapter.modules)
    layers = [int(n.split(".")[2]) for n in loaded.modules]
    assert layers == sorted(layers)                       # natural (layer) order
    for name, f in adapter:
        torch.testing.assert_close(loaded.modules[name].A, f.A)
        torch.testing.assert_close(loaded.modules[name].B, f.B)
        assert loaded.modules[name].scale == f.scale
    assert not list(tmp_path.glob(".*partial*"))


def test_mixed_ranks_round_trip_through_patterns(tmp_path, shapes):
    adapter = random_adapter(shapes, rank=4, alpha=8)
    name = next(iter(adapter.modules))
    f = adapter.modules[name]
    modules = dict(adapter.modules)
    modules[name] = LoraFactors(torch.cat([f.A, f.A]), torch.cat([f.B, f.B], 1), f.scale)
    save_adapter(adapter.with_modules(modules), tmp_path / "mixed")
    config = json.loads((tmp_path / "mixed" / "adapter_config.json").read_text())
    assert list(config["rank_pattern"].values()) == [8]
    assert list(config["alpha_pattern"].values()) == [16]
    loaded = load_adapter(tmp_path / "mixed")
    assert loaded.modules[name].rank == 8 and loaded.modules[name].scale == f.scale


def _write_raw(path, tensors, config):
    path.mkdir()
    save_file(tensors, path / WEIGHTS_NAME)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_nan_in_a_factor_is_refused_naming_the_key(tmp_path, shapes):
    adapter = random_adapter(shapes)
    name = list(adapter.modules)[2]
    adapter.modules[name].B[0, 0] = float("nan")
    save_adapter(adapter, tmp_path / "nan")
    with pytest.raises(NlsrError, match=f"{weight_key(name, 'B')}.*NaN"):
        load_adapter(tmp_path / "nan")


def test_pickle_adapter_refused_unless_opted_in(tmp_path, shapes):
    adapter = random_adapter(shapes)
    path = tmp_path / "pickled"
    path.mkdir()
    torch.save({weight_key(n, x): getattr(f, x) for n, f in adapter for x in "AB"},
               path / "adapter_model.bin")
    (path / "adapter_config.json").write_text(json.dumps(adapter.config))
    with pytest.raises(NlsrError, match="pickle.*--allow-pickle"):
        load_adapter(path)
    assert len(load_adapter(path, allow_pickle=True)) == len(adapter)


def test_missing_partner_factor_and_rank_config_mismatch(tmp_path, shapes):
    adapter = random_adapter(shapes)
    name = next(iter(adapter.modules))
    f = adapter.modules[name]
    config = dict(adapter.config)
    _write_raw(tmp_path / "half", {weight_key(name, "A"): f.A}, config)
    with pytest.raises(NlsrError, match=f"'{name}' has no lora_B"):
        load_adapter(tmp_path / "half")
    config["r"] = 16
    _write_raw(tmp_path / "rank", {weight_key(name, "A"): f.A, weight_key(name, "B"): f.B}, config)
    with pytest.raises(NlsrError, match="rank 4 in its weights but 16"):
        load_adapter(tmp_path / "rank")


def test_not_an_adapter(tmp_path):
    with pytest.raises(NlsrError, match="does not exist"):
        load_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NlsrError, match="no adapter_config.json"):
        load_adapter(tmp_path / "empty")


def test_check_comparable_names_the_first_offending_module(shapes):
    ref = random_adapter(shapes, rank=4)
    other_rank = random_adapter(shapes, rank=2)
    with pytest.raises(NlsrError, match=r"has rank 4 in the reference adapter but 2"):
        check_comparable(ref, other_rank)
    fewer = ref.with_modules(dict(list(ref.modules.items())[1:]))
    first = next(iter(ref.modules))
    with pytest.raises(NlsrError, match=f"'{first}' is in the reference adapter but not in the "
                                        "finetuned"):
        check_comparable(ref, fewer)
    other_targets = LoraAdapter(ref.config, {n + "_x": f for n, f in ref})
    with pytest.raises(NlsrError, match="is in the reference adapter but not"):
        check_comparable(ref, other_targets)
    other_base = random_adapter(shapes, base="another-model")
    with pytest.raises(NlsrError, match="--allow-base-mismatch"):
        check_comparable(ref, other_base)
    check_comparable(ref, other_base, check_base=False)


def test_loaded_adapter_equals_peft_merge(tmp_path, tiny_model_dir, shapes):
    """What this tool writes loads in PEFT, and PEFT's merged weights are base + s·B·A."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = random_adapter(shapes, base=str(tiny_model_dir))
    save_adapter(adapter, tmp_path / "a")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, tmp_path / "a").merge_and_unload()
    weights = dict(merged.named_parameters())
    for name, f in adapter:
        expected = reference[f"{name}.weight"].double() + f.delta()
        torch.testing.assert_close(weights[f"{name}.weight"].double(), expected, atol=1e-5,
                                   rtol=1e-5)
