"""Steps 3-4 at neuron granularity: repair any fine-tune of the reference's base, row by row.

For a repaired module the reference's safety rows replace the fine-tune's,
``ΔW''[i] = ΔW_ref[i]`` for masked ``i`` and ``ΔW_ft[i]`` otherwise (:mod:`nlsr.method.transplant_rows`).
Module similarity ``S_j = cos(diag(m) ΔW_ref, diag(m) ΔW_ft)`` feeds the same selection rules
as the entry granularity (:data:`nlsr.method.select.SELECTION_RULES`).

* Adapters (:func:`realign_neuron_adapters`): the fine-tune may be a LoRA of any rank and
  initialisation on the same modules; the repaired module is a LoRA of rank ``r_ref + r_ft``.
  Both updates must be measured from the same weights: when the fine-tune sits on the reference's
  base with another adapter merged in (a fresh LoRA on the merged aligned model ``W_0 + ΔW_a``,
  while the ExPO reference ``(1+β) ΔW_a`` sits on ``W_0``), the reference is taken relative to the
  fine-tune's base, ``ΔW_ref - ΔW_a`` (``= β ΔW_a``); see :func:`reference_updates`.
* Model directories (:func:`realign_neuron_models`): full fine-tunes; masked rows of a repaired
  module's weight are copied from the reference model, everything else is the fine-tune's bit for
  bit, and memory is bounded by a block of rows.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from nlsr.errors import NlsrError
from nlsr.method.identify import SafetyMasks, masks_fingerprint
from nlsr.method.identify_rows import NEURON, granularity_of, neuron_key
from nlsr.method.realign import ModuleDecision, layer_and_kind
from nlsr.method.select import SELECTION_RULES
from nlsr.method.transplant_rows import (
    LowRank,
    cosine_of_sums,
    dense_row_sums,
    row_masked_similarities,
    row_transplant_dense,
    row_transplant_lowrank,
    subtract_lowrank,
)
from nlsr.paths import portable_path
from nlsr.weights.adapters import (
    LoraAdapter,
    LoraFactors,
    describe_fingerprint,
    fingerprint,
    load_adapter,
    natural_key,
    same_base,
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


@dataclass
class NeuronRealignResult:
    """The repaired adapter (adapters) or output directory (model directories), the decision per
    module and the settings; :meth:`report` has the layout of the entry granularity's report."""

    decisions: list[ModuleDecision]
    settings: dict
    adapter: LoraAdapter | None = None
    out: Path | None = None
    notes: list[str] = field(default_factory=list)

    def report(self) -> dict:
        repaired = [d for d in self.decisions if d.repaired]
        return {"settings": {**self.settings, "notes": self.notes},
                "summary": {"modules": len(self.decisions), "repaired": len(repaired),
                            "rows_replaced": self.settings.get("rows_replaced"),
                            "mean_similarity": statistics.fmean(d.similarity for d in self.decisions)},
                "modules": [asdict(d) for d in self.decisions]}


# ---- checks ---------------------------------------------------------------------------------

def _few(names: list[str], count: int = 3) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:count])
    return shown + (f" and {len(names) - count} more" if len(names) > count else "")


def check_neuron_masks(masks: SafetyMasks, rows_by_module: dict[str, int], actual_fingerprint: dict,
                       reference_label: str, allow_mismatch: bool = False) -> None:
    """Refuse masks that are not neuron masks of this reference.

    ``rows_by_module``: the reference's modules and their ``d_out``. Masks at entry granularity,
    missing or extra modules, row counts that differ and (unless ``allow_mismatch``) a recorded
    reference fingerprint that differs from ``actual_fingerprint`` are errors.
    """
    src = f"'{masks.source}'" if masks.source else "(in memory)"
    fix = f"identify neuron masks for it (`nlsr identify --granularity neuron --reference {reference_label} ...`)"
    if granularity_of(masks) != NEURON:
        raise NlsrError(f"the masks {src} were made at {granularity_of(masks)} granularity (one mask "
                        "per LoRA factor entry), but --granularity neuron needs one mask per weight "
                        f"row: {fix}, or realign with --granularity entry")
    mask_modules = [module_of(k) for k in masks.masks]
    missing = [n for n in rows_by_module if neuron_key(n) not in masks.masks]
    extra = [n for n in mask_modules if n not in rows_by_module]
    if missing or (extra and not allow_mismatch):
        parts = []
        if missing:
            parts.append(f"{len(missing)} reference modules have no masks ({_few(missing)})")
        if extra and not allow_mismatch:
            parts.append(f"{len(extra)} masked modules are not in the reference ({_few(extra)})")
        raise NlsrError(f"the masks {src} do not match the reference {reference_label}: "
                        f"{'; '.join(parts)}; {fix}")
    for name, d_out in rows_by_module.items():
        mask = masks.masks[neuron_key(name)]
        if mask.shape != (d_out,):
            raise NlsrError(f"mask '{neuron_key(name)}' in {src} has shape {tuple(mask.shape)} but the "
                            f"module has {d_out} rows in the reference {reference_label}; {fix}")
    if allow_mismatch:
        return
    recorded = masks_fingerprint(masks)
    if recorded is None:
        if masks.source is not None:
            raise NlsrError(f"the masks {src} do not record which reference they were made from; "
                            f"{fix}, or pass --allow-mask-mismatch")
        return
    if any(recorded.get(k) != actual_fingerprint.get(k) for k in ("layout", "content")):
        raise NlsrError(f"the masks {src} were identified on another reference "
                        f"({describe_fingerprint(recorded)}) than {reference_label} "
                        f"({describe_fingerprint(actual_fingerprint)}); {fix}, or pass "
                        "--allow-mask-mismatch to use them anyway")


