"""NLSR's ``protect_task``: safety entries that are also task-critical in the fine-tuned adapter are
left out of the transplant (masks ``M ∧ ¬M_task``)."""

from __future__ import annotations

import pytest
import torch
from test_anyfinetune import _run, tiny_run  # noqa: F401  (fixture)

from nlsr.errors import NlsrError
from nlsr.experiment.config import ExperimentConfig, VariantSection
from nlsr.method.masks import SafetyMasks


def _masks(values: dict[str, list[bool]], **metadata) -> SafetyMasks:
    return SafetyMasks({k: torch.tensor(v) for k, v in values.items()}, dict(metadata))


def _save_attacked(root, seed: int):
    """The tiny run's aligned adapter, nudged as a fine-tune would (same origin), saved as ``attack``."""
    from nlsr.weights.adapters import LoraFactors, load_adapter, save_adapter

    aligned = load_adapter(root / "align_dpo" / "adapter")
    gen = torch.Generator().manual_seed(seed)
    attacked = aligned.with_modules({n: LoraFactors(f.A + 0.1 * torch.randn(f.A.shape, generator=gen),
                                                    f.B + 0.01 * torch.randn(f.B.shape, generator=gen), f.scale)
                                     for n, f in aligned})
    (root / "attack").mkdir()
    save_adapter(attacked, root / "attack" / "adapter")
    return attacked


def _assert_same_deltas(repaired, expected) -> None:
    for name, f in expected:
        torch.testing.assert_close(repaired.modules[name].delta(), f.delta())


def test_without_task_entries_removes_exactly_the_task_critical_ones():
    from nlsr.experiment.stages.realign import without_task_entries

    safety = _masks({"a": [True, True, False, True], "b": [False, True]}, reference_fingerprint="x")
    task = _masks({"a": [True, False, True, False], "b": [False, True]})
    kept, share = without_task_entries(safety, task)
    assert kept.masks["a"].tolist() == [False, True, False, True]
    assert kept.masks["b"].tolist() == [False, False]
    assert share == pytest.approx(2 / 4)                      # 2 of the 4 safety entries were task-critical
    assert kept.metadata["reference_fingerprint"] == "x" and kept.metadata["protect_task"] == "true"
    assert safety.masks["a"].tolist() == [True, True, False, True]        # the input is not modified
    with pytest.raises(NlsrError, match="task masks lack 'b'"):
        without_task_entries(safety, _masks({"a": [True] * 4}))


def test_protect_task_is_an_nlsr_entry_option_in_the_repair_key():
    from nlsr.experiment.plan import build_stages

    with pytest.raises(ValueError, match="protect_task is an option of NLSR at entry granularity"):
        VariantSection(name="s", method="safelora", threshold=0.5, protect_task=0.1)
    with pytest.raises(ValueError, match="protect_task"):
        VariantSection(name="n", granularity="neuron", protect_task=0.1)
    variants = [{"name": "nlsr"}, {"name": "p", "protect_task": 0.1}]
    cfg = ExperimentConfig.model_validate({"realign": {"variants": variants}})
    stages = {s.name: s for s in build_stages(cfg)}
    assert stages["realign-nlsr"].params["variant"]["protect_task"] is None
    assert stages["realign-p"].params["variant"]["protect_task"] == 0.1


def test_task_masks_are_one_stage_per_seed_shared_by_the_variants_that_use_them():
    from nlsr.experiment.plan import build_stages

    cfg = ExperimentConfig.model_validate({
        "seeds": [0, 1], "precision": "float32",
        "realign": {"variants": [{"name": "nlsr"}, {"name": "nlsr-pt", "protect_task": 0.1},
                                 {"name": "nlsr-pt-q4", "q": 0.4, "protect_task": 0.1}],
                    "sweep": {"variant": "nlsr-pt", "field": "protect_task", "values": [0.05]}}})
    stages = {s.name: s for s in build_stages(cfg)}
    task = sorted(n for n in stages if n.startswith("identify-task"))
    assert task == ["identify-task-r0.8-q0.05-n128-s0", "identify-task-r0.8-q0.05-n128-s1",
                    "identify-task-r0.8-q0.1-n128-s0", "identify-task-r0.8-q0.1-n128-s1"]
    first = stages["identify-task-r0.8-q0.1-n128-s1"]
    assert first.inputs == ["data-attack-s1", "align_sft", "attack-s1"]
    assert first.roles == {"data-attack-s1": "data-attack", "attack-s1": "attack"}
    for variant in ("nlsr-pt", "nlsr-pt-q4"):
        realign = stages[f"realign-{variant}-s1"]
        assert "identify-task-r0.8-q0.1-n128-s1" in realign.inputs
        assert realign.roles["identify-task-r0.8-q0.1-n128-s1"] == "identify-task"
    assert not any(n.startswith("identify-task") for n in stages["realign-nlsr-s0"].inputs)
    names = list(stages)
    assert names.index("identify-task-r0.8-q0.1-n128-s0") < names.index("realign-nlsr-pt-s0")


