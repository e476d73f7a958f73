"""The controls of issue 34 at the method level: magnitude masks, the random selection rule, the
default constants, and the post-hoc peers RESTA and Antidote."""
import math

import pytest
import torch

from conftest import CALIBRATION_ROWS, perturbed, random_adapter
from nlsr.errors import NlsrError
from nlsr.method import DEFAULT_Q, DEFAULT_TRANSPLANT, SELECTION_RULES, TRANSPLANTS
from nlsr.method.calibration import CalibrationRow
from nlsr.method.extrapolate import extrapolate
from nlsr.method.masks import SafetyMasks
from nlsr.weights.adapters import save_adapter, weight_key


def _merged(tmp_path, tiny_model_dir, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    save_adapter(adapter, tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = dict(PeftModel.from_pretrained(base, tmp_path / "out").merge_and_unload().named_parameters())
    return before, merged


def test_magnitude_masks_mark_the_largest_entries_of_each_factor(shapes):
    from nlsr.method.controls import magnitude_masks

    reference = extrapolate(random_adapter(shapes), beta=0.9)
    masks = magnitude_masks(reference, 0.25, beta=0.9)
    assert masks.metadata["magnitude"] == "true" and masks.metadata["beta"] == "0.9"
    for name, f in reference:
        for factor, tensor in (("A", f.A), ("B", f.B)):
            mask = masks.masks[weight_key(name, factor)]
            assert int(mask.sum()) == math.ceil(0.25 * tensor.numel())
            assert tensor[mask].abs().min() >= tensor[~mask].abs().max()


def test_random_rule_ignores_the_similarities_and_its_seed_draws_the_modules():
    rule = SELECTION_RULES.get("random")
    sims = torch.linspace(-1, 1, 400, dtype=torch.float64)
    prob, repaired = rule(sims, p_base=0.5, seed=0)
    assert torch.all(prob == 0.5)
    assert 150 < int(repaired.sum()) < 250
    # the same draw whatever the similarities; another seed, another draw
    assert torch.equal(rule(sims.flip(0), p_base=0.5, seed=0)[1], repaired)
    assert not torch.equal(rule(sims, p_base=0.5, seed=1)[1], repaired)
    assert int(rule(sims, p_base=0.2, seed=0)[1].sum()) < int(repaired.sum())


def test_default_transplant_and_q_are_one_constant_for_cli_and_config():
    import inspect

    from nlsr.cli import batch, repair
    from nlsr.experiment.config import VariantSection
    from nlsr.method.batch_item import OPTION_DEFAULTS

    assert DEFAULT_TRANSPLANT in TRANSPLANTS
    variant = VariantSection(name="x")
    assert (variant.transplant, variant.q) == (DEFAULT_TRANSPLANT, DEFAULT_Q)
    assert inspect.signature(repair.realign).parameters["transplant"].default == DEFAULT_TRANSPLANT
    assert inspect.signature(repair.identify).parameters["keep"].default == DEFAULT_Q
    from nlsr.method.identify import identify, identify_model_dir
    assert inspect.signature(identify).parameters["q"].default == DEFAULT_Q
    assert inspect.signature(identify_model_dir).parameters["q"].default == DEFAULT_Q
    assert OPTION_DEFAULTS["transplant"] == DEFAULT_TRANSPLANT
    assert inspect.signature(batch.realign_batch).parameters["transplant"].default == DEFAULT_TRANSPLANT


def test_resta_adds_gamma_times_the_aligned_update(tmp_path, tiny_model_dir, shapes):
    from nlsr.method.resta import resta

    aligned = random_adapter(shapes, base=str(tiny_model_dir))
    finetuned = perturbed(aligned, noise=0.3)
    result = resta(aligned, finetuned, gamma=0.5)
    old = sum(float(f.delta().pow(2).sum()) for _, f in finetuned)
    added = sum(float((0.5 * f.delta()).pow(2).sum()) for _, f in aligned)
    assert result.relative_change == pytest.approx((added / old) ** 0.5, rel=1e-6)
    before, merged = _merged(tmp_path, tiny_model_dir, result.adapter)
    for name, f in finetuned:
        assert result.adapter.modules[name].rank == 2 * f.rank
        expected = before[f"{name}.weight"].double() + f.delta() + 0.5 * aligned.modules[name].delta()
        torch.testing.assert_close(merged[f"{name}.weight"].double(), expected, atol=1e-5, rtol=1e-5)
    assert resta(aligned, finetuned, gamma=0.0).relative_change < 1e-7
    with pytest.raises(NlsrError, match="gamma"):
        resta(aligned, finetuned, gamma=-1.0)


def test_antidote_prunes_the_most_salient_entries_and_stays_a_peft_adapter(tmp_path, tiny_model_dir, tiny_model,
                                                                           tiny_tokenizer, shapes):
    from nlsr.method.antidote import antidote, harmful_activation_norms

    finetuned = random_adapter(shapes, base=str(tiny_model_dir))
    rows = [CalibrationRow(r["prompt"], r["response"]) for r in CALIBRATION_ROWS]
    norms = harmful_activation_norms(tiny_model, finetuned, rows, tiny_tokenizer, batch_size=2, max_length=512)
    assert set(norms) == set(finetuned.modules)
    for name, f in finetuned:
        x, z = norms[name]
        assert x.shape == (f.A.shape[1],) and z.shape == (f.A.shape[0],) and bool((x > 0).all())
    # the model is given back as it was (no adapter left attached)
    assert not any("lora" in n for n, _ in tiny_model.named_parameters())
    result = antidote(finetuned, norms, sparsity=0.3)
    for name, f in finetuned:
        x, z = norms[name]
        out = result.adapter.modules[name]
        for old, new, score in ((f.A, out.A, f.A.double().abs() * x), (f.B, out.B, f.B.double().abs() * z)):
            cut = (new == 0) & (old != 0)
            assert int(cut.sum()) == math.ceil(0.3 * old.numel())
            assert score[cut].min() >= score[~cut].max()         # the most salient entries went
            torch.testing.assert_close(new[~cut], old[~cut])
    expected = sum(math.ceil(0.3 * f.A.numel()) + math.ceil(0.3 * f.B.numel()) for _, f in finetuned)
    assert result.summary["pruned_entries"] == expected
    assert 0 < result.relative_change < 1
    before, merged = _merged(tmp_path, tiny_model_dir, result.adapter)
    for name, f in result.adapter:
        torch.testing.assert_close(merged[f"{name}.weight"].double(), before[f"{name}.weight"].double() + f.delta(),
                                   atol=1e-5, rtol=1e-5)
    assert antidote(finetuned, norms, sparsity=0.0).relative_change == 0.0
    with pytest.raises(NlsrError, match="sparsity"):
        antidote(finetuned, norms, sparsity=1.0)
    with pytest.raises(NlsrError, match="no activation norms"):
        antidote(finetuned, {}, sparsity=0.1)


def test_masks_of_a_control_fit_the_realign_api(shapes):
    from nlsr.method.controls import magnitude_masks
    from nlsr.method.realign import realign

    aligned = random_adapter(shapes)
    reference, finetuned = extrapolate(aligned, beta=0.9), perturbed(aligned, noise=0.2)
    masks = magnitude_masks(reference, 0.2)
    assert isinstance(masks, SafetyMasks)
    result = realign(reference, finetuned, masks, select="random", seed=3, transplant="block")
    assert result.report()["settings"]["select"] == "random"
    assert 0 < result.report()["summary"]["repaired"] < len(result.decisions)


def test_the_default_is_the_one_the_controls_chose():
    """DEFAULT_TRANSPLANT and DEFAULT_Q are the ``default`` of the committed controls summary (the full
    run where it exists, else the quick one)."""
    import json
    from pathlib import Path

    results = Path(__file__).resolve().parents[1] / "results"
    summary = next(p for p in (results / "method-controls" / "summary.json",
                               results / "method-controls-quick" / "summary.json") if p.is_file())
    chosen = json.loads(summary.read_text())["default"]
    assert (chosen["transplant"], chosen["q"]) == (DEFAULT_TRANSPLANT, DEFAULT_Q)
