"""Steps 3 and 4 on whole adapters: score every module, pick the ones to repair, transplant."""

from __future__ import annotations

import json
import os
import re
import statistics
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nlsr.errors import NlsrError
from nlsr.method import DEFAULT_TRANSPLANT, TRANSPLANTS
from nlsr.method.checks import (
    check_entry_granularity,
    check_masks,
    check_neuron_masks,
    check_same_modules,
    check_shared_origin,
)
from nlsr.method.masks import NEURON, SafetyMasks, granularity_of, neuron_key
from nlsr.method.select import check_rule, decide
from nlsr.method.similarity import (
    MaskedFactors,
    cosine_of_sums,
    cosines_of_sums,
    cpu_map,
    dense_row_sums,
    gram_sum,
    lowrank_sq,
    mask_factors,
    mask_reference,
    masked_similarity_sums,
    product_inner,
    row_masked_similarities,
    update_change,
    wide_numpy,
)
from nlsr.method.transplant import (
    SELECTING_FORMS,
    LowRank,
    change_from_masked_sums,
    change_terms,
    has_change_terms,
    row_transplant_dense,
    row_transplant_lowrank,
    subtract_lowrank,
)
from nlsr.paths import portable_path
from nlsr.weights.adapters import (
    LoraAdapter,
    LoraFactors,
    check_comparable,
    fingerprint,
    load_adapter,
    natural_key,
    same_base,
    weight_key,
)
from nlsr.weights.model_dirs import (
    MERGED_INFO,
    ModelDir,
    check_derived_from,
    check_same_tensors,
    merged_record,
    model_fingerprint,
    module_of,
    write_edited,
)

_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass
class ModuleDecision:
    """What realignment decided for one module (one row of ``realign_report.json``)."""

    module: str
    layer: int | None
    kind: str
    similarity: float
    repair_probability: float
    repaired: bool


@dataclass
class RealignResult:
    """The repaired adapter (adapters) or output directory (model directories), the decision per
    module, the settings used and notes on how the updates were compared."""

    decisions: list[ModuleDecision]
    settings: dict
    adapter: LoraAdapter | None = None
    out: Path | None = None
    notes: list[str] = field(default_factory=list)
    change: dict = field(default_factory=dict)    # see change_summary

    def report(self) -> dict:
        """The JSON-ready report: settings, a summary, and one row per module."""
        repaired = [d for d in self.decisions if d.repaired]
        summary = {"modules": len(self.decisions), "repaired": len(repaired)}
        if "rows_replaced" in self.settings:
            summary["rows_replaced"] = self.settings["rows_replaced"]
        summary["mean_similarity"] = statistics.fmean(d.similarity for d in self.decisions)
        summary.update(self.change)
        settings = {**self.settings, "notes": self.notes} if self.notes else self.settings
        return {"settings": settings, "summary": summary, "modules": [asdict(d) for d in self.decisions]}


def write_repaired(result: RealignResult, out: str | os.PathLike, force: bool = False, template: str | None = None,
                   **inputs: object) -> dict:
    """Write a repaired adapter as ``nlsr realign`` does: the PEFT adapter, its ``realign_report.json``
    (the ``inputs`` paths added to the settings) and the template it records (``nlsr.json``);
    atomically. Returns the report."""
    from nlsr.weights.adapters import save_adapter
    from nlsr.weights.records import RECORD_FILE, record_bytes

    report = result.report()
    report["settings"].update({name: str(value) for name, value in inputs.items()})
    extra = {"realign_report.json": (json.dumps(report, indent=2) + "\n").encode()}
    if template:
        extra[RECORD_FILE] = record_bytes(template=template)
    save_adapter(result.adapter, out, force=force, extra_files=extra)
    return report


