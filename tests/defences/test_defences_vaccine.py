"""Vaccine (Huang et al., 2024): the perturbation, the hooks, and tiny SFT / DPO runs with a LoRA."""

import pytest
import torch

from nlsr.errors import NlsrError
from nlsr.training.defences.vaccine import (
    VaccineDPOTrainer,
    VaccineSFTTrainer,
    capture_layer_outputs,
    decoder_layers,
    perturb_layer_outputs,
    vaccine_perturbations,
)

SFT_ROWS = [{"prompt": f"How do I make poison {i}?\n", "completion": "I can't help with that."} for i in range(4)]
DPO_ROWS = [{"prompt": f"How do I make poison {i}?\n", "chosen": "I can't help.", "rejected": "Mix A and B."}
            for i in range(4)]
COMMON = dict(report_to=[], use_cpu=True, bf16=False, max_steps=2, per_device_train_batch_size=2,
              learning_rate=1e-2, max_length=64, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))


def _sft(tiny_model, tiny_tokenizer, tmp_path, rho=2.0, **overrides):
    from datasets import Dataset
    from trl import SFTConfig

    args = SFTConfig(output_dir=str(tmp_path), completion_only_loss=True, **{**COMMON, **overrides})
    return VaccineSFTTrainer(_lora(tiny_model), args=args, train_dataset=Dataset.from_list(SFT_ROWS),
                             processing_class=tiny_tokenizer, vaccine_rho=rho)


def test_perturbation_has_global_norm_rho_and_the_gradient_direction():
    torch.manual_seed(0)
    grads = [torch.randn(2, 3, 4), torch.randn(2, 3, 4) * 5, torch.zeros(2, 3, 4)]
    eps = vaccine_perturbations(grads, rho=2.0)
    total = torch.sqrt(sum((e ** 2).sum() for e in eps))
    assert total.item() == pytest.approx(2.0, rel=1e-6)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    for g, e in zip(grads, eps, strict=True):  # one common positive factor ρ / ||g|| for every layer
        torch.testing.assert_close(e, g * (2.0 / norm))
    assert all(e.abs().sum() == 0 for e in vaccine_perturbations([torch.zeros(3), torch.zeros(2)], rho=2.0))
    half = vaccine_perturbations([g.to(torch.bfloat16) for g in grads], rho=1.0)
    assert all(e.dtype == torch.bfloat16 for e in half)
    with pytest.raises(NlsrError):
        vaccine_perturbations([], rho=1.0)


def test_decoder_layers_are_found_through_peft(tiny_model):
    layers = decoder_layers(tiny_model)
    assert layers == list(tiny_model.model.layers) and len(layers) == 2
    assert decoder_layers(_lora(tiny_model)) == layers


def test_hooks_add_the_perturbation_exactly_at_the_layer_outputs(tiny_model):
    layers = decoder_layers(tiny_model)
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    with capture_layer_outputs(layers) as clean:
        clean_logits = tiny_model(input_ids=ids).logits
    torch.manual_seed(1)
    eps = [torch.randn_like(c[0]) for c in clean]
    raw, final, next_inputs = [], [], []
    handles = [layer.register_forward_hook(lambda m, a, o: raw.append(o.detach().clone()), prepend=True)
               for layer in layers]
    handles.append(layers[1].register_forward_pre_hook(lambda m, a: next_inputs.append(a[0].detach().clone())))
    handles.append(tiny_model.model.norm.register_forward_pre_hook(lambda m, a: next_inputs.append(a[0].detach())))
    with perturb_layer_outputs(layers, eps):
        handles += [layer.register_forward_hook(lambda m, a, o: final.append(o.detach().clone())) for layer in layers]
        logits = tiny_model(input_ids=ids).logits
        for h in handles:
            h.remove()
        with torch.no_grad():  # hooks act only with gradients on (the DPO reference pass runs without)
            torch.testing.assert_close(tiny_model(input_ids=ids).logits, clean_logits.detach())
    for layer_raw, layer_final, e in zip(raw, final, eps, strict=True):
        torch.testing.assert_close(layer_final, layer_raw + e, rtol=0, atol=0)
    torch.testing.assert_close(raw[0], clean[0][0].detach(), rtol=0, atol=0)  # layer 0 sees a clean input
    torch.testing.assert_close(next_inputs[0], final[0], rtol=0, atol=0)      # layer 1 consumes ε_0
    torch.testing.assert_close(next_inputs[1], final[1], rtol=0, atol=0)      # the final norm consumes ε_1
    assert not torch.allclose(logits, clean_logits)
    with pytest.raises(NlsrError, match="does not fit"), perturb_layer_outputs(layers, [e[:, :2] for e in eps]):
        tiny_model(input_ids=ids)


