import json

import pytest
import torch

from conftest import perturbed, random_adapter
from nlsr.errors import NlsrError
from nlsr.method.checks import origin_cosines
from nlsr.method.extrapolate import extrapolate
from nlsr.method.masks import SafetyMasks
from nlsr.method.realign import realign
from nlsr.weights.adapters import load_adapter, save_adapter, weight_key


def random_masks(adapter, q=0.3, seed=0) -> SafetyMasks:
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for name, f in adapter:
        masks[weight_key(name, "A")] = torch.rand(f.A.shape, generator=gen) < q
        masks[weight_key(name, "B")] = torch.rand(f.B.shape, generator=gen) < q
    return SafetyMasks(masks)


@pytest.fixture
def setting(shapes):
    aligned = random_adapter(shapes)
    reference = extrapolate(aligned, beta=0.9)
    finetuned = perturbed(aligned, noise=0.2)
    return reference, finetuned, random_masks(reference)


def _exact_formula(e, t, M_A, M_B):
    return (M_B * e.B).double() @ (M_A * e.A).double() + (~M_B * t.B).double() @ (~M_A * t.A).double()


def _block_formula(e, t, M_A, M_B):
    return (t.B.double() @ t.A.double() + (M_B * e.B).double() @ (M_A * e.A).double()
            - (M_B * t.B).double() @ (M_A * t.A).double())


@pytest.mark.parametrize(("transplant", "ranks", "formula"),
                         [("exact", 2, _exact_formula), ("block", 3, _block_formula)])
def test_lowrank_forms_effective_delta_equals_formula(setting, transplant, ranks, formula):
    reference, finetuned, masks = setting
    result = realign(reference, finetuned, masks, select="all", transplant=transplant)
    for name, out in result.adapter:
        e, t = reference.modules[name], finetuned.modules[name]
        assert out.rank == ranks * t.rank and out.scale == t.scale
        torch.testing.assert_close(out.delta(), t.scale * formula(e, t, *masks.pair(name)))


def test_factor_output_effective_delta_equals_formula(setting):
    reference, finetuned, masks = setting
    result = realign(reference, finetuned, masks, select="all", transplant="factor")
    for name, out in result.adapter:
        e, t = reference.modules[name], finetuned.modules[name]
        M_A, M_B = masks.pair(name)
        A = torch.where(M_A, e.A, t.A).double()
        B = torch.where(M_B, e.B, t.B).double()
        torch.testing.assert_close(out.delta(), t.scale * B @ A)


def test_unrepaired_modules_are_untouched(setting):
    reference, finetuned, masks = setting
    result = realign(reference, finetuned, masks, select="threshold", threshold=-2.0)
    assert not any(d.repaired for d in result.decisions)
    for name, out in result.adapter:
        assert out is finetuned.modules[name]


def test_paper_rule_report(setting):
    reference, finetuned, masks = setting
    result = realign(reference, finetuned, masks, select="paper", seed=3)
    report = result.report()
    rows = report["modules"]
    least = min(rows, key=lambda r: r["similarity"])
    most = max(rows, key=lambda r: r["similarity"])
    assert least["repair_probability"] == pytest.approx(0.7)
    assert most["repair_probability"] == pytest.approx(0.3)
    assert report["summary"]["repaired"] == sum(r["repaired"] for r in rows)
    json.dumps(report)                                       # JSON-ready
    again = realign(reference, finetuned, masks, select="paper", seed=3)
    assert [d.repaired for d in again.decisions] == [r["repaired"] for r in rows]


