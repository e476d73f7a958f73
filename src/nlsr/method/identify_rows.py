"""Neuron granularity, step 2 on a real model: one streaming pass, then the safety rows per module.

The reference model runs over the safety calibration rows; a forward pre-hook on every target
module accumulates the covariance ``C = XᵀX`` of its inputs over response tokens (modules that read
the same input, such as q/k/v or gate/up, share one accumulator). :mod:`nlsr.method.projection_rows`
turns each ``C`` and the reference's update into a row mask: the top-q fraction of rows by the norm
of the update projected onto the top ``ρ`` share of ``C``'s eigen-directions.

The reference is either a LoRA adapter on the base model (its update ``s B A``, never formed
densely) or a model directory, whose update is ``W_ref - W_base`` with ``--base`` the model both
updates are measured from. The masks file holds one bool vector of length ``d_out`` per module,
keyed ``<module>.weight``, and records ``granularity=neuron`` with the usual provenance.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import torch

from nlsr.errors import NlsrError
from nlsr.method.calibration import CalibrationRow, make_batches
from nlsr.method.identify import MASKS_FORMAT, SafetyMasks, _progress, provenance
from nlsr.method.projection_rows import (
    InputCovariance,
    activation_subspace,
    row_scores_dense,
    row_scores_lowrank,
    top_rows,
)
from nlsr.paths import portable_path
from nlsr.weights.adapters import LoraAdapter, attach_adapter
from nlsr.weights.model_dirs import ModelDir, check_derived_from, model_fingerprint, module_of

NEURON = "neuron"
ENTRY = "entry"
GRANULARITIES = (ENTRY, NEURON)


def neuron_key(module: str) -> str:
    """The masks-file key of a module's row mask: the name of its weight."""
    return f"{module}.weight"


def granularity_of(masks: SafetyMasks) -> str:
    """``entry`` (one mask entry per LoRA factor entry) or ``neuron`` (one per weight row)."""
    return masks.metadata.get("granularity", ENTRY)


