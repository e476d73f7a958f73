"""Steps 3 and 4 on whole adapters: score every module, pick the ones to repair, transplant."""

from __future__ import annotations

import re
import statistics
from dataclasses import asdict, dataclass

from nlsr.errors import NlsrError
from nlsr.method.identify import SafetyMasks
from nlsr.method.select import SELECTION_RULES, flat_cosines, masked_similarities
from nlsr.method.transplant import TRANSPLANTS
from nlsr.weights.adapters import LoraAdapter, LoraFactors, check_comparable, weight_key

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
    adapter: LoraAdapter
    decisions: list[ModuleDecision]
    settings: dict

    def report(self) -> dict:
        """The JSON-ready report: settings, a summary, and one row per module."""
        repaired = [d for d in self.decisions if d.repaired]
        return {
            "settings": self.settings,
            "summary": {"modules": len(self.decisions), "repaired": len(repaired),
                        "mean_similarity": statistics.fmean(d.similarity for d in self.decisions)},
            "modules": [asdict(d) for d in self.decisions],
        }


def layer_and_kind(module: str) -> tuple[int | None, str]:
    """``('model.layers.3.self_attn.q_proj')`` -> ``(3, 'q_proj')``."""
    match = _LAYER_RE.search(f".{module}.")
    return (int(match.group(1)) if match else None), module.rsplit(".", 1)[-1]


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
    from nlsr.method.identify import masks_fingerprint
    from nlsr.weights.adapters import describe_fingerprint, fingerprint, module_name

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


def realign(reference: LoraAdapter, finetuned: LoraAdapter, masks: SafetyMasks,
            select: str = "paper", transplant: str = "exact", threshold: float | None = None,
            p_base: float = 0.5, epsilon: float = 0.2, seed: int = 0,
            min_origin_cosine: float = 0.5, check_base: bool = True,
            allow_mask_mismatch: bool = False) -> RealignResult:
    """Repair ``finetuned`` towards ``reference`` inside the safety ``masks`` (NLSR steps 3-4).

    Args:
        reference: the super-aligned reference adapter ``(A_e, B_e)``.
        finetuned: the user's fine-tuned adapter ``(A_t, B_t)`` (continued from the aligned one).
        masks: safety-critical masks of the reference (from :func:`nlsr.identify`).
        select: module selection rule: ``paper``, ``reverse``, ``threshold`` or ``all``.
        transplant: ``exact`` (rank 2r, the paper's formula) or ``factor`` (rank r, authors' code).
        threshold: τ for the ``threshold`` rule. p_base, epsilon: ``P_L`` and ε of the
            probabilistic rules. seed: seed of their draw.
        min_origin_cosine: refuse when the median cosine of ``A_e`` and ``A_t`` is below this.
        allow_mask_mismatch: accept masks recorded for another reference, an older masks file
            without a fingerprint, or masks of extra modules (see :func:`check_masks`).

    Returns:
        The repaired adapter, one decision per module, and the settings used.
    """
    if select not in SELECTION_RULES:
        raise NlsrError(f"unknown selection rule '{select}'; use one of {sorted(SELECTION_RULES)}")
    if transplant not in TRANSPLANTS:
        raise NlsrError(f"unknown transplant '{transplant}'; use one of {sorted(TRANSPLANTS)}")
    if select == "threshold" and threshold is None:
        raise NlsrError("the 'threshold' rule needs --threshold T (repair modules with S < T)")
    if not (p_base - epsilon >= 0 and p_base + epsilon <= 1):
        raise NlsrError(f"p_base ± epsilon must stay in [0, 1] (got {p_base} ± {epsilon})")
    check_entry_granularity(masks)
    check_comparable(reference, finetuned, check_base=check_base)
    check_masks(masks, reference, allow_mismatch=allow_mask_mismatch)
    origin = check_shared_origin(reference, finetuned, min_origin_cosine)

    names = list(finetuned.modules)
    # All modules in one call: stacked Gram matrices, shared buffers, one module per worker thread.
    similarity = masked_similarities([
        (reference.modules[n].A, reference.modules[n].B, finetuned.modules[n].A,
         finetuned.modules[n].B, *masks.pair(n)) for n in names])
    prob, repaired = SELECTION_RULES[select](similarity, p_base=p_base, epsilon=epsilon,
                                             seed=seed, threshold=threshold)
    form = TRANSPLANTS[transplant]
    modules: dict[str, LoraFactors] = {}
    decisions = []
    for i, name in enumerate(names):
        ft = finetuned.modules[name]
        if repaired[i]:
            ref = reference.modules[name]
            A, B = form(ref.A, ref.B, ft.A, ft.B, *masks.pair(name))
            modules[name] = LoraFactors(A=A, B=B, scale=ft.scale)
        else:
            modules[name] = ft
        layer, kind = layer_and_kind(name)
        decisions.append(ModuleDecision(name, layer, kind, float(similarity[i]), float(prob[i]),
                                        bool(repaired[i])))
    settings = {"select": select, "transplant": transplant, "threshold": threshold,
                "p_base": p_base, "epsilon": epsilon, "seed": seed,
                "median_origin_cosine": origin, "masks": dict(masks.metadata)}
    return RealignResult(finetuned.with_modules(modules), decisions, settings)