@pytest.mark.parametrize("transplant", ["exact", "factor", "block"])
def test_realigned_adapter_loads_in_peft_and_merges_to_base_plus_delta(
        tmp_path, tiny_model_dir, shapes, transplant):
    """Mixed ranks (repaired rank 2r, others r) survive PEFT's rank_pattern matching."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    aligned = random_adapter(shapes, base=str(tiny_model_dir))
    reference = extrapolate(aligned, beta=0.9)
    finetuned = perturbed(aligned, noise=0.2)
    masks = random_masks(reference)
    result = realign(reference, finetuned, masks, select="paper", seed=1, transplant=transplant)
    repaired = [d.repaired for d in result.decisions]
    assert any(repaired) and not all(repaired)
    save_adapter(result.adapter, tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, tmp_path / "out").merge_and_unload()
    weights = dict(merged.named_parameters())
    for name, f in result.adapter:
        torch.testing.assert_close(weights[f"{name}.weight"].double(),
                                   before[f"{name}.weight"].double() + f.delta(),
                                   atol=1e-5, rtol=1e-5)
    assert load_adapter(tmp_path / "out").num_parameters() == result.adapter.num_parameters()


def test_unrelated_adapter_is_refused(shapes):
    reference = extrapolate(random_adapter(shapes, seed=0), beta=0.9)
    fresh = random_adapter(shapes, seed=5)                      # independent initialisation
    assert max(origin_cosines(reference, fresh).values()) < 0.5
    with pytest.raises(NlsrError, match="does not continue the aligned one"):
        realign(reference, fresh, random_masks(reference))
    realign(reference, fresh, random_masks(reference), min_origin_cosine=0.0)


def test_bad_settings_and_masks(setting, shapes):
    reference, finetuned, masks = setting
    with pytest.raises(NlsrError, match="unknown selection rule 'best'"):
        realign(reference, finetuned, masks, select="best")
    with pytest.raises(NlsrError, match="unknown transplant form 'row'"):
        realign(reference, finetuned, masks, transplant="row")
    with pytest.raises(NlsrError, match="needs --threshold"):
        realign(reference, finetuned, masks, select="threshold")
    key = next(iter(masks.masks))
    partial = SafetyMasks({k: v for k, v in masks.masks.items() if k != key})
    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    with pytest.raises(NlsrError, match=rf"1 of the reference adapter's \d+ modules have no masks \('{module}'\)"):
        realign(reference, finetuned, partial)
    with pytest.raises(NlsrError, match="has rank 4 in the reference adapter but 2"):
        realign(reference, random_adapter(shapes, rank=2), masks)


def _old_similarity(e, t, M_A, M_B) -> float:
    """The previous per-module implementation (three pairs of r x r products of masked copies)."""
    def inner(A1, B1, A2, B2):
        return torch.sum((B1.T @ B2).double() * (A1 @ A2.T).double())
    A1, B1, A2, B2 = e.A * M_A, e.B * M_B, t.A * M_A, t.B * M_B
    norm1, norm2 = inner(A1, B1, A1, B1).clamp_min(0).sqrt(), inner(A2, B2, A2, B2).clamp_min(0).sqrt()
    return float(inner(A1, B1, A2, B2) / (norm1 * norm2).clamp_min(1e-30))


@pytest.mark.parametrize(("select", "seed"), [("paper", 0), ("paper", 3), ("reverse", 1), ("threshold", 0)])
def test_similarities_are_exact_and_decisions_unchanged(setting, select, seed):
    """The batched similarity equals the float64 dense cosine and the previous implementation's
    similarities closely enough that every decision is the same."""
    from nlsr.method import SELECTION_RULES

    reference, finetuned, masks = setting
    names = list(finetuned.modules)
    old = torch.tensor([_old_similarity(reference.modules[n], finetuned.modules[n], *masks.pair(n))
                        for n in names], dtype=torch.float64)
    middle = old.sort().values[len(names) // 2 - 1: len(names) // 2 + 1]
    threshold = float(middle.mean()) if select == "threshold" else None     # between two modules
    result = realign(reference, finetuned, masks, select=select, seed=seed, threshold=threshold)
    got = torch.tensor([d.similarity for d in result.decisions], dtype=torch.float64)
    dense = []
    for n in names:
        e, t = reference.modules[n], finetuned.modules[n]
        M_A, M_B = masks.pair(n)
        pe = ((M_B * e.B).double() @ (M_A * e.A).double()).flatten()
        pt = ((M_B * t.B).double() @ (M_A * t.A).double()).flatten()
        dense.append(float(pe @ pt / (pe.norm() * pt.norm())))
    assert (got - torch.tensor(dense, dtype=torch.float64)).abs().max() < 1e-6
    assert (got - old).abs().max() < 1e-6
    old_prob, old_repaired = SELECTION_RULES.get(select)(old, seed=seed, threshold=threshold)
    assert [d.repaired for d in result.decisions] == old_repaired.tolist()
    assert [d.repair_probability for d in result.decisions] == old_prob.tolist()


def _dense(f) -> torch.Tensor:
    return f.scale * (f.B.double() @ f.A.double())


@pytest.mark.parametrize("transplant", ["exact", "factor", "block"])
def test_report_says_how_much_the_update_changed(setting, transplant):
    reference, finetuned, masks = setting
    result = realign(reference, finetuned, masks, select="paper", seed=1, transplant=transplant)
    summary = result.report()["summary"]
    repaired = [d.module for d in result.decisions if d.repaired]
    assert 0 < len(repaired) < len(result.decisions)
    diff = sum(float((_dense(result.adapter.modules[n]) - _dense(finetuned.modules[n])).pow(2).sum()) for n in repaired)
    old_repaired = sum(float(_dense(finetuned.modules[n]).pow(2).sum()) for n in repaired)
    old_all = sum(float(_dense(f).pow(2).sum()) for _, f in finetuned)
    assert summary["relative_change_repaired"] == pytest.approx((diff / old_repaired) ** 0.5, rel=1e-5)
    assert summary["relative_change"] == pytest.approx((diff / old_all) ** 0.5, rel=1e-5)
    kept = [d.similarity for d in result.decisions if not d.repaired]
    assert summary["similarity_kept"] == pytest.approx(sum(kept) / len(kept))
    assert not result.notes


def test_realigning_an_adapter_against_itself_is_flagged(setting):
    reference, _, masks = setting
    exact = realign(reference, reference, masks, select="all", transplant="exact")
    factor = realign(reference, reference, masks, select="all", transplant="factor")
    assert any("equals the reference" in n for n in exact.notes)
    assert exact.report()["settings"]["notes"] == exact.notes
    # the paper's exact form drops the cross terms, so even a self-transplant changes the update;
    # the factor form swaps equal entries and changes nothing
    assert exact.report()["summary"]["relative_change"] > 0.05
    assert factor.report()["summary"]["relative_change"] == pytest.approx(0.0, abs=1e-6)


def test_block_self_transplant_leaves_every_module_unchanged(setting):
    reference, _, masks = setting
    block = realign(reference, reference, masks, select="all", transplant="block")
    for name, out in block.adapter:
        before = _dense(reference.modules[name])
        assert float((_dense(out) - before).norm() / before.norm()) < 1e-6
    assert block.report()["summary"]["relative_change"] < 1e-6
    exact = realign(reference, reference, masks, select="all", transplant="exact")
    assert exact.report()["summary"]["relative_change"] > 0.05


@pytest.mark.parametrize(("transplant", "erases"), [("exact", True), ("factor", False), ("block", False)])
def test_self_transplant_change_of_each_form(setting, transplant, erases):
    from nlsr.method.realign import self_transplant_change

    reference, finetuned, masks = setting
    change = self_transplant_change(finetuned, masks, transplant)
    # the same figure as a realign of the adapter against itself, every module repaired
    summary = realign(finetuned, finetuned, masks, select="all", transplant=transplant).report()["summary"]
    assert change == pytest.approx(summary["relative_change"], rel=1e-6, abs=1e-9)
    if erases:      # the cross terms of the masked and the unmasked entries: a large share of the update
        assert change > 0.1
    else:
        assert change < 1e-6


def test_self_transplant_change_refuses_masks_of_other_shapes(setting, shapes):
    from nlsr.method.realign import self_transplant_change

    reference, _, _ = setting
    other = random_masks(random_adapter(shapes, rank=2))
    with pytest.raises(NlsrError, match="shapes"):
        self_transplant_change(reference, other, "block")
    with pytest.raises(NlsrError):
        self_transplant_change(reference, random_masks(reference), "nope")


@pytest.mark.parametrize("transplant", ["exact", "factor", "block"])
def test_a_barely_drifted_fine_tune_gets_an_accurate_change(setting, transplant):
    # the change is measured from the form's own difference terms: no cancellation of large terms,
    # so a change of ~1e-5 of the update is resolved in float32
    reference, _, masks = setting
    gen = torch.Generator().manual_seed(9)
    finetuned = reference.with_modules({n: type(f)(A=f.A + 1e-5 * torch.randn(f.A.shape, generator=gen), B=f.B,
                                                    scale=f.scale) for n, f in reference})
    result = realign(reference, finetuned, masks, select="all", transplant=transplant, min_origin_cosine=0)
    diff = sum(float((_dense(result.adapter.modules[n]) - _dense(f)).pow(2).sum()) for n, f in finetuned)
    old = sum(float(_dense(f).pow(2).sum()) for _, f in finetuned)
    expected = (diff / old) ** 0.5
    if transplant != "exact":
        assert expected < 1e-3
    assert result.report()["summary"]["relative_change"] == pytest.approx(expected, rel=1e-3)


def test_the_reference_masked_once_gives_the_same_repair(setting):
    from nlsr.method.realign import masked_reference_of

    reference, finetuned, masks = setting
    fresh = realign(reference, finetuned, masks, seed=3)
    made_once = masked_reference_of(reference, masks)
    cached = realign(reference, finetuned, masks, seed=3, masked_reference=made_once)
    assert cached.report() == fresh.report()                   # similarities and change bit for bit
    for name, f in fresh.adapter:
        assert torch.equal(f.A, cached.adapter.modules[name].A) and torch.equal(f.B, cached.adapter.modules[name].B)


def test_a_form_registered_elsewhere_is_measured_on_its_output(setting):
    # a user's form has no change terms: its change is measured on the factors it returns
    from nlsr.method import TRANSPLANTS
    from nlsr.method.realign import self_transplant_change

    reference, finetuned, masks = setting

    @TRANSPLANTS.register("keep-finetune", summary="test: the fine-tune's factors, unchanged")
    def keep(A_e, B_e, A_t, B_t, M_A, M_B):
        return A_t.clone(), B_t.clone()

    try:
        result = realign(reference, finetuned, masks, select="all", transplant="keep-finetune")
        assert result.report()["summary"]["relative_change"] < 1e-6
        assert self_transplant_change(finetuned, masks, "keep-finetune") < 1e-6
    finally:
        TRANSPLANTS.unregister("keep-finetune")


@pytest.mark.parametrize("transplant", ["exact", "factor", "block"])
@pytest.mark.parametrize("narrow", [torch.bfloat16, torch.float16])
def test_a_narrow_fine_tune_is_repaired_in_its_dtype_as_the_float32_repair_rounded(setting, transplant, narrow):
    # the repair of a bf16/fp16 fine-tune runs in its dtype (the reference rounded first); the forms only
    # keep, zero or negate entries, so it must equal the float32 repair of the same values, rounded
    reference, finetuned, masks = setting
    stored = finetuned.with_modules({n: type(f)(f.A.to(narrow), f.B.to(narrow), f.scale) for n, f in finetuned})
    stored.dtype = narrow
    widened = finetuned.with_modules({n: type(f)(f.A.float(), f.B.float(), f.scale) for n, f in stored})
    fast = realign(reference, stored, masks, select="all", transplant=transplant)
    slow = realign(reference, widened, masks, select="all", transplant=transplant)
    assert fast.report() == slow.report()                      # the scoring and change use float32 either way
    for name, f in fast.adapter:
        want = slow.adapter.modules[name]
        assert f.A.dtype == f.B.dtype == narrow
        assert torch.equal(f.A, want.A.to(narrow)) and torch.equal(f.B, want.B.to(narrow)), name
