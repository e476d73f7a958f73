"""Step 2: safety-critical masks of a reference, from one streaming calibration pass.

One entry point, :func:`identify`, for a reference adapter at either granularity (``entry``: the
paper's masks over the LoRA factors; ``neuron``: masks over output rows, for fine-tunes that do not
continue the aligned adapter), and :func:`identify_model_dir` for a reference given as a full model
directory (rows only). The pass is :mod:`nlsr.method.activations`; the math :mod:`nlsr.method.projection`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch

from nlsr.errors import NlsrError
from nlsr.method import DEFAULT_Q
from nlsr.method.activations import accumulate_grams, accumulate_input_covariances
from nlsr.method.calibration import CalibrationRow
from nlsr.method.masks import ENTRY, GRANULARITIES, MASKS_FORMAT, NEURON, SafetyMasks, neuron_key, provenance
from nlsr.method.projection import (
    InputCovariance,
    activation_subspace,
    row_scores_dense,
    row_scores_lowrank,
    safety_masks,
    top_rows,
)
from nlsr.paths import portable_path
from nlsr.weights.adapters import LoraAdapter, attach_adapter, weight_key
from nlsr.weights.model_dirs import ModelDir, check_derived_from, model_fingerprint, module_of


def identify(model, reference: LoraAdapter, rows: Sequence[CalibrationRow], tokenizer, *,
             granularity: str = ENTRY, rho: float = 0.8, q: float = DEFAULT_Q, batch_size: int = 8,
             max_length: int = 1024, progress: bool = True, template: str | None = None,
             metadata: Mapping[str, object] | None = None,
             dtype: torch.dtype = torch.float32) -> SafetyMasks:
    """Safety-critical masks of the reference adapter (NLSR step 2), at either granularity.

    ``granularity="entry"`` (the paper): masks over the entries of ``A_e`` and ``B_e`` from the Gram
    matrix of ``A_e``'s outputs (:func:`nlsr.method.projection.safety_masks`); they apply to a
    fine-tune that continued the aligned adapter. ``granularity="neuron"``: masks over the output rows
    of every adapted module, scored by ``s ||B_e[i] A_e U_k||`` with ``U_k`` from the covariance of
    the module's inputs; they apply to any fine-tune of the same base.

    The masks' metadata records their :func:`~nlsr.method.masks.provenance`: the granularity, the
    reference's fingerprint, the base model (``model.name_or_path``), ρ, q, the template, the
    calibration size and response tokens; ``metadata`` adds or overrides fields (``beta``, ...).

    Args:
        model: the weak aligned model ``W_0`` (a transformers causal LM); the reference adapter is
            attached for the pass and removed afterwards.
        reference: the super-aligned reference adapter ``(A_e, B_e)``.
        rows: safety calibration rows (harmful prompt, safe response).
        tokenizer: the model's tokenizer.
        granularity: ``entry`` or ``neuron``.
        rho: rank ratio of the kept subspace, ``k = ceil(ρ r)``. q: fraction kept per matrix (rows).
        template: "alpaca" or "chat" (default: alpaca, the paper's and the pipeline's).
        dtype: precision of the neuron granularity's covariance accumulators.
    """
    if granularity not in GRANULARITIES:
        raise NlsrError(f"unknown granularity '{granularity}'; use one of {', '.join(GRANULARITIES)}")
    _check_fractions(rho, q, rows)
    if batch_size < 1 or max_length < 1:
        raise NlsrError(f"batch size and max length must be >= 1 (got {batch_size}, {max_length})")
    from nlsr.method.calibration import resolve_template

    template = resolve_template(tokenizer, template)
    pass_args = {"batch_size": batch_size, "max_length": max_length, "progress": progress, "template": template}
    if granularity == NEURON:
        return _identify_rows(model, reference, rows, tokenizer, rho, q, pass_args, metadata, dtype)
    stats: dict = {}
    grams, tokens = accumulate_grams(model, reference, rows, tokenizer, stats=stats, **pass_args)
    masks: dict[str, torch.Tensor] = {}
    for name, f in reference:
        m_a, m_b = safety_masks(f.A, f.B, grams[name].gram.cpu(), rho=rho, q=q)
        masks[weight_key(name, "A")] = m_a
        masks[weight_key(name, "B")] = m_b
    fields = {"base": getattr(model, "name_or_path", None) or None, "rank_ratio": rho,
              "keep_fraction": q, "template": template, "calibration_rows": len(rows),
              "response_tokens": tokens, "calibration_tokens": stats.get("calibration_tokens"),
              **(metadata or {})}
    return SafetyMasks(masks=masks, metadata=provenance(reference, **fields))


def _subspaces(covs: Mapping[str, InputCovariance], rho: float) -> dict[str, torch.Tensor]:
    return {name: activation_subspace(acc.cov.cpu(), rho) for name, acc in covs.items()}


def _common_metadata(rho: float, q: float, template: str, rows: int, tokens: int,
                     stats: dict, owner: Mapping[str, str]) -> dict[str, object]:
    return {"granularity": NEURON, "rank_ratio": rho, "keep_fraction": q, "template": template,
            "calibration_rows": rows, "response_tokens": tokens,
            "calibration_tokens": stats.get("calibration_tokens"),
            "input_covariances": len(set(owner.values()))}


def _identify_rows(model, reference: LoraAdapter, rows: Sequence[CalibrationRow], tokenizer, rho: float,
                   q: float, pass_args: dict, metadata: Mapping[str, object] | None,
                   dtype: torch.dtype) -> SafetyMasks:
    """Neuron granularity of :func:`identify`: row masks keyed ``<module>.weight`` (bool, ``d_out``)."""
    template = pass_args["template"]
    if any(p.device.type == "meta" for p in model.parameters()):
        raise NlsrError("neuron granularity does not run on a model with offloaded layers yet; load "
                        "it on one device (drop --device-map / --max-memory / --offload-folder)")
    peft_model = attach_adapter(model, reference, adapter_name="nlsr_reference")
    try:
        modules = dict(peft_model.named_modules())
        compute_dtype = next(model.parameters()).dtype
        targets = {}
        for name, _f in reference:
            layer = modules[f"base_model.model.{name}"]
            if compute_dtype != torch.float32:  # run the reference in the model's precision
                layer.lora_A["nlsr_reference"].to(compute_dtype)
                layer.lora_B["nlsr_reference"].to(compute_dtype)
            targets[name] = layer
        stats: dict = {}
        covs, owner, tokens = accumulate_input_covariances(peft_model, targets, rows, tokenizer, dtype=dtype,
                                                           stats=stats, **pass_args)
    finally:
        peft_model.unload()
    bases = _subspaces(covs, rho)
    masks = {}
    for name, f in reference:
        scores = row_scores_lowrank(f.scale * f.B, f.A, bases[owner[name]])
        masks[neuron_key(name)] = top_rows(scores, q)
    fields = {"base": getattr(model, "name_or_path", None) or None, "reference_kind": "adapter",
              **_common_metadata(rho, q, template, len(rows), tokens, stats, owner), **(metadata or {})}
    return SafetyMasks(masks=masks, metadata=provenance(reference, **fields))


def identify_model_dir(reference_model, reference: ModelDir, base: ModelDir,
                           rows: Sequence[CalibrationRow], tokenizer, rho: float = 0.8,
                           q: float = DEFAULT_Q, batch_size: int = 8, max_length: int = 1024,
                           progress: bool = True, template: str | None = None,
                           metadata: Mapping[str, object] | None = None,
                           dtype: torch.dtype = torch.float32, check_base: bool = True) -> SafetyMasks:
    """Safety neurons of a reference given as a model directory (e.g. ``nlsr extrapolate`` on
    model directories), with the update ``W_ref - W_base`` measured from ``base``.

    ``reference_model`` is the loaded reference (the model the calibration pass runs). The modules
    are the decoder layers' 2-D weights that differ between ``reference`` and ``base``; their rows
    are scored by ``||(W_ref - W_base)[i] U_k||`` block by block (memory: a block of rows).
    """
    _check_fractions(rho, q, rows)
    from nlsr.method.calibration import resolve_template
    from nlsr.weights.model_dirs import _changed, check_same_tensors

    template = resolve_template(tokenizer, template)
    weights = reference.layer_linear_weights()
    check_same_tensors(reference, base, weights, ("reference", "base"))
    changed = [w for w in weights if _changed(reference, base, w)]
    if not changed:
        raise NlsrError(f"the reference model '{reference.path}' equals --base '{base.path}' in every "
                        "layer weight; give the reference (e.g. from `nlsr extrapolate`) and the model "
                        "its update is measured from")
    if check_base:
        check_derived_from(reference, base, changed, "reference")
    names = [module_of(w) for w in changed]
    modules = dict(reference_model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), torch.nn.Linear)]
    if missing:
        raise NlsrError(f"'{missing[0]}' is a weight of '{reference.path}' but not a linear layer of the "
                        "loaded model; is the directory a transformers causal LM?")
    stats: dict = {}
    covs, owner, tokens = accumulate_input_covariances(
        reference_model, {n: modules[n] for n in names}, rows, tokenizer, batch_size=batch_size,
        max_length=max_length, template=template, progress=progress, dtype=dtype, stats=stats)
    bases = _subspaces(covs, rho)
    masks = {}
    for name in names:
        key = neuron_key(name)
        parts = [row_scores_dense(r.to(torch.float64) - b.to(torch.float64), bases[owner[name]])
                 for (_, r), (_, b) in zip(reference.row_blocks(key), base.row_blocks(key), strict=True)]
        masks[key] = top_rows(torch.cat(parts), q)
    meta = {"nlsr_masks_format": MASKS_FORMAT,
            "reference_fingerprint": json.dumps(model_fingerprint(reference, names), sort_keys=True),
            "reference": portable_path(reference.path), "reference_kind": "model", "base": portable_path(base.path),
            **_common_metadata(rho, q, template, len(rows), tokens, stats, owner), **(metadata or {})}
    return SafetyMasks(masks=masks, metadata={k: str(v) for k, v in meta.items() if v is not None})


def _check_fractions(rho: float, q: float, rows: Sequence) -> None:
    if not 0 < rho <= 1:
        raise NlsrError(f"rank ratio must be in (0, 1] (got {rho})")
    if not 0 < q <= 1:
        raise NlsrError(f"keep fraction q must be in (0, 1] (got {q})")
    if not rows:
        raise NlsrError("no calibration rows given")