def _body(model, names: Sequence[str]):
    """The transformer body without the LM head, when every target module lives in it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(base, "base_model_prefix", "")
    body = getattr(base, prefix, None) if prefix else None
    if body is not None and body is not base and all(n.startswith(prefix + ".") for n in names):
        return body
    return base


@torch.inference_mode()
def accumulate_input_covariances(model, targets: Mapping[str, torch.nn.Module],
                                 rows: Sequence[CalibrationRow], tokenizer, batch_size: int = 8,
                                 max_length: int = 1024, template: str | None = None,
                                 progress: bool = True, dtype: torch.dtype = torch.float32,
                                 stats: dict | None = None
                                 ) -> tuple[dict[str, InputCovariance], dict[str, str], int]:
    """One forward pass of ``model``; the input covariance of every module in ``targets``.

    ``targets`` maps a module name to the module whose *input* is recorded. Modules of one parent
    that are called on the same tensor (q/k/v on the attention input, gate/up on the MLP input)
    share one accumulator: ``owner[name]`` names the module that holds it. Returns the
    accumulators (by owner), the owner of every target, and the number of response tokens.
    """
    covs: dict[str, InputCovariance] = {}
    owner: dict[str, str] = {}
    state: dict = {"parent": None, "held": [], "first": True, "mask": None, "masks": {}}

    def hook(_module, args, name: str) -> None:
        x = args[0]
        parent = name.rsplit(".", 1)[0]
        if state["parent"] != parent:          # hold inputs only while their parent runs
            state["parent"], state["held"] = parent, []
        same = next((held_name for t, held_name in state["held"] if t is x), None)
        if state["first"]:
            owner[name] = same or name
        elif owner.get(name, name) != (same or name):
            raise NlsrError(f"module '{name}' read a different input from the one it shared in the "
                            "first batch; this model's modules cannot share input covariances")
        if same is not None:
            return
        state["held"].append((x, name))
        acc = covs.get(name)
        if acc is None:
            acc = covs[name] = InputCovariance(x.shape[-1], dtype=dtype, device=x.device)
        mask = state["masks"].get(x.device)
        if mask is None:
            mask = state["masks"][x.device] = state["mask"].to(x.device)
        acc.update(x[mask])

    handles = [module.register_forward_pre_hook(lambda m, a, name=name: hook(m, a, name))
               for name, module in targets.items()]
    device = next(p.device for p in model.parameters())
    forward = _body(model, list(targets))
    tokens = 0
    try:
        batches = list(make_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length,
                                    template=template))
        for batch in _progress(batches, progress, "calibration pass (neurons)"):
            state["mask"], state["masks"], state["held"], state["parent"] = batch.response_mask, {}, [], None
            tokens += int(batch.response_mask.sum())
            if stats is not None:
                stats["calibration_tokens"] = stats.get("calibration_tokens", 0) + int(batch.attention_mask.sum())
            forward(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                    use_cache=False)
            state["first"] = False
    finally:
        for handle in handles:
            handle.remove()
        state["held"] = []
    if tokens == 0:
        raise NlsrError("the calibration rows have no response tokens (all truncated?); raise "
                        "--max-length or give rows with responses")
    unseen = [n for n in targets if n not in owner]
    if unseen:
        raise NlsrError(f"{len(unseen)} target modules saw no calibration input (e.g. '{unseen[0]}'); "
                        "are they used by this model's forward pass?")
    return covs, owner, tokens


def _subspaces(covs: Mapping[str, InputCovariance], rho: float) -> dict[str, torch.Tensor]:
    return {name: activation_subspace(acc.cov.cpu(), rho) for name, acc in covs.items()}


def _common_metadata(rho: float, q: float, template: str, rows: int, tokens: int,
                     stats: dict, owner: Mapping[str, str]) -> dict[str, object]:
    return {"granularity": NEURON, "rank_ratio": rho, "keep_fraction": q, "template": template,
            "calibration_rows": rows, "response_tokens": tokens,
            "calibration_tokens": stats.get("calibration_tokens"),
            "input_covariances": len(set(owner.values()))}


def identify_neurons(model, reference: LoraAdapter, rows: Sequence[CalibrationRow], tokenizer,
                     rho: float = 0.8, q: float = 0.2, batch_size: int = 8, max_length: int = 1024,
                     progress: bool = True, template: str | None = None,
                     metadata: Mapping[str, object] | None = None,
                     dtype: torch.dtype = torch.float32) -> SafetyMasks:
    """Safety neurons (weight rows) of a LoRA reference ``s B_e A_e`` on ``model`` (``W_0``).

    The reference adapter is attached for the pass (the model run is ``W_0 + s B_e A_e``) and
    removed afterwards. Per module the rows are scored by ``s ||B_e[i] A_e U_k||`` (see
    :mod:`nlsr.method.projection_rows`) and the top ``q`` fraction is kept. ``dtype`` is the precision of
    the covariance accumulators (float32: ``4 d_in²`` bytes per distinct module input).

    Returns masks keyed ``<module>.weight`` (bool, ``d_out``) whose metadata records
    ``granularity=neuron`` and the reference's fingerprint.
    """
    _check_fractions(rho, q, rows)
    from nlsr.method.calibration import resolve_template

    template = resolve_template(tokenizer, template)
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
        covs, owner, tokens = accumulate_input_covariances(
            peft_model, targets, rows, tokenizer, batch_size=batch_size, max_length=max_length,
            template=template, progress=progress, dtype=dtype, stats=stats)
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


def identify_neurons_model(reference_model, reference: ModelDir, base: ModelDir,
                           rows: Sequence[CalibrationRow], tokenizer, rho: float = 0.8,
                           q: float = 0.2, batch_size: int = 8, max_length: int = 1024,
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
