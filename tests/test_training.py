"""Training builders on the tiny model: the eos is a target, a fixed seed reproduces the weights."""

import torch

from nlsr.training.settings import LoraSection, TrainSection
from nlsr.training.trainers import lora_config, train_sft

ROWS = [{"prompt": f"Q{i}: say hi\n", "completion": "hi there"} for i in range(8)]


def _train(tiny_model_dir, tiny_tokenizer, out):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    section = TrainSection(epochs=1, lr=1e-3, batch_size=4, max_length=64)
    stats = train_sft(model, tiny_tokenizer, ROWS, section, out, seed=3,
                      lora=lora_config(LoraSection(r=2, alpha=4, targets=["q_proj", "v_proj"])))
    from safetensors.torch import load_file

    return stats, load_file(out / "adapter_model.safetensors")


def test_sft_is_reproducible_and_keeps_eos_target(tmp_path, tiny_model_dir, tiny_tokenizer):
    stats, first = _train(tiny_model_dir, tiny_tokenizer, tmp_path / "a")
    _, second = _train(tiny_model_dir, tiny_tokenizer, tmp_path / "b")
    assert stats["steps"] == 2 and stats["first_loss"] is not None
    assert stats["tenth_steps"] == 1 and stats["first_tenth_loss"] == stats["first_loss"]
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert any(k.endswith("lora_B.weight") and first[k].abs().sum() > 0 for k in first)
    assert not list((tmp_path / "a").glob("checkpoint-*"))