def test_protect_task_repairs_with_the_task_entries_left_out(tiny_run, monkeypatch):  # noqa: F811
    from nlsr.experiment.pipeline import RunContext
    from nlsr.experiment.stages import data, realign
    from nlsr.method.masks import load_masks
    from nlsr.method.realign import realign as realign_adapters
    from nlsr.weights.adapters import load_adapter

    root, config = tiny_run
    attacked = _save_attacked(root, seed=1)
    rows = [{"instruction": "Sentiment?", "input": f"a {w} film", "output": w} for w in ("good", "bad", "fine")]
    drawn = []
    monkeypatch.setattr(data, "task_calibration_rows",
                        lambda cfg, d, attack, n, seed: drawn.append((len(attack), n, seed)) or rows)
    spec = {"name": "nlsr-pt", "select": "all", "protect_task": 0.3, "task_calibration_n": 3}
    cfg = config("continue", [spec])
    ctx = RunContext(cfg, root / "run", root)
    ctx.seed = 2
    variant = VariantSection(**spec)
    ident = f"identify-{realign.identify_id(variant)}"
    _run(realign.run_identify(variant), ctx, root, ident, ["data-align", "align_sft", "align_dpo"])
    line = _run(realign.run_identify_task(variant), ctx, root, "identify-task",
                ["data-attack", "align_sft", "attack"])["line"]
    assert drawn == [(4, 3, 2)] and "3 sst2 rows" in line
    task = load_masks(root / "identify-task" / "task_masks.safetensors")
    assert 0.29 < task.density() < 0.32                       # q = 0.3 of the fine-tuned factors' entries
    summary = _run(realign.run_variant(variant), ctx, root, "realign", ["align_sft", "align_dpo", "attack",
                                                                        ident, "identify-task"])["summary"]
    safety = load_masks(root / ident / "masks.safetensors")
    expected_kept, share = realign.without_task_entries(safety, task)
    assert summary["task_protected_share"] == pytest.approx(share) and 0 < share < 1
    expected = realign_adapters(load_adapter(root / ident / "reference"), attacked, expected_kept, select="all")
    _assert_same_deltas(load_adapter(root / "realign" / "adapter"), expected.adapter)
    # without protection the repair differs: the task-critical entries would have been transplanted
    plain = realign_adapters(load_adapter(root / ident / "reference"), attacked, safety, select="all")
    assert any(not torch.allclose(plain.adapter.modules[n].delta(), f.delta()) for n, f in expected.adapter)


TASK_ROWS = [("Sentiment?", "positive", "a good film"), ("Sentiment?", "negative", "a dull film"),
             ("Topic?", "sports", "the match ended")]


def _task_rows():
    from nlsr.method.calibration import CalibrationRow

    return [CalibrationRow(p, r, i) for p, r, i in TASK_ROWS]


def test_fisher_is_the_mean_squared_per_row_gradient_checked_by_finite_differences(tiny_model, tiny_tokenizer,
                                                                                   shapes):
    from conftest import random_adapter
    from nlsr.method.protect_task import fisher_diagonal
    from nlsr.weights.adapters import LoraFactors, attach_adapter, weight_key

    adapter = random_adapter(shapes, base="tiny")
    rows = _task_rows()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in tiny_model.named_parameters()}
    fisher = fisher_diagonal(tiny_model, adapter, rows, tiny_tokenizer, template="alpaca")
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())     # model untouched
    assert {k: p.requires_grad for k, p in tiny_model.named_parameters()} == flags
    assert all(p.grad is None for p in tiny_model.parameters())
    singles = [fisher_diagonal(tiny_model, adapter, [r], tiny_tokenizer, template="alpaca") for r in rows]
    for key, value in fisher.items():                  # a mean of per-row squares, not a squared batch sum
        torch.testing.assert_close(value, sum(s[key] for s in singles) / len(rows))
    assert all((v >= 0).all() for v in fisher.values()) and any(v.sum() > 0 for v in fisher.values())

    # one entry's per-row gradient by central differences of the row's summed response NLL
    from nlsr.method.calibration import make_batches

    name = next(iter(adapter.modules))
    f = adapter.modules[name]

    def nll(delta: float) -> float:
        A = f.A.clone()
        A[1, 3] += delta
        peft = attach_adapter(tiny_model, adapter.with_modules({**adapter.modules, name: LoraFactors(A, f.B, f.scale)}))
        try:
            batch = next(make_batches(tiny_tokenizer, rows[:1], batch_size=1, template="alpaca"))
            with torch.no_grad():
                logits = peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[0, :-1]
            keep = batch.response_mask[0, 1:]
            return float(torch.nn.functional.cross_entropy(logits[keep].double(), batch.input_ids[0, 1:][keep],
                                                           reduction="sum"))
        finally:
            peft.unload()

    h = 0.03                                        # float32 logits: a small step drowns in rounding
    grad = (nll(h) - nll(-h)) / (2 * h)
    assert singles[0][weight_key(name, "A")][1, 3].item() == pytest.approx(grad ** 2, rel=0.02, abs=1e-7)