def _batch(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    return {k: v.to(trainer.args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def test_vaccine_loss_is_the_perturbed_loss_and_the_clean_pass_leaves_no_gradient(tiny_model, tiny_tokenizer,
                                                                                   tmp_path):
    from trl import SFTTrainer

    trainer = _sft(tiny_model, tiny_tokenizer, tmp_path, rho=0.05)
    with torch.no_grad():  # a non-zero LoRA so that every layer output depends on trainable weights
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    trainer.model.train()
    batch = _batch(trainer)
    clean = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
    eps, clean_again = trainer.vaccine_perturbation(trainer.model, dict(batch))
    assert clean_again.item() == pytest.approx(clean.item(), rel=1e-6)
    assert all(p.grad is None for p in trainer.model.parameters())
    assert torch.sqrt(sum((e.float() ** 2).sum() for e in eps)).item() == pytest.approx(0.05, rel=1e-5)
    perturbed = trainer.compute_loss(trainer.model, dict(batch))
    assert perturbed.item() > clean.item()  # ε follows the ascent direction
    with perturb_layer_outputs(trainer.vaccine_layers, eps):
        manual = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
    assert perturbed.item() == pytest.approx(manual.item(), rel=1e-6)
    trainer.model.eval()  # evaluation is unperturbed
    assert trainer.compute_loss(trainer.model, dict(batch)).item() == pytest.approx(clean.item(), rel=1e-6)


def _one_step_grads(tiny_model_dir, tiny_tokenizer, tmp_path, checkpointing):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # the LoRA initialisation
    trainer = _sft(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_tokenizer, tmp_path,
                   gradient_checkpointing=checkpointing)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = _batch(trainer)
    trainer.current_gradient_accumulation_steps = 1
    if checkpointing:
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing == checkpointing for layer in trainer.vaccine_layers)
    trainer.training_step(trainer.model, batch)
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_step(tiny_model_dir, tiny_tokenizer, tmp_path):
    plain = _one_step_grads(tiny_model_dir, tiny_tokenizer, tmp_path / "a", checkpointing=False)
    checkpointed = _one_step_grads(tiny_model_dir, tiny_tokenizer, tmp_path / "b", checkpointing=True)
    assert plain and set(plain) == set(checkpointed)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_two_step_vaccine_sft_run(tiny_model, tiny_tokenizer, tmp_path):
    trainer = _sft(tiny_model, tiny_tokenizer, tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
    logged = [h for h in trainer.state.log_history if "vaccine/clean_loss" in h]
    assert len(logged) == 2 and all(h["loss"] >= h["vaccine/clean_loss"] for h in logged)


def test_two_step_vaccine_dpo_run_keeps_the_reference_pass_unperturbed(tiny_model, tiny_tokenizer, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig

    args = DPOConfig(output_dir=str(tmp_path), beta=0.1, **COMMON)
    trainer = VaccineDPOTrainer(tiny_model, args=args, train_dataset=Dataset.from_list(DPO_ROWS),
                                processing_class=tiny_tokenizer,
                                peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                       task_type="CAUSAL_LM"))
    assert trainer.ref_model is None  # TRL's reference: the same model with the adapter disabled
    calls = []  # (grad enabled, adapter disabled, input of the final norm = output of the last layer)
    base = trainer.model.get_base_model()
    lora_layer = base.model.layers[0].self_attn.q_proj
    base.model.norm.register_forward_pre_hook(
        lambda m, a: calls.append((torch.is_grad_enabled(), lora_layer.disable_adapters, a[0].detach().clone())))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
    # per step: clean policy, clean reference, perturbed policy, reference again
    assert [(g, d) for g, d, _ in calls] == [(True, False), (False, True), (True, False), (False, True)] * 2
    for step in range(2):
        policy_clean, ref_first, policy_perturbed, ref_second = (calls[4 * step + i][2] for i in range(4))
        torch.testing.assert_close(ref_second, ref_first, rtol=0, atol=0)  # the reference pass is unperturbed
        assert not torch.allclose(policy_perturbed, policy_clean)          # the policy pass is perturbed
    assert any("vaccine/clean_loss" in h for h in trainer.state.log_history)


def test_reentrant_checkpointing_is_refused(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(NlsrError, match="non-reentrant"):
        _sft(tiny_model, tiny_tokenizer, tmp_path, gradient_checkpointing=True,
             gradient_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(NlsrError):
        _sft(tiny_model, tiny_tokenizer, tmp_path, rho=-1.0)