def check_same_modules(reference: LoraAdapter, finetuned: LoraAdapter) -> None:
    """Both adapters adapt the same modules with the same ``d_out x d_in`` (ranks may differ)."""
    for x, y, xn, yn in ((reference, finetuned, "reference", "fine-tuned"),
                         (finetuned, reference, "fine-tuned", "reference")):
        missing = [m for m in x.modules if m not in y.modules]
        if missing:
            raise NlsrError(f"module '{missing[0]}' is in the {xn} adapter but not in the {yn} adapter "
                            f"({len(missing)} such modules); at neuron granularity both adapters must "
                            "adapt the same modules of the same base model (retrain the fine-tune with "
                            "the reference's target modules, or identify a reference on them)")
    for name, r in reference:
        f = finetuned.modules[name]
        shape_r, shape_f = (r.B.shape[0], r.A.shape[1]), (f.B.shape[0], f.A.shape[1])
        if shape_r != shape_f:
            raise NlsrError(f"module '{name}' is {shape_r[0]}x{shape_r[1]} in the reference adapter but "
                            f"{shape_f[0]}x{shape_f[1]} in the fine-tuned adapter; the two adapters "
                            "belong to different base models: repair a fine-tune of the reference's base")


# ---- bases ----------------------------------------------------------------------------------

def _scaled(f: LoraFactors) -> LowRank:
    return f.scale * f.B, f.A


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


# ---- adapters -------------------------------------------------------------------------------

def _decide(names: list[str], similarity: torch.Tensor, select: str, threshold: float | None,
            p_base: float, epsilon: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if select not in SELECTION_RULES:
        raise NlsrError(f"unknown selection rule '{select}'; use one of {sorted(SELECTION_RULES)}")
    if select == "threshold" and threshold is None:
        raise NlsrError("the 'threshold' rule needs --threshold T (repair modules with S < T)")
    if not (p_base - epsilon >= 0 and p_base + epsilon <= 1):
        raise NlsrError(f"p_base ± epsilon must stay in [0, 1] (got {p_base} ± {epsilon})")
    return SELECTION_RULES[select](similarity, p_base=p_base, epsilon=epsilon, seed=seed,
                                   threshold=threshold)


def realign_neuron_adapters(reference: LoraAdapter, finetuned: LoraAdapter, masks: SafetyMasks,
                            select: str = "paper", threshold: float | None = None,
                            p_base: float = 0.5, epsilon: float = 0.2, seed: int = 0,
                            rebase: LoraAdapter | None = None, check_base: bool = True,
                            allow_mask_mismatch: bool = False) -> NeuronRealignResult:
    """Repair a LoRA fine-tune of any rank/initialisation at neuron granularity.

    Args:
        reference: the reference adapter (e.g. ExPO of the aligned adapter) the masks belong to.
        finetuned: the fine-tuned adapter, on the same modules of the same base (see ``rebase``).
        masks: neuron masks of ``reference`` (:func:`nlsr.method.identify_rows.identify_neurons`).
        select, threshold, p_base, epsilon, seed: the module selection rule and its parameters.
        rebase: the adapter merged into the fine-tune's base (see :func:`reference_updates`).
    Returns:
        The repaired adapter (the fine-tune's config; repaired modules have rank ``r_ref + r_ft``
        and keep the fine-tune's scale via ``rank_pattern``/``alpha_pattern``), decisions, settings.
    """
    check_same_modules(reference, finetuned)
    check_neuron_masks(masks, {n: f.B.shape[0] for n, f in reference}, fingerprint(reference),
                       f"'{reference.source}'" if reference.source else "(in memory)", allow_mask_mismatch)
    updates, note, rebased = reference_updates(reference, finetuned, rebase=rebase, check_base=check_base)
    names = list(finetuned.modules)
    rows = {n: masks.masks[neuron_key(n)] for n in names}
    similarity = row_masked_similarities(
        [(updates[n], _scaled(finetuned.modules[n]), rows[n]) for n in names])
    prob, repaired = _decide(names, similarity, select, threshold, p_base, epsilon, seed)
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
    settings = {"granularity": NEURON, "input": "adapters", "select": select, "threshold": threshold,
                "p_base": p_base, "epsilon": epsilon, "seed": seed, "rows_replaced": replaced,
                "reference_ranks": sorted({r.rank for _, r in reference}),
                "finetuned_ranks": sorted({f.rank for _, f in finetuned}),
                "rebased": rebased, "masks": dict(masks.metadata)}
    return NeuronRealignResult(decisions, settings, adapter=finetuned.with_modules(modules), notes=[note])


# ---- model directories ----------------------------------------------------------------------

def realign_neuron_models(reference: ModelDir, finetuned: ModelDir, base: ModelDir,
                          masks: SafetyMasks, out: str | os.PathLike, select: str = "paper",
                          threshold: float | None = None, p_base: float = 0.5, epsilon: float = 0.2,
                          seed: int = 0, check_base: bool = True, allow_mask_mismatch: bool = False,
                          force: bool = False) -> NeuronRealignResult:
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
    prob, repaired = _decide(names, similarity, select, threshold, p_base, epsilon, seed)
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
    result = NeuronRealignResult(decisions, settings, out=Path(out), notes=notes)
    report = json.dumps(result.report(), indent=2) + "\n"
    write_edited(finetuned, out, {neuron_key(d.module): edit for d in decisions if d.repaired},
                 force=force, extra_files={"realign_report.json": report.encode()})
    return result