def test_transplant_cost_and_the_costliest_entries():
    from nlsr.method.protect_task import costliest_entries, transplant_cost
    from nlsr.weights.adapters import LoraAdapter, LoraFactors, weight_key

    def adapter(A, B):
        factors = LoraFactors(torch.tensor(A), torch.tensor(B), 1.0)
        return LoraAdapter(config={"r": 1, "lora_alpha": 1}, modules={"m": factors})

    finetuned = adapter([[1.0, 2.0, 3.0, 4.0]], [[1.0], [1.0]])
    reference = adapter([[1.0, 0.0, 3.0, 0.0]], [[3.0], [1.0]])
    fisher = {weight_key("m", "A"): torch.tensor([[5.0, 1.0, 9.0, 1.0]]),
              weight_key("m", "B"): torch.tensor([[1.0], [7.0]])}
    cost = transplant_cost(fisher, reference, finetuned)
    assert cost[weight_key("m", "A")].tolist() == [[0.0, 2.0, 0.0, 8.0]]        # ½ F (e - t)²
    assert cost[weight_key("m", "B")].tolist() == [[2.0], [0.0]]
    masks = costliest_entries(cost, 0.5, finetuned)
    assert masks.masks[weight_key("m", "A")].tolist() == [[False, True, False, True]]
    assert masks.masks[weight_key("m", "B")].tolist() == [[True], [False]]
    with pytest.raises(NlsrError, match="lacks"):
        transplant_cost({}, reference, finetuned)


def test_fisher_protection_is_one_stage_per_seed_for_every_fraction():
    from nlsr.experiment.plan import build_stages

    cfg = ExperimentConfig.model_validate({
        "seeds": [0], "precision": "float32",
        "realign": {"variants": [{"name": "f", "protect_task": 0.1, "protect_task_score": "fisher"},
                                 {"name": "g", "q": 0.4, "protect_task": 0.3, "protect_task_score": "fisher"},
                                 {"name": "m", "protect_task": 0.1}]}})
    stages = {s.name: s for s in build_stages(cfg)}
    assert sorted(n for n in stages if n.startswith("identify-task")) == [
        "identify-task-fisher-n128-s0", "identify-task-r0.8-q0.1-n128-s0"]
    assert stages["identify-task-fisher-n128-s0"].params["score"] == "fisher"
    assert "identify-task-fisher-n128-s0" in stages["realign-g-s0"].inputs
    assert stages["realign-g-s0"].params["variant"]["protect_task_score"] == "fisher"
    assert stages["realign-m-s0"].params["variant"]["protect_task_score"] == "magnitude"
    assert stages["identify-task-r0.8-q0.1-n128-s0"].params["score"] == "magnitude"


def test_fisher_protection_end_to_end(tiny_run, monkeypatch):  # noqa: F811
    from nlsr.experiment.pipeline import RunContext
    from nlsr.experiment.stages import data, realign
    from nlsr.method.masks import load_masks
    from nlsr.method.protect_task import costliest_entries, transplant_cost
    from nlsr.method.realign import realign as realign_adapters
    from nlsr.weights.adapters import load_adapter, read_safetensors

    root, config = tiny_run
    attacked = _save_attacked(root, seed=3)
    rows = [{"instruction": p, "output": r, "input": i} for p, r, i in TASK_ROWS]
    monkeypatch.setattr(data, "task_calibration_rows", lambda cfg, d, attack, n, seed: rows)
    spec = {"name": "nlsr-f", "select": "all", "protect_task": 0.3, "protect_task_score": "fisher"}
    cfg = config("continue", [spec])
    ctx = RunContext(cfg, root / "run", root)
    variant = VariantSection(**spec)
    ident = f"identify-{realign.identify_id(variant)}"
    _run(realign.run_identify(variant), ctx, root, ident, ["data-align", "align_sft", "align_dpo"])
    line = _run(realign.run_identify_task(variant), ctx, root, "identify-task",
                ["data-attack", "align_sft", "attack"])["line"]
    assert line.startswith("diagonal Fisher") and "3 sst2 rows" in line
    summary = _run(realign.run_variant(variant), ctx, root, "realign", ["align_sft", "align_dpo", "attack",
                                                                        ident, "identify-task"])["summary"]
    reference = load_adapter(root / ident / "reference")
    fisher = read_safetensors(root / "identify-task" / "task_fisher.safetensors", "Fisher file", "-")
    task = costliest_entries(transplant_cost(fisher, reference, attacked), 0.3, attacked)
    kept, share = realign.without_task_entries(load_masks(root / ident / "masks.safetensors"), task)
    assert summary["task_protected_share"] == pytest.approx(share) and 0 < share < 1
    expected = realign_adapters(reference, attacked, kept, select="all")
    _assert_same_deltas(load_adapter(root / "realign" / "adapter"), expected.adapter)
