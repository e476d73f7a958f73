"""Lisa (Huang et al., 2024): schedule, proximal term, snapshots at switches, a tiny two-state run."""

import pytest
import torch

from conftest import tiny_sft_args as _args
from nlsr.errors import NlsrError
from nlsr.training.defences.lisa import LisaTrainer, phase_schedule, proximal_term

TASK = [{"prompt": f"Review {i}: fine film\nSentiment:", "completion": " positive"} for i in range(8)]
SAFETY = [{"prompt": f"How to hurt {i}?\n", "completion": "REFUSE"} for i in range(4)]


def _trainer(tiny_model, tiny_tokenizer, tmp_path, args=None, **kwargs):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    return LisaTrainer(model, args=args or _args(tmp_path), train_dataset=Dataset.from_list(TASK),
                       alignment_dataset=Dataset.from_list(SAFETY), processing_class=tiny_tokenizer, **kwargs)


def test_phase_schedule_cycles():
    assert [phase_schedule(s, 2, 3)[0] for s in range(10)] == list("aafffaafff")
    assert [phase_schedule(s, 2, 3, first="finetune")[0] for s in range(10)] == list("fffaafffaa")
    assert [phase_schedule(s, 1, 1)[0] for s in range(4)] == list("afaf")
    for bad in ((0, 3), (2, 0)):
        with pytest.raises(NlsrError):
            phase_schedule(0, *bad)
    with pytest.raises(NlsrError):
        phase_schedule(0, 1, 1, first="other")


def test_proximal_term_value_and_gradient():
    torch.manual_seed(0)
    w = {"a": torch.randn(3, 4, requires_grad=True), "b": torch.randn(5, requires_grad=True)}
    snap = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    rho = 0.7
    term = proximal_term(w, snap, rho)
    expected = 0.5 * rho * sum(((w[k] - snap[k]) ** 2).sum() for k in w)
    assert term.item() == pytest.approx(expected.item(), rel=1e-6)
    term.backward()
    for k in w:
        torch.testing.assert_close(w[k].grad, rho * (w[k].detach() - snap[k]))
    seq = proximal_term([w["a"], w["b"]], [snap["a"], snap["b"]], rho)
    assert seq.item() == pytest.approx(term.item(), rel=1e-6)
    assert proximal_term(snap, snap, 1.0).item() == 0
    with pytest.raises(NlsrError):
        proximal_term(w, {"a": snap["a"]}, rho)
    with pytest.raises(NlsrError):
        proximal_term([w["a"]], snap, rho)


class _Recorder:
    """Per optimizer step: the phase, the anchor, the weights after the step and the decoded targets."""

    def __init__(self, trainer, tokenizer):
        from transformers import TrainerCallback

        self.trainer, self.after, self.anchors, self.phases, self.targets = trainer, [], [], [], []
        self.initial = {n: p.detach().clone() for n, p in trainer.trainable_parameters().items()}
        recorder = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                recorder.after.append({n: p.detach().clone() for n, p in trainer.trainable_parameters().items()})
                recorder.anchors.append({n: t.clone() for n, t in trainer.lisa_anchor.items()})
                recorder.phases.append(trainer.lisa_phase)

        trainer.add_callback(Callback())
        original = trainer.compute_loss

        def compute_loss(model, inputs, *args, **kwargs):
            labels = inputs["labels"]
            self.targets.append((trainer.state.global_step,
                                 [tokenizer.decode(row[row != -100]) for row in labels]))
            return original(model, inputs, *args, **kwargs)

        trainer.compute_loss = compute_loss


def test_snapshots_are_taken_at_switches_and_phases_use_their_data(tiny_model, tiny_tokenizer, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, tmp_path, args=_args(tmp_path, max_steps=4),
                       k_align=1, k_finetune=2, rho=1.0)
    rec = _Recorder(trainer, tiny_tokenizer)
    trainer.train()
    assert rec.phases == ["align", "finetune", "finetune", "align"]
    assert trainer.lisa_switches == [(0, "align"), (1, "finetune"), (3, "align")]
    equal = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert equal(rec.anchors[0], rec.initial)        # first state: anchored at the start
    assert equal(rec.anchors[1], rec.after[0])       # switch at step 1: weights at the end of step 0
    assert equal(rec.anchors[2], rec.after[0])       # no switch at step 2: same anchor
    assert equal(rec.anchors[3], rec.after[2])       # switch at step 3: weights at the end of step 2
    assert not equal(rec.after[1], rec.after[0])
    for step, targets in rec.targets:
        expected = "REFUSE" if step in (0, 3) else " positive"
        assert all(t.startswith(expected) for t in targets), (step, targets)
    logged = [h for h in trainer.state.log_history if "lisa/proximal" in h]
    # the term is 0 on the first step of a state (w = w̃ right after the snapshot) and grows within a state
    assert [h["lisa/proximal"] > 0 for h in logged] == [False, False, True, False]


def test_proximal_term_is_added_to_the_phase_loss(tiny_model, tiny_tokenizer, tmp_path):
    from trl import SFTTrainer

    trainer = _trainer(tiny_model, tiny_tokenizer, tmp_path, rho=3.0)
    batch = next(iter(trainer.get_train_dataloader()))
    anchor = {n: p.detach() + 0.1 for n, p in trainer.trainable_parameters().items()}
    trainer.lisa_anchor, trainer._lisa_in_step = anchor, True
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(trainer.model, dict(batch))
    plain = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
    expected = plain + proximal_term(trainer.trainable_parameters(), anchor, 3.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    trainer._lisa_in_step = False  # outside a training step (evaluation): no term
    assert trainer.compute_loss(trainer.model, dict(batch)).item() == pytest.approx(plain.item(), rel=1e-6)


def test_state_survives_a_checkpoint_resume(tiny_model, tiny_tokenizer, tmp_path):
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = _trainer(tiny_model, tiny_tokenizer, tmp_path, args=args, k_align=1, k_finetune=3)
    trainer.train()
    saved_anchor = {k: v.clone() for k, v in trainer.lisa_anchor.items()}
    resumed = _trainer(tiny_model, tiny_tokenizer, tmp_path, args=_args(tmp_path, max_steps=3),
                       k_align=1, k_finetune=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.lisa_switches == [(0, "align"), (1, "finetune")]  # no re-anchoring at the resume
    assert all(torch.equal(resumed.lisa_anchor[k], saved_anchor[k]) for k in saved_anchor)


def test_gradient_accumulation_draws_one_alignment_batch_per_micro_batch(tiny_model, tiny_tokenizer, tmp_path):
    args = _args(tmp_path, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=1)
    trainer = _trainer(tiny_model, tiny_tokenizer, tmp_path, args=args, k_align=1, k_finetune=1)
    rec = _Recorder(trainer, tiny_tokenizer)
    trainer.train()
    steps = [(step, targets[0][:6]) for step, targets in rec.targets]
    assert steps == [(0, "REFUSE"), (0, "REFUSE"), (1, " posit"), (1, " posit")]
