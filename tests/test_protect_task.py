"""NLSR's ``protect_task``: safety entries that are also task-critical in the fine-tuned adapter are
left out of the transplant (masks ``M ∧ ¬M_task``)."""

from __future__ import annotations

import pytest
import torch
from test_anyfinetune import _run, tiny_run  # noqa: F401  (fixture)

from nlsr.config import ExperimentConfig, VariantSection
from nlsr.errors import NlsrError
from nlsr.identification import SafetyMasks


def _masks(values: dict[str, list[bool]], **metadata) -> SafetyMasks:
    return SafetyMasks({k: torch.tensor(v) for k, v in values.items()}, dict(metadata))


def test_without_task_entries_removes_exactly_the_task_critical_ones():
    from nlsr.stages.realign import without_task_entries

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


def test_protect_task_is_an_nlsr_entry_option_and_stays_out_of_older_keys():
    from nlsr.experiment import variant_params

    with pytest.raises(ValueError, match="protect_task is an option of NLSR at entry granularity"):
        VariantSection(name="s", method="safelora", threshold=0.5, protect_task=0.1)
    with pytest.raises(ValueError, match="protect_task"):
        VariantSection(name="n", granularity="neuron", protect_task=0.1)
    assert "protect_task" not in variant_params(VariantSection(name="nlsr"))
    assert "task_calibration_n" not in variant_params(VariantSection(name="nlsr"))
    assert variant_params(VariantSection(name="p", protect_task=0.1))["protect_task"] == 0.1


def test_task_masks_are_one_stage_per_seed_shared_by_the_variants_that_use_them():
    from nlsr.experiment import build_stages

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
    from nlsr.adapters import LoraFactors, load_adapter, save_adapter
    from nlsr.identification import load_masks
    from nlsr.pipeline import RunContext
    from nlsr.realignment import realign as realign_adapters
    from nlsr.stages import data, realign

    root, config = tiny_run
    aligned = load_adapter(root / "align_dpo" / "adapter")
    gen = torch.Generator().manual_seed(1)
    attacked = aligned.with_modules({n: LoraFactors(f.A + 0.1 * torch.randn(f.A.shape, generator=gen),
                                                    f.B + 0.01 * torch.randn(f.B.shape, generator=gen), f.scale)
                                     for n, f in aligned})
    (root / "attack").mkdir()
    save_adapter(attacked, root / "attack" / "adapter")
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
    repaired = load_adapter(root / "realign" / "adapter")
    for name, f in expected.adapter:
        torch.testing.assert_close(repaired.modules[name].delta(), f.delta())
    # without protection the repair differs: the task-critical entries would have been transplanted
    plain = realign_adapters(load_adapter(root / ident / "reference"), attacked, safety, select="all")
    assert any(not torch.allclose(plain.adapter.modules[n].delta(), f.delta()) for n, f in expected.adapter)
