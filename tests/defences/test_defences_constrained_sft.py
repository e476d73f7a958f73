"""ConstrainedSFT (Qi et al., 2024): β positions, token weights, equality with SFT at θ = ref, a tiny run."""

import copy
import math

import pytest
import torch

from conftest import tiny_sft_args as _args
from nlsr.errors import NlsrError
from nlsr.training.defences.constrained_sft import (
    DEFAULT_BETA_SCHEDULE,
    ConstrainedSFTTrainer,
    constrained_sft_loss,
    constrained_token_weights,
    response_positions,
    token_position_betas,
)

ROWS = [{"prompt": f"Q{i}: how do I do thing {i}?\n", "completion": "I can't help with that."} for i in range(4)]


def _lora_model(tiny_model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM", lora_dropout=0.0))


def _trainer(tiny_model, tiny_tokenizer, tmp_path, ref_model=None, **kwargs):
    from datasets import Dataset

    return ConstrainedSFTTrainer(_lora_model(tiny_model), args=_args(tmp_path), ref_model=ref_model,
                                 train_dataset=Dataset.from_list(ROWS), processing_class=tiny_tokenizer, **kwargs)


def test_token_position_betas_index_the_position_within_each_response():
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8, 9, 10, 11, -100],
                           [-100, 4, 4, -100, -100, 3, 3, 3, -100, -100]])
    betas = token_position_betas(labels, DEFAULT_BETA_SCHEDULE)
    assert betas[0].tolist() == pytest.approx([0, 0, 0.5, 2, 2, 2, 2, 0.1, 0.1, 0])
    assert betas[1].tolist() == pytest.approx([0, 0.5, 2, 0, 0, 0.5, 2, 2, 0, 0])  # a second run restarts at 1
    assert response_positions(labels != -100)[0].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 0]
    assert token_position_betas(labels[:1], (1.0, 3.0))[0].tolist() == [0, 0, 1, 3, 3, 3, 3, 3, 3, 0]
    with pytest.raises(NlsrError):
        token_position_betas(labels, ())


def test_token_weights_match_the_formula_and_are_detached():
    logp_theta = torch.tensor([-1.0, -0.5, -3.0, -0.2], requires_grad=True)
    logp_ref = torch.tensor([-2.0, -0.5, -1.0, -0.7])
    betas = torch.tensor([0.5, 2.0, 2.0, 0.1])
    weights = constrained_token_weights(logp_theta, logp_ref, betas)
    sigma = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [2 * (1 - sigma(0.5 * 1.0)), 1.0, 2 * (1 - sigma(2.0 * -2.0)), 2 * (1 - sigma(0.1 * 0.5))]
    assert weights.tolist() == pytest.approx(expected, abs=1e-6)
    assert not weights.requires_grad
    # loss = -mean_t w_t log π_θ over response tokens; the gradient is -w_t / N
    labels = torch.tensor([7, 7, 7, 7])
    loss = constrained_sft_loss(logp_theta, logp_ref, labels, schedule=(0.5, 2.0, 2.0, 0.1))
    values = [-1.0, -0.5, -3.0, -0.2]
    assert loss.item() == pytest.approx(-sum(w * x for w, x in zip(expected, values, strict=True)) / 4, abs=1e-6)
    loss.backward()
    assert logp_theta.grad.tolist() == pytest.approx([-w / 4 for w in expected], abs=1e-6)


def _batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to(trainer.args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * (labels != -100), labels


def test_loss_equals_sft_cross_entropy_when_theta_is_ref(tiny_model, tiny_tokenizer, tmp_path):
    from trl import SFTTrainer

    trainer = _trainer(tiny_model, tiny_tokenizer, tmp_path)  # ref: a frozen copy of the model as passed
    batch = _batch(trainer)
    constrained = trainer.compute_loss(trainer.model, dict(batch))
    sft = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
    assert constrained.item() == pytest.approx(sft.item(), abs=1e-6)
    logp, labels = _logps(trainer.model, batch)
    assert constrained.item() == pytest.approx(-(logp.sum() / (labels != -100).sum()).item(), abs=1e-5)
    assert trainer._metrics["train"]["constrained/mean_weight"][-1] == pytest.approx(1.0, abs=1e-6)


def test_loss_matches_the_formula_against_a_different_ref(tiny_model, tiny_tokenizer, tmp_path):
    ref = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    trainer = _trainer(tiny_model, tiny_tokenizer, tmp_path, ref_model=ref)
    batch = _batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    logp, labels = _logps(trainer.model, batch)
    logp_ref, _ = _logps(ref, batch)
    expected = constrained_sft_loss(logp, logp_ref, labels)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert trainer._metrics["train"]["constrained/mean_weight"][-1] != pytest.approx(1.0, abs=1e-3)


def test_two_step_run_trains_the_policy_and_leaves_the_ref_alone(tiny_model, tiny_tokenizer, tmp_path):
    ref = copy.deepcopy(tiny_model)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    trainer = _trainer(tiny_model, tiny_tokenizer, tmp_path, ref_model=ref, beta_schedule=(0.5, 2.0, 0.1))
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    changed = [n for n, p in trainer.model.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert changed
    assert any("constrained/mean_weight" in h for h in trainer.state.log_history)


def test_bad_arguments_are_rejected(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(NlsrError, match="positive"):
        _trainer(tiny_model, tiny_tokenizer, tmp_path, beta_schedule=(0.5, -1.0))
    with pytest.raises(NlsrError, match="separate"):
        ConstrainedSFTTrainer(tiny_model, args=_args(tmp_path), ref_model=tiny_model)
