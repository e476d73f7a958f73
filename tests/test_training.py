"""Training builders on the tiny model: the eos is a target, a fixed seed reproduces the weights."""

import torch

from nlsr.config import LoraSection, TrainSection
from nlsr.training import lora_config, train_sft

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