def test_sft_collator_keeps_the_eos_as_a_target(tiny_model_dir, tiny_tokenizer, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, report_to=[], use_cpu=True,
                     per_device_train_batch_size=2, max_length=64)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                         train_dataset=Dataset.from_list(ROWS[:2]), processing_class=tiny_tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    targets = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert targets[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(targets[:-1]) == "hi there"


UNEVEN = [{"prompt": f"Q{i}: " + "word " * (3 * i) + "\n", "completion": "answer " * (1 + i % 3)} for i in range(8)]


def test_padding_free_batches_train_like_padded_ones(tmp_path, tiny_model_dir, tiny_tokenizer):
    """The padding-free path (rows concatenated, each attending to itself only) reaches the same
    weights as padded batches of the same rows: no cross-row attention, same loss normalisation."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    section = TrainSection(epochs=1, lr=1e-2, batch_size=4, max_length=24)
    lora = lora_config(LoraSection(r=2, alpha=4, targets=["q_proj", "v_proj"]))
    weights, tokens = {}, {}
    for name, cls in (("free", None), ("padded", SFTTrainer)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        stats = train_sft(model, tiny_tokenizer, UNEVEN, section, tmp_path / name, seed=3, lora=lora,
                          trainer_cls=cls)
        weights[name], tokens[name] = load_file(tmp_path / name / "adapter_model.safetensors"), stats["tokens"]
    assert tokens["free"] == tokens["padded"] > 0
    for key, value in weights["padded"].items():
        torch.testing.assert_close(weights["free"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert any(v.abs().sum() > 0 for k, v in weights["free"].items() if "lora_B" in k)


def test_tokenize_completions_masks_the_prompt_and_truncates(tiny_tokenizer):
    from nlsr.training.trainers import tokenize_completions

    rows = tokenize_completions(tiny_tokenizer, [{"prompt": "say hi\n", "completion": "hi there"}], 64)
    ids, mask = rows[0]["input_ids"], rows[0]["completion_mask"]
    assert ids[-1] == tiny_tokenizer.eos_token_id and mask[-1] == 1
    assert tiny_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m][:-1]) == "hi there"
    assert tiny_tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m]) == "say hi\n"
    prompt_len = mask.index(1)
    assert tokenize_completions(tiny_tokenizer, [{"prompt": "say hi\n", "completion": "x"}], prompt_len) == []
    cut = tokenize_completions(tiny_tokenizer, [{"prompt": "say hi\n", "completion": "hi there"}], prompt_len + 1)
    assert len(cut[0]["input_ids"]) == prompt_len + 1 and sum(cut[0]["completion_mask"]) == 1


def test_the_training_line_shows_the_mean_of_the_first_and_last_tenth_of_the_steps():
    from nlsr.training.trainers import end_losses, training_line

    losses = [2.0] * 5 + [1.0] * 40 + [0.5] * 4 + [1.8]           # a noisy last step
    ends = end_losses(losses)
    assert ends == {"first_tenth_loss": 2.0, "last_tenth_loss": (0.5 * 4 + 1.8) / 5, "tenth_steps": 5}
    line = training_line(50, "rows", {"first_loss": 2.0, "last_loss": 1.8, **ends})
    assert line == "50 rows, loss 2.000 -> 0.760 (mean of the first and last 5 logged steps)"
    assert training_line(3, "pairs", {"first_loss": 0.7, "last_loss": 0.5}) == "3 pairs, loss 0.700 -> 0.500"
    assert end_losses([]) == {}


def test_dpo_loss_is_log_2_at_the_first_step(tmp_path, tiny_model_dir, tiny_tokenizer):
    """At the first step policy = reference, so the margin is 0 and DPO's sigmoid loss is log 2."""
    import math

    from transformers import AutoModelForCausalLM

    from nlsr.training.settings import DpoSection
    from nlsr.training.trainers import train_dpo

    rows = [{"prompt": f"Q{i}: say hi\n", "chosen": "hi there", "rejected": "go away"} for i in range(4)]
    section = DpoSection(epochs=1, lr=1e-3, batch_size=4, max_length=64, beta=0.5)
    lora = lora_config(LoraSection(r=2, alpha=4, targets=["q_proj", "v_proj"]))
    stats = train_dpo(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_tokenizer, rows, section,
                      tmp_path / "dpo", seed=3, lora=lora)
    assert abs(stats["first_loss"] - math.log(2)) < 1e-3


def test_dpo_stage_trains_on_the_dataset_helpful_and_refusal_pairs(tmp_path, monkeypatch, tiny_tokenizer):
    """The DPO stage trains, with the experiment's seed, on the dataset pairs, align.helpful.dpo_pairs
    helpful pairs (a base answer over an SFT refusal) and the refusal pairs."""
    from types import SimpleNamespace

    import pytest

    from nlsr.experiment.config import ExperimentConfig
    from nlsr.experiment.stages import align
    from tests.conftest import write_jsonl

    files = {"data-align": {"sft.jsonl": [{"prompt": f"bad {i}", "response": f"No {i}."} for i in range(9)],
                            "dpo.jsonl": [{"prompt": "pku", "chosen": "safer", "rejected": "worse"}]},
             "data-helpful": {"helpful.jsonl": [{"prompt": f"good {i}", "response": f"Yes {i}."} for i in range(9)]},
             "data-refusal-pairs": {"refusal_pairs.jsonl": [{"prompt": "steal", "chosen": "No.", "rejected": "Do X."}]}}
    for stage, named in files.items():
        (tmp_path / stage).mkdir()
        for name, rows in named.items():
            write_jsonl(tmp_path / stage / name, rows)
    seen: list[tuple[int, list]] = []

    class Stop(Exception):
        pass

    def fake_train(model, tokenizer, rows, section, out_dir, seed, **kwargs):
        seen.append((seed, rows))
        raise Stop

    monkeypatch.setattr(align, "train_dpo", fake_train)
    monkeypatch.setattr(align, "load_weak", lambda ctx, path: None)
    inputs = {n: tmp_path / n for n in ("data-align", "data-helpful", "data-refusal-pairs", "align_sft")}
    cfg = ExperimentConfig.model_validate({"seed": 3, "align": {"helpful": {"n": 9, "dpo_pairs": 4},
                                                                 "dpo": {"refusal_pairs": 1}}})
    ctx = SimpleNamespace(config=cfg, tokenizer=lambda: tiny_tokenizer, precision=SimpleNamespace(bf16=False))
    with pytest.raises(Stop):
        align.run_dpo(ctx, tmp_path / "out", inputs)
    [(seed, rows)] = seen
    assert seed == 3 and len(rows) == 6
    assert rows[0]["chosen"] == "safer" and rows[-1]["chosen"] == "No."
    helpful = rows[1:5]
    assert all(r["chosen"].startswith("Yes") and r["rejected"].startswith("No ") for r in helpful)
