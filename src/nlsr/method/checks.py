"""Refusals before a repair: masks that belong to another reference or granularity, adapters
that do not share an origin (entries) or modules (rows). Each error names the fix.
"""
from __future__ import annotations

import statistics

from nlsr.errors import NlsrError
from nlsr.method.masks import NEURON, SafetyMasks, granularity_of, masks_fingerprint, neuron_key
from nlsr.method.similarity import (
    flat_cosines,
)
from nlsr.weights.adapters import (
    LoraAdapter,
    describe_fingerprint,
    fingerprint,
    weight_key,
)
from nlsr.weights.model_dirs import (
    module_of,
)


def _few(names: list[str], count: int = 3) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:count])
    return shown + (f" and {len(names) - count} more" if len(names) > count else "")


def check_entry_granularity(masks: SafetyMasks) -> None:
    """Refuse masks made at another granularity (neuron masks: one bool per weight row)."""
    granularity = masks.metadata.get("granularity", "entry")
    if granularity != "entry":
        src = f"'{masks.source}'" if masks.source else "(in memory)"
        raise NlsrError(f"the masks {src} were made at {granularity} granularity (one mask per weight "
                        "row), but entry granularity needs masks of the LoRA factor entries: realign "
                        "with --granularity neuron, or identify entry masks (`nlsr identify` without "
                        "--granularity neuron)")


def check_masks(masks: SafetyMasks, reference: LoraAdapter, allow_mismatch: bool = False) -> None:
    """Refuse masks that do not belong to ``reference``.

    * Every module of the reference needs bool masks of its factors' shapes (always).
    * Masks of modules the reference lacks are an error, not silently dropped (``allow_mismatch``:
      the matching subset is used).
    * The reference fingerprint recorded in the masks (see :func:`nlsr.method.identify.provenance`)
      must equal the reference's (``allow_mismatch``: accepted anyway).
    * A masks *file* that records no fingerprint (written before nlsr recorded one) is refused
      unless ``allow_mismatch``; masks built in memory without metadata are taken as given.
    """
    from nlsr.method.masks import masks_fingerprint
    from nlsr.weights.adapters import describe_fingerprint, module_name

    src = f"'{masks.source}'" if masks.source else "(in memory)"
    ref_name = f"'{reference.source}'" if reference.source else "(in memory)"
    regenerate = ("identify masks for this reference (`nlsr identify --reference "
                  f"{reference.source or 'REFERENCE'} ...`)")
    check_entry_granularity(masks)
    mask_modules: dict[str, None] = {}
    for key in masks.masks:
        try:
            mask_modules[module_name(key)] = None
        except AssertionError:
            raise NlsrError(f"the masks {src} hold '{key}', which is not a LoRA factor mask; make "
                            "the masks with `nlsr identify`") from None
    missing = [n for n in reference.modules
               if weight_key(n, "A") not in masks.masks or weight_key(n, "B") not in masks.masks]
    extra = [n for n in mask_modules if n not in reference.modules]
    if missing or (extra and not allow_mismatch):
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the reference adapter's {len(reference)} modules have no "
                         f"masks ({_few(missing)})")
        if extra and not allow_mismatch:
            parts.append(f"{len(extra)} masked modules are not in the reference adapter ({_few(extra)})")
        escape = "" if missing else "; or pass --allow-mask-mismatch to use the matching subset"
        raise NlsrError(f"the masks {src} ({len(mask_modules)} modules) do not match the reference "
                        f"adapter {ref_name} ({len(reference)} modules): {'; '.join(parts)}. The "
                        f"masks are never silently subset: {regenerate}{escape}")
    for name, f in reference:
        for factor, tensor in (("A", f.A), ("B", f.B)):
            key = weight_key(name, factor)
            mask = masks.masks[key]
            if mask.shape != tensor.shape:
                raise NlsrError(f"mask '{key}' in {src} has shape {tuple(mask.shape)} but the "
                                f"factor of the reference adapter {ref_name} has {tuple(tensor.shape)}; "
                                f"{regenerate}")
    if allow_mismatch:
        return
    recorded = masks_fingerprint(masks)
    if recorded is None:
        if masks.source is not None:
            raise NlsrError(f"the masks {src} do not record which reference adapter they were made "
                            "from (an older masks file); make them again with `nlsr identify` (in a "
                            "pipeline run: `nlsr run CONFIG --force identify-...`), or pass "
                            "--allow-mask-mismatch if you are sure they belong to the reference "
                            f"adapter {ref_name}")
        return
    actual = fingerprint(reference)
    if any(recorded.get(k) != actual[k] for k in ("layout", "content")):
        made_from = masks.metadata.get("reference")
        same_layout = recorded.get("layout") == actual["layout"]
        raise NlsrError(
            f"the masks {src} were identified on "
            f"{'reference adapter ' + repr(made_from) if made_from else 'another reference adapter'} "
            f"({describe_fingerprint(recorded)}), "
            f"but the given reference adapter {ref_name} is a different one ({describe_fingerprint(actual)}"
            f"{': same modules and shapes, other weights' if same_layout else ''}); {regenerate}, "
            "or pass --allow-mask-mismatch to use them anyway")


def origin_cosines(reference: LoraAdapter, finetuned: LoraAdapter) -> dict[str, float]:
    """Entry-wise cosine of ``A_e`` and ``A_t`` per module: near 1 when the fine-tune continued
    the aligned adapter, near 0 for an independently initialised LoRA."""
    # float32 dot products are accurate enough for a plausibility check and 10x faster.
    names = list(reference.modules)
    cosines = flat_cosines([(reference.modules[n].A, finetuned.modules[n].A) for n in names])
    return dict(zip(names, cosines.tolist(), strict=True))


def check_shared_origin(reference: LoraAdapter, finetuned: LoraAdapter,
                        min_cosine: float) -> float:
    """Refuse the entry-wise comparison when the adapters do not share an origin.

    Entry ``(i, k)`` of ``A_t`` and ``A_e`` is the same neuron only when the fine-tune started
    from the aligned adapter. Returns the median cosine.
    """
    median = statistics.median(origin_cosines(reference, finetuned).values())
    if median < min_cosine:
        raise NlsrError(
            f"the fine-tuned adapter does not continue the aligned one (median cosine of the A "
            f"factors {median:.3f} < {min_cosine}); neuron-level comparison needs the fine-tune to "
            "start from the aligned adapter. For an unrelated adapter compare dense deltas "
            "instead (e.g. `nlsr safelora`), or pass --min-origin-cosine 0 to force it")
    return median



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


def check_template(masks_template: str | None, finetuned_template: str | None, explicit: str | None = None,
                   finetuned_label: str = "the fine-tuned adapter") -> str | None:
    """The template a repaired adapter records: ``explicit`` when given, else the fine-tune's, else the
    masks'. Masks made in another template than the one the fine-tune records are refused unless
    ``explicit`` says which to keep: their neurons were found on other activations."""
    if explicit is not None:
        return explicit
    if masks_template and finetuned_template and masks_template != finetuned_template:
        raise NlsrError(f"the masks were identified with the '{masks_template}' template but {finetuned_label} "
                        f"records '{finetuned_template}'; identify masks in '{finetuned_template}' "
                        f"(`nlsr identify --template {finetuned_template}`), or pass --template to repair anyway "
                        "and record that template")
    return finetuned_template or masks_template
