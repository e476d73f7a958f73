"""align.dpo.seeds: several DPO runs on the same W_0, kept as the exact average of their adapters."""

from types import SimpleNamespace

import pytest
import torch

from nlsr.experiment.config import ExperimentConfig
from tests.conftest import write_jsonl


def _random_lora(tiny_model_dir, out, seed: int, r: int = 2):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=r, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def _merged(tiny_model_dir, adapter):
    from transformers import AutoModelForCausalLM

    from nlsr.training.trainers import merge_adapter

    return merge_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).state_dict()


def test_average_adapters_is_the_exact_mean_of_the_deltas(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from nlsr.training.trainers import average_adapters

    adapters = [_random_lora(tiny_model_dir, tmp_path / f"a{i}", seed=i) for i in range(3)]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    average_adapters(base, adapters, tmp_path / "mean")
    assert base.state_dict().keys() == before.keys()          # the LoRA layers are gone again
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())

    merged = [_merged(tiny_model_dir, a) for a in adapters]
    mean = _merged(tiny_model_dir, tmp_path / "mean")
    changed = 0
    for key, weight in before.items():
        expected = weight + sum(m[key] - weight for m in merged) / len(merged)
        torch.testing.assert_close(mean[key], expected, atol=1e-6, rtol=1e-5)
        changed += not torch.equal(mean[key], weight)
    assert changed == 4                   # q_proj and v_proj of both layers
    import json

    assert json.loads((tmp_path / "mean" / "adapter_config.json").read_text())["r"] == 6


def test_average_adapters_refuses_a_single_adapter(tmp_path, tiny_model_dir):
    from nlsr.errors import NlsrError
    from nlsr.training.trainers import average_adapters

    with pytest.raises(NlsrError, match="at least two"):
        average_adapters(None, [tmp_path], tmp_path / "out")


def _dpo_inputs(tmp_path):
    (tmp_path / "data-align").mkdir()
    write_jsonl(tmp_path / "data-align" / "sft.jsonl",
                [{"prompt": f"bad {i}", "response": f"No {i}."} for i in range(3)])
    write_jsonl(tmp_path / "data-align" / "dpo.jsonl", [{"prompt": "pku", "chosen": "safer", "rejected": "worse"}])
    return {n: tmp_path / n for n in ("data-align", "align_sft")}


def test_dpo_seeds_train_one_run_per_seed_then_average_and_resume(tmp_path, monkeypatch, tiny_tokenizer):
    from nlsr.experiment.stages import align

    trained, averaged = [], []

    def fake_train(model, tokenizer, rows, section, out_dir, seed, **kwargs):
        trained.append((seed, out_dir))
        return {"seconds": 1.0, "tokens": 10, "steps": 1, "first_loss": 0.7, "last_loss": 0.5}

    monkeypatch.setattr(align, "train_dpo", fake_train)
    monkeypatch.setattr(align, "load_weak", lambda ctx, path: None)
    monkeypatch.setattr(align, "average_adapters", lambda model, dirs, out: averaged.append((list(dirs), out)))
    cfg = ExperimentConfig.model_validate({"seed": 3, "align": {"helpful": {"n": 0}, "dpo": {"seeds": [4, 9]}}})
    ctx = SimpleNamespace(config=cfg, tokenizer=lambda: tiny_tokenizer, precision=SimpleNamespace(bf16=False))
    out = tmp_path / "out"
    result = align.run_dpo(ctx, out, _dpo_inputs(tmp_path))
    assert trained == [(4, out / "seeds" / "s4" / "adapter"), (9, out / "seeds" / "s9" / "adapter")]
    assert averaged == [([out / "seeds" / "s4" / "adapter", out / "seeds" / "s9" / "adapter"], out / "adapter")]
    assert [r["seed"] for r in result["seeds"]] == [4, 9] and result["seconds"] == 2.0
    assert "average of 2 DPO runs" in result["line"]

    (out / "seeds" / "s9" / "stats.json").unlink()        # as if killed during the second run
    trained.clear()
    align.run_dpo(ctx, out, {n: tmp_path / n for n in ("data-align", "align_sft")})
    assert [seed for seed, _ in trained] == [9]


def test_dpo_seeds_are_checked_and_enter_the_keys_only_when_set():
    from nlsr.experiment.plan import build_stages

    with pytest.raises(ValueError, match="both set"):
        ExperimentConfig.model_validate({"align": {"dpo": {"seed": 1, "seeds": [1, 2]}}})
    for bad in ([1], [2, 2]):
        with pytest.raises(ValueError, match="at least two different seeds"):
            ExperimentConfig.model_validate({"align": {"dpo": {"seeds": bad}}})
    plain = {s.name: s for s in build_stages(ExperimentConfig())}
    soup = {s.name: s for s in build_stages(ExperimentConfig.model_validate({"align": {"dpo": {"seeds": [0, 1]}}}))}
    assert "seeds" not in plain["align_dpo"].params["dpo"]
    assert soup["align_dpo"].params["dpo"]["seeds"] == [0, 1]
    assert soup["align_sft"].params == plain["align_sft"].params