def describe_change(summary: dict) -> str:
    """One line of a report's summary: what the repair changed."""
    def sim(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    if "relative_change" not in summary:
        return f"mean masked similarity {summary['mean_similarity']:.3f}"
    return (f"masked similarity: repaired {sim(summary['similarity_repaired'])}, "
            f"kept {sim(summary['similarity_kept'])}; "
            f"update changed by {100 * summary['relative_change_repaired']:.1f}% in the repaired modules, "
            f"{100 * summary['relative_change']:.1f}% over the adapter")


def change_summary(decisions: list[ModuleDecision], before: LoraAdapter, after: LoraAdapter) -> dict:
    """What a repair did, for the report and the terminal: modules repaired, the mean masked similarity
    of the repaired and the kept modules, and the relative change ``||ΔW'' - ΔW_t||_F / ||ΔW_t||_F``
    of the update inside the repaired modules and over the whole adapter (measured on the two
    adapters; entry repairs measure it from the form's own terms, :func:`_entry_changes`)."""
    changes = []
    for d in decisions:
        f = before.modules[d.module]
        if d.repaired:
            g = after.modules[d.module]
            changes.append(update_change((f.scale * f.B, f.A), (g.scale * g.B, g.A)))
        else:
            changes.append((0.0, product_inner(f.A, f.B, f.A, f.B).item() * f.scale ** 2))
    return summarize_change(decisions, changes)


def summarize_change(decisions: list[ModuleDecision], changes: list[tuple[float, float]]) -> dict:
    """:func:`change_summary` from ``(||ΔW'' - ΔW_t||², ||ΔW_t||²)`` per module (0 change where kept)."""
    changed = sum(c for c, _ in changes)
    old_total = sum(o for _, o in changes)
    old_repaired = sum(o for d, (_, o) in zip(decisions, changes, strict=True) if d.repaired)
    repaired = [d.similarity for d in decisions if d.repaired]
    kept = [d.similarity for d in decisions if not d.repaired]
    return {"similarity_repaired": statistics.fmean(repaired) if repaired else None,
            "similarity_kept": statistics.fmean(kept) if kept else None,
            "relative_change_repaired": (changed / old_repaired) ** 0.5 if old_repaired > 0 else 0.0,
            "relative_change": (changed / old_total) ** 0.5 if old_total > 0 else 0.0}


def self_transplant_change(adapter: LoraAdapter, masks: SafetyMasks, transplant: str) -> float:
    """``||ΔW'' - ΔW||_F / ||ΔW||_F`` over the whole adapter when ``adapter`` is repaired against itself
    in every module with ``masks`` by the form ``transplant``: the share of an update a form erases
    when nothing drifted. Exactly 0 for ``block`` and ``factor``; for the paper's ``exact``
    form, the cross terms it drops. The masks must cover ``adapter``'s modules with the factors'
    shapes (masks identified on a reference of the same adapter family fit the fine-tune)."""
    TRANSPLANTS.check(transplant)
    items = []
    for name, f in adapter:
        M_A, M_B = masks.pair(name)
        if M_A.shape != f.A.shape or M_B.shape != f.B.shape:
            raise NlsrError(f"the masks of module '{name}' have shapes {tuple(M_A.shape)} / {tuple(M_B.shape)}, "
                            f"the adapter's factors {tuple(f.A.shape)} / {tuple(f.B.shape)}")
        output = None
        if not has_change_terms(transplant):           # a form registered elsewhere: measured on its output
            A, B = TRANSPLANTS.get(transplant)(f.A, f.B, f.A, f.B, M_A, M_B)
            output = LoraFactors(A=A, B=B, scale=f.scale)
        items.append(_ModuleChange(f, M_A, M_B, source=f, output=output))
    changes = _entry_changes(transplant, items)
    total = sum(o for _, o in changes)
    return (sum(c for c, _ in changes) / total) ** 0.5 if total > 0 else 0.0


@dataclass
class _ModuleChange:
    """One module of an entry repair, for :func:`_entry_changes`: the fine-tune's factors, its masks,
    what was transplanted in (the reference's or the fill's factors, or their :class:`MaskedFactors`;
    None for a module that was kept), the repaired factors (read only by a form without
    :func:`~nlsr.method.transplant.change_terms`) and ``||ΔW'' - ΔW_t||² / s²`` where it is already
    known (:func:`~nlsr.method.transplant.change_from_masked_sums`)."""

    finetuned: LoraFactors
    M_A: torch.Tensor
    M_B: torch.Tensor
    source: LoraFactors | MaskedFactors | None = None
    output: LoraFactors | None = None
    change: float | None = None


def _entry_changes(transplant: str, modules: list[_ModuleChange],
                   workers: int | None = None) -> list[tuple[float, float]]:
    """``(||ΔW'' - ΔW_t||², ||ΔW_t||²)`` per module of an entry repair, from the form's change terms
    (:func:`~nlsr.method.transplant.change_terms`; a form without them: measured on its output).
    Factors are used as :func:`~nlsr.method.similarity.wide_numpy` gives them (float32 for bf16)."""
    local = threading.local()

    def one(m: _ModuleChange) -> tuple[float, float]:
        ft = m.finetuned
        a_t, b_t = wide_numpy(ft.A), wide_numpy(ft.B)
        grams: dict = {}                        # the fine-tune's own r x r products, shared with the change
        old = gram_sum(b_t, a_t, b_t, a_t, grams) * ft.scale ** 2
        if m.source is None:
            return 0.0, old
        if m.change is not None:
            return m.change * ft.scale ** 2, old
        if not hasattr(local, "buffers"):
            local.buffers = ({}, {})
        source = m.source
        if not isinstance(source, MaskedFactors):
            source = mask_factors(source.A, source.B, m.M_A, m.M_B, local.buffers[0], norm=False)
        terms = change_terms(transplant, source, a_t, b_t,
                             mask_factors(ft.A, ft.B, m.M_A, m.M_B, local.buffers[1], norm=False))
        if terms is None:
            out = m.output
            return update_change((ft.scale * ft.B, ft.A), (out.scale * out.B, out.A))[0], old
        return lowrank_sq(terms, grams) * ft.scale ** 2, old

    with torch.no_grad():
        return cpu_map(one, modules, workers)


def _same_as_reference_note(reference: LoraAdapter, finetuned: LoraAdapter) -> list[str]:
    """A warning when the fine-tune is the reference itself (checked module by module; the first
    differing module ends the check, so a real fine-tune costs one comparison)."""
    for name, f in finetuned:
        r = reference.modules.get(name)
        if r is None or r.scale != f.scale or r.A.shape != f.A.shape or r.B.shape != f.B.shape \
                or not (torch.equal(r.A, f.A) and torch.equal(r.B, f.B)):
            return []
    return ["warning: the fine-tuned adapter equals the reference: nothing drifted, and a repair can "
            "only change it where the transplant drops terms (see relative_change)"]


def layer_and_kind(module: str) -> tuple[int | None, str]:
    """``('model.layers.3.self_attn.q_proj')`` -> ``(3, 'q_proj')``."""
    match = _LAYER_RE.search(f".{module}.")
    return (int(match.group(1)) if match else None), module.rsplit(".", 1)[-1]


def realign(reference: LoraAdapter, finetuned: LoraAdapter, masks: SafetyMasks, *, select: str = "paper",
            transplant: str | None = None, threshold: float | None = None, p_base: float = 0.5,
            epsilon: float = 0.2, seed: int = 0, min_origin_cosine: float = 0.5,
            rebase: LoraAdapter | None = None, check_base: bool = True, allow_mask_mismatch: bool = False,
            granularity: str | None = None, fill: LoraAdapter | None = None,
            masked_reference: Mapping[str, MaskedFactors] | None = None) -> RealignResult:
    """Repair the fine-tuned adapter towards the reference inside the safety masks (NLSR steps 3-4).

    The granularity is the masks' (:func:`~nlsr.method.masks.granularity_of`); ``granularity``, when
    given, is what the caller expects, and masks of the other granularity are refused:

    * ``entry`` (the paper): the fine-tune must continue the aligned adapter (median cosine of the
      ``A`` factors at least ``min_origin_cosine``); repaired modules take ``transplant``
      (:data:`~nlsr.method.DEFAULT_TRANSPLANT` when None; ``exact``: the paper's formula, rank 2r;
      ``factor``: the authors' code, rank r; ``block``: the fine-tune with its masked block swapped,
      rank 3r).
    * ``neuron``: any LoRA fine-tune of the same base and modules, of any rank; repaired modules take
      the reference's masked rows (rank ``r_ref + r_ft``). ``rebase`` is the adapter merged into the
      fine-tune's base, if any (see :func:`reference_updates`).

    Args:
        reference: the reference adapter the masks were identified on.
        finetuned: the user's fine-tuned adapter.
        masks: safety-critical masks of ``reference`` (:func:`nlsr.method.identify.identify`).
        select: module selection rule: ``paper``, ``reverse``, ``threshold``, ``all`` or ``random``.
        threshold: τ for the ``threshold`` rule. p_base, epsilon: ``P_L`` and ε of the
            probabilistic rules. seed: seed of their draw.
        allow_mask_mismatch: accept masks recorded for another reference, an older masks file
            without a fingerprint, or masks of extra modules.
        fill: entry granularity, a control: the adapter whose factors are transplanted into the
            masks instead of the reference's (the fine-tune itself, for a pure-erasure control: the
            same similarities, selection and masks as the real repair, no safety information).
        masked_reference: entry granularity, the reference's masked factors made once for many
            repairs (:func:`masked_reference_of`); the result is the same without them.

    Returns:
        The repaired adapter, one decision per module, and the settings used.
    """
    rule = {"select": select, "threshold": threshold, "p_base": p_base, "epsilon": epsilon, "seed": seed}
    check_rule(**rule)
    if transplant is not None:
        TRANSPLANTS.check(transplant)
    if (granularity or granularity_of(masks)) == NEURON:
        if transplant is not None or fill is not None:
            raise NlsrError(f"{'transplant' if fill is None else 'fill'} applies to entry masks; neuron masks "
                            "take the reference's rows: drop it, or identify entry masks")
        if masked_reference is not None:
            raise NlsrError("masked_reference holds entry masks' factors; neuron masks do not use it: drop it")
        return _realign_rows(reference, finetuned, masks, rule, rebase, check_base, allow_mask_mismatch)
    if rebase is not None:
        raise NlsrError("rebase applies to neuron masks (a fine-tune on another base); entry masks compare "
                        "a fine-tune that continued the aligned adapter: drop rebase")
    return _realign_entries(reference, finetuned, masks, rule, transplant or DEFAULT_TRANSPLANT, min_origin_cosine,
                            check_base, allow_mask_mismatch, fill, masked_reference)


def _realign_entries(reference: LoraAdapter, finetuned: LoraAdapter, masks: SafetyMasks, rule: dict,
                     transplant: str, min_origin_cosine: float, check_base: bool,
                     allow_mask_mismatch: bool, fill: LoraAdapter | None = None,
                     masked_reference: Mapping[str, MaskedFactors] | None = None) -> RealignResult:
    check_entry_granularity(masks)
    check_comparable(reference, finetuned, check_base=check_base)
    check_masks(masks, reference, allow_mismatch=allow_mask_mismatch)
    # bf16/fp16 factors widened to float32 once, for every step below (the output keeps the input's dtype)
    wide = {name: _widened(f) for name, f in finetuned}
    origin = check_shared_origin(reference, finetuned.with_modules(wide), min_origin_cosine)
    if fill is not None:
        check_comparable(reference, fill, ("reference", "fill"), check_base=check_base)

    names = list(finetuned.modules)
    # All modules in one call: shared buffers, one module per worker thread.
    sums = masked_similarity_sums(
        [(reference.modules[n].A, reference.modules[n].B, wide[n].A, wide[n].B, *masks.pair(n)) for n in names],
        references=[masked_reference.get(n) for n in names] if masked_reference is not None else None)
    similarity = cosines_of_sums(sums)
    sum_rows = sums.tolist()
    prob, repaired = decide(similarity, **rule)
    form = TRANSPLANTS.get(transplant)
    modules: dict[str, LoraFactors] = {}
    decisions, changes = [], []
    for i, name in enumerate(names):
        ft, pair = wide[name], masks.pair(name)
        if repaired[i]:
            source = (fill or reference).modules[name]
            A, B = _transplant(form, transplant, source, finetuned.modules[name], ft, pair)
            modules[name] = LoraFactors(A=A, B=B, scale=ft.scale)
            known = None
            if fill is None:       # the similarity compared what is transplanted: its sums may give the change
                known = change_from_masked_sums(transplant, *sum_rows[i])
                if masked_reference is not None and name in masked_reference:
                    source = masked_reference[name]
            changes.append(_ModuleChange(ft, *pair, source=source, output=modules[name], change=known))
        else:
            modules[name] = finetuned.modules[name]       # as it came, in its own dtype
            changes.append(_ModuleChange(ft, *pair))
        layer, kind = layer_and_kind(name)
        decisions.append(ModuleDecision(name, layer, kind, float(similarity[i]), float(prob[i]),
                                        bool(repaired[i])))
    settings = {"select": rule["select"], "transplant": transplant, "threshold": rule["threshold"],
                "p_base": rule["p_base"], "epsilon": rule["epsilon"], "seed": rule["seed"],
                "median_origin_cosine": origin, "masks": dict(masks.metadata),
                **({"fill": fill.source or "(in memory)"} if fill is not None else {})}
    adapter = finetuned.with_modules(modules, keep_dtype=True)
    return RealignResult(decisions, settings, adapter=adapter, notes=_same_as_reference_note(reference, finetuned),
                         change=summarize_change(decisions, _entry_changes(transplant, changes)))


def _transplant(form, transplant: str, source: LoraFactors, stored: LoraFactors, wide: LoraFactors,
                pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's transplant. A fine-tune stored in bf16/fp16 with a built-in form is transplanted in
    its own dtype, the source rounded to it first: the same values as transplanting in float32 and
    rounding the output (:data:`~nlsr.method.transplant.SELECTING_FORMS`), without writing the
    rank-2r/3r factors in float32 only to narrow them for the file."""
    narrow = stored.A.dtype
    if transplant in SELECTING_FORMS and narrow in (torch.bfloat16, torch.float16) and stored.B.dtype == narrow:
        return form(source.A.to(narrow), source.B.to(narrow), stored.A, stored.B, *pair)
    return form(source.A, source.B, wide.A, wide.B, *pair)


def masked_reference_of(reference: LoraAdapter, masks: SafetyMasks) -> dict[str, MaskedFactors]:
    """The reference's masked factors per module (:class:`MaskedFactors`), made once for many repairs
    against it (``realign(..., masked_reference=...)``: the same numbers as made per repair)."""
    names = [n for n, _ in reference if weight_key(n, "A") in masks.masks and weight_key(n, "B") in masks.masks]
    sides = mask_reference([(reference.modules[n].A, reference.modules[n].B, *masks.pair(n)) for n in names])
    return dict(zip(names, sides, strict=True))


def _widened(f: LoraFactors) -> LoraFactors:
    """``f`` with each factor narrower than float32 widened to float32 (bf16/fp16 fine-tunes are
    loaded as stored)."""
    def wide(t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    A, B = wide(f.A), wide(f.B)
    return f if A is f.A and B is f.B else LoraFactors(A=A, B=B, scale=f.scale)


def _scaled(f: LoraFactors) -> LowRank:
    """``(s B, A)``, computed in float32 for narrower factors (a bf16 fine-tune loaded as stored)."""
    wide = _widened(f)
    return f.scale * wide.B, wide.A


def reference_updates(reference: LoraAdapter, finetuned: LoraAdapter,
                      rebase: LoraAdapter | None = None,
                      check_base: bool = True) -> tuple[dict[str, LowRank], str, bool]:
    """The reference's update per module measured from the fine-tune's base, what was done (a
    line to print), and whether an adapter was subtracted.

    * ``rebase`` given (the adapter merged into the fine-tune's base, e.g. the aligned adapter
      when the fine-tune is a fresh LoRA on ``W_0 + ΔW_a``): ``ΔW_ref - ΔW_rebase``.
    * Otherwise, when the fine-tune's recorded base is a model directory whose ``nlsr_merged.json``
      says it is the reference's base with an adapter merged in (:func:`nlsr.weights.model_dirs.merge_adapter`),
      that adapter is subtracted (it must still be at the recorded path, with the recorded fingerprint).
    * Otherwise both must name the same base (``check_base``), and the updates are used as they are.
    """
    ref_base, ft_base = reference.base_model, finetuned.base_model
    how = "given as --rebase"
    if rebase is None:
        record = merged_record(ft_base)
        if record and ref_base and same_base(str(record.get("base")), ref_base):
            path = record.get("adapter")
            if not path or not Path(path).is_dir():
                raise NlsrError(f"the fine-tuned adapter's base '{ft_base}' is '{record.get('base')}' with "
                                f"the adapter '{path}' merged in (its {MERGED_INFO}), but that adapter "
                                "is not at hand; pass it as --rebase ADAPTER")
            rebase = load_adapter(path)
            if record.get("adapter_fingerprint", {}).get("content") != fingerprint(rebase)["content"]:
                raise NlsrError(f"the adapter '{path}' has changed since it was merged into '{ft_base}' "
                                f"(its fingerprint differs from {MERGED_INFO}); pass the merged adapter "
                                "as --rebase ADAPTER")
            how = f"recorded in {Path(ft_base) / MERGED_INFO}"
    if rebase is not None:
        if check_base and rebase.base_model and ref_base and not same_base(rebase.base_model, ref_base):
            raise NlsrError(f"the --rebase adapter is on base '{rebase.base_model}' but the reference on "
                            f"'{ref_base}'; the merged adapter must be on the reference's base "
                            "(pass --allow-base-mismatch if they are the same model under two names)")
        updates = {}
        for name, f in reference:
            g = rebase.modules.get(name)
            if g is None:
                raise NlsrError(f"module '{name}' of the reference is not in the rebase adapter "
                                f"'{rebase.source}'; give the adapter that was merged into the "
                                "fine-tune's base")
            if (g.B.shape[0], g.A.shape[1]) != (f.B.shape[0], f.A.shape[1]):
                raise NlsrError(f"module '{name}' is {g.B.shape[0]}x{g.A.shape[1]} in the rebase adapter "
                                f"but {f.B.shape[0]}x{f.A.shape[1]} in the reference")
            updates[name] = subtract_lowrank(_scaled(f), _scaled(g))
        note = (f"the fine-tune sits on '{ft_base}' = the reference's base '{ref_base}' + the adapter "
                f"'{rebase.source}' ({how}); the reference's update was taken relative to it, "
                "ΔW_ref - ΔW_merged (for an ExPO reference of that adapter: β ΔW_a)")
        return updates, note, True
    if check_base and ref_base and ft_base and not same_base(ref_base, ft_base):
        raise NlsrError(f"the reference adapter is on base '{ref_base}' but the fine-tuned adapter on "
                        f"'{ft_base}'; both updates must be measured from the same weights: pass "
                        "--rebase ADAPTER if the fine-tune's base is the reference's base with ADAPTER "
                        "(e.g. the aligned adapter) merged in, or --allow-base-mismatch if they are the "
                        "same model under two names")
    if ref_base and ft_base:
        note = f"both adapters are on base '{ft_base}'; their updates were compared as they are"
    else:
        note = ("an adapter does not record its base model; assumed the same base for both, updates "
                "compared as they are")
    return {name: _scaled(f) for name, f in reference}, note, False


def _realign_rows(reference: LoraAdapter, finetuned: LoraAdapter, masks: SafetyMasks, rule: dict,
                  rebase: LoraAdapter | None, check_base: bool, allow_mask_mismatch: bool) -> RealignResult:
    """Neuron granularity of :func:`realign`: the repaired modules have rank ``r_ref + r_ft`` and keep
    the fine-tune's scale via ``rank_pattern``/``alpha_pattern``."""
    check_same_modules(reference, finetuned)
    # (with allow_mask_mismatch the fingerprint is not compared: not computed either)
    check_neuron_masks(masks, {n: f.B.shape[0] for n, f in reference},
                       {} if allow_mask_mismatch else fingerprint(reference),
                       f"'{reference.source}'" if reference.source else "(in memory)", allow_mask_mismatch)
    updates, note, rebased = reference_updates(reference, finetuned, rebase=rebase, check_base=check_base)
    names = list(finetuned.modules)
    rows = {n: masks.masks[neuron_key(n)] for n in names}
    similarity = row_masked_similarities(
        [(updates[n], _scaled(finetuned.modules[n]), rows[n]) for n in names])
    prob, repaired = decide(similarity, **rule)
    modules, decisions, replaced = {}, [], 0
    for i, name in enumerate(names):
        ft = finetuned.modules[name]
        if repaired[i]:
            A, B = row_transplant_lowrank(updates[name], _scaled(ft), rows[name], ft.scale)
            modules[name] = LoraFactors(A=A, B=B, scale=ft.scale)
            replaced += int(rows[name].sum())
        else:
            modules[name] = ft
        layer, kind = layer_and_kind(name)
        decisions.append(ModuleDecision(name, layer, kind, float(similarity[i]), float(prob[i]),
                                        bool(repaired[i])))
    settings = {"granularity": NEURON, "input": "adapters", **rule, "rows_replaced": replaced,
                "reference_ranks": sorted({r.rank for _, r in reference}),
                "finetuned_ranks": sorted({f.rank for _, f in finetuned}),
                "rebased": rebased, "masks": dict(masks.metadata)}
    adapter = finetuned.with_modules(modules, keep_dtype=True)
    notes = [note, *_same_as_reference_note(reference, finetuned)]
    return RealignResult(decisions, settings, adapter=adapter, notes=notes,
                         change=change_summary(decisions, finetuned, adapter))


def realign_model_dir(reference: ModelDir, finetuned: ModelDir, base: ModelDir,
                          masks: SafetyMasks, out: str | os.PathLike, select: str = "paper",
                          threshold: float | None = None, p_base: float = 0.5, epsilon: float = 0.2,
                          seed: int = 0, check_base: bool = True, allow_mask_mismatch: bool = False,
                          force: bool = False) -> RealignResult:
    """Repair a full fine-tune (a model directory) at neuron granularity, writing a model directory.

    Updates are measured from ``base``: ``ΔW_ref = W_ref - W_base``, ``ΔW_ft = W_ft - W_base``.
    For the modules the rule picks, the masked rows of ``W_ft`` become ``W_ref``'s rows (so
    ``ΔW''[i] = ΔW_ref[i]``); every other tensor, row, file and header is the fine-tune's bit for
    bit. Two passes over the masked modules, one block of rows at a time: similarity (and the
    reference's fingerprint, checked against the masks before anything is written), then the edit.
    ``realign_report.json`` is written into ``out``.
    """
    names = sorted((module_of(k) for k in masks.masks), key=natural_key)
    weights = [neuron_key(n) for n in names]
    for model, label in ((reference, "reference"), (base, "base")):
        missing = [w for w in weights if w not in model]
        if missing:
            raise NlsrError(f"the masks name {len(missing)} weights that the {label} model '{model.path}' "
                            f"lacks (e.g. '{missing[0]}'); identify neuron masks on this reference "
                            "(`nlsr identify --granularity neuron --reference DIR --base DIR ...`)")
    check_same_tensors(reference, finetuned, weights, ("reference", "fine-tuned"))
    check_same_tensors(reference, base, weights, ("reference", "base"))
    label = f"'{reference.path}'"
    rows_by_module = {n: reference.shape(neuron_key(n))[0] for n in names}
    notes = []
    if check_base:
        change_ft = check_derived_from(finetuned, base, weights, "fine-tuned")
        change_ref = check_derived_from(reference, base, weights, "reference")
        notes.append(f"updates measured from --base '{base.path}' (median relative change: fine-tune "
                     f"{change_ft:.4f}, reference {change_ref:.4f})")
    else:
        notes.append(f"updates measured from --base '{base.path}' (not checked: --allow-base-mismatch)")
    check_neuron_masks(masks, rows_by_module, model_fingerprint(reference, names), label,
                       allow_mask_mismatch)
    sims = []
    for name in names:
        key, m = neuron_key(name), masks.masks[neuron_key(name)]
        total = torch.zeros(3, dtype=torch.float64)
        for (start, r), (_, f), (_, b) in zip(reference.row_blocks(key), finetuned.row_blocks(key),
                                             base.row_blocks(key), strict=True):
            rows = m[start:start + r.shape[0]]
            if rows.any():
                b64 = b.to(torch.float64)
                total += dense_row_sums(r.to(torch.float64) - b64, f.to(torch.float64) - b64, rows)
        sims.append(cosine_of_sums(total))
    similarity = torch.tensor(sims, dtype=torch.float64)
    prob, repaired = decide(similarity, select=select, threshold=threshold, p_base=p_base, epsilon=epsilon,
                            seed=seed)
    decisions, replaced = [], 0
    for i, name in enumerate(names):
        layer, kind = layer_and_kind(name)
        decisions.append(ModuleDecision(name, layer, kind, float(similarity[i]), float(prob[i]),
                                        bool(repaired[i])))
        replaced += int(masks.masks[neuron_key(name)].sum()) if repaired[i] else 0

    def edit(key: str):
        m = masks.masks[key]
        for (start, r), (_, f) in zip(reference.row_blocks(key), finetuned.row_blocks(key), strict=True):
            yield start, row_transplant_dense(r, f, m[start:start + r.shape[0]])

    dtypes = {str(reference.infos[w].dtype) for w in weights} | {str(finetuned.infos[w].dtype) for w in weights}
    if len(dtypes) > 1:
        notes.append(f"dtypes differ ({', '.join(sorted(dtypes))}): reference rows were cast to the "
                     "fine-tune's dtype")
    settings = {"granularity": NEURON, "input": "model directories", "select": select,
                "threshold": threshold, "p_base": p_base, "epsilon": epsilon, "seed": seed,
                "rows_replaced": replaced, "reference": portable_path(reference.path),
                "finetuned": portable_path(finetuned.path), "base": portable_path(base.path),
                "masks": dict(masks.metadata)}
    result = RealignResult(decisions, settings, out=Path(out), notes=notes)
    report = json.dumps(result.report(), indent=2) + "\n"
    write_edited(finetuned, out, {neuron_key(d.module): edit for d in decisions if d.repaired},
                 force=force, extra_files={"realign_report.json": report.encode()})
    return result

