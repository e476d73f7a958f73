"""Step 2 on a real model: one streaming calibration pass, then the safety masks.

Forward hooks on every ``lora_A`` module of the reference model (``W_0 + s B_e A_e``) accumulate
the ``r x r`` Gram matrix of its outputs over response tokens only; :mod:`nlsr.method.projection` turns
each Gram matrix into the masks ``M_A`` and ``M_B``. Memory is O(r²) per module, and the pass skips
the LM head when no adapted module lives there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from nlsr.errors import NlsrError
from nlsr.io import atomic_file
from nlsr.method.calibration import CalibrationRow, make_batches
from nlsr.method.projection import GramAccumulator, safety_masks
from nlsr.weights.adapters import LoraAdapter, attach_adapter, fingerprint, read_safetensors, weight_key


@dataclass
class SafetyMasks:
    """Boolean masks keyed by the adapter's weight keys (same shapes as the factors)."""

    masks: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    source: Path | None = field(default=None, compare=False)  # the file it was loaded from

    def pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M_A, M_B)`` of a module, by its name in the base model."""
        return self.masks[weight_key(module, "A")], self.masks[weight_key(module, "B")]

    def density(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)


MASKS_FORMAT = "2"  # 2: the metadata records the reference's fingerprint and what the masks came from


def provenance(reference: LoraAdapter, /, **fields: object) -> dict[str, str]:
    """The metadata that ties masks to what they were made from (safetensors metadata is str -> str).

    Always: the format version, the reference adapter's :func:`~nlsr.weights.adapters.fingerprint`
    (``reference_fingerprint``, JSON), its path when known, and ``granularity`` ("entry": one mask
    entry per factor entry). ``fields`` adds the rest (``base``, ``beta``, ``rank_ratio``,
    ``keep_fraction``, ``template``, ``calibration``, ``calibration_sha256``, ...); None is left out.
    """
    meta = {"nlsr_masks_format": MASKS_FORMAT,
            "reference_fingerprint": json.dumps(fingerprint(reference), sort_keys=True),
            "granularity": "entry"}
    if reference.source:
        meta["reference"] = reference.source
    meta.update({k: str(v) for k, v in fields.items() if v is not None})
    return meta


def masks_fingerprint(masks: SafetyMasks) -> Mapping | None:
    """The reference fingerprint recorded in ``masks``, or None (older files, in-memory masks)."""
    raw = masks.metadata.get("reference_fingerprint")
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def save_masks(masks: SafetyMasks, path: str | os.PathLike, force: bool = False) -> Path:
    """Write masks to a safetensors file (bool tensors), atomically."""
    with atomic_file(path, force=force) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in masks.masks.items()}, tmp,
                  metadata={str(k): str(v) for k, v in masks.metadata.items()})
    return Path(path)


def load_masks(path: str | os.PathLike) -> SafetyMasks:
    """Read a mask file written by :func:`save_masks`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise NlsrError(f"mask file '{path}' does not exist; make one with `nlsr identify`")
    masks = read_safetensors(path, "masks file", "make it again with `nlsr identify`")
    if not masks:
        raise NlsrError(f"mask file '{path}' holds no masks; make it again with `nlsr identify`")
    for key, value in masks.items():
        if value.dtype != torch.bool:
            raise NlsrError(f"mask '{key}' in '{path}' has dtype {value.dtype}, expected bool; is "
                            "it a masks file from `nlsr identify`?")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    return SafetyMasks(masks=masks, metadata=dict(metadata), source=path)


def _decoder_only_forward(model, adapter: LoraAdapter):
    """The transformer body without the LM head, when every adapted module lives in it.

    ``model`` is the PEFT-wrapped model or (for a dispatched model) the transformers model itself."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = getattr(base, "base_model_prefix", "")
    body = getattr(base, prefix, None) if prefix else None
    if body is not None and body is not base and all(m.startswith(prefix + ".") for m in adapter.modules):
        return body
    return base


def _has_offloaded_weights(model) -> bool:
    """True when accelerate's big-model loading left weights on the meta device (offloaded to CPU or
    disk and brought to the execution device layer by layer during the forward pass)."""
    return any(p.device.type == "meta" for p in model.parameters())


def _hook_reference_lora(model, reference: LoraAdapter, on_z) -> list:
    """Add ``s B_e A_e x`` to every adapted module's output by forward hooks, without PEFT.

    For a model dispatched by accelerate with offloaded layers, where PEFT would place the new LoRA
    weights on the meta device. It computes what PEFT's LoRA layer computes (``A`` and ``B`` in
    float32, the output cast back to the module's dtype), on the device of each module's output,
    and hands ``z = A_e x`` to ``on_z(name, rank, z)``. Returns the hook handles.
    """
    import torch.nn.functional as F

    modules = dict(model.named_modules())
    handles = []
    try:
        for name, f in reference:
            module = modules.get(name)
            if module is None or not hasattr(module, "in_features"):
                raise NlsrError(f"the adapter does not fit the model: '{name}' "
                                f"{'matches no module' if module is None else 'is not a linear layer'}; "
                                "is it an adapter of this base model?")
            if (module.in_features, module.out_features) != (f.A.shape[1], f.B.shape[0]):
                raise NlsrError(f"the adapter does not fit the model: '{name}' is "
                                f"{module.in_features} -> {module.out_features}, the adapter "
                                f"{f.A.shape[1]} -> {f.B.shape[0]}; is it an adapter of this base model?")
            placed: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

            def hook(_module, inputs, output, name=name, f=f, placed=placed):
                device = output.device
                if device not in placed:
                    placed[device] = (f.A.to(device, torch.float32), f.B.to(device, torch.float32))
                a, b = placed[device]
                z = F.linear(inputs[0].to(device, a.dtype), a)
                on_z(name, f.rank, z)
                return (output + F.linear(z, b) * f.scale).to(output.dtype)
            handles.append(module.register_forward_hook(hook))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


@torch.inference_mode()
def accumulate_grams(model, reference: LoraAdapter, rows: Sequence[CalibrationRow], tokenizer,
                     batch_size: int = 8, max_length: int = 1024, progress: bool = True,
                     template: str | None = None, stats: dict | None = None
                     ) -> tuple[dict[str, GramAccumulator], int]:
    """One forward pass of the reference model over ``rows``; Gram matrices of every ``A_e`` output.

    ``model`` is the base (weak) model ``W_0``; the reference adapter is attached for the pass and
    removed afterwards, leaving ``model`` as it was. Returns the accumulators by module name and
    the number of response tokens seen.

    ``model`` may be spread over several devices by accelerate's big-model loading
    (``device_map``, ``max_memory``, ``offload_folder``; see :func:`nlsr.weights.models.load_model`): each
    Gram matrix accumulates on the device of its module's output (move it with ``.gram.cpu()``).
    Where layers are offloaded to CPU or disk, the adapter is applied by forward hooks instead of
    PEFT, with the same arithmetic.
    """
    grams: dict[str, GramAccumulator] = {}
    current: dict[str, torch.Tensor] = {}
    masks_by_device: dict[torch.device, torch.Tensor] = {}

    def on_z(name: str, rank: int, z: torch.Tensor) -> None:
        acc = grams.get(name)
        if acc is None:
            acc = grams[name] = GramAccumulator(rank, device=z.device)
        if z.device != acc.gram.device:
            z = z.to(acc.gram.device)
        if z.device not in masks_by_device:
            masks_by_device[z.device] = current["mask"].to(z.device)
        acc.update(z[masks_by_device[z.device]])

    handles = []
    peft_model = None
    try:
        if _has_offloaded_weights(model):
            handles = _hook_reference_lora(model, reference, on_z)
            forward = _decoder_only_forward(model, reference)
            device = next((p.device for p in model.parameters() if p.device.type != "meta"),
                          torch.device("cpu"))
        else:
            peft_model = attach_adapter(model, reference, adapter_name="nlsr_reference")
            device = next(model.parameters()).device
            modules = dict(peft_model.named_modules())
            compute_dtype = next(model.parameters()).dtype
            for name, f in reference:
                layer = modules[f"base_model.model.{name}"]
                lora_a = layer.lora_A["nlsr_reference"]
                if compute_dtype != torch.float32:
                    # The whole reference model runs in the model's precision (PEFT would keep the
                    # adapter in float32 and cast every adapted activation there and back).
                    lora_a.to(compute_dtype)
                    layer.lora_B["nlsr_reference"].to(compute_dtype)

                def hook(_module, _inputs, output, name=name, rank=f.rank):
                    on_z(name, rank, output)
                handles.append(lora_a.register_forward_hook(hook))
            forward = _decoder_only_forward(peft_model, reference)
        batches = list(make_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length,
                                    template=template))
        tokens = 0
        for batch in _progress(batches, progress, "calibration pass"):
            current["mask"] = batch.response_mask
            masks_by_device.clear()
            tokens += int(batch.response_mask.sum())
            if stats is not None:
                stats["calibration_tokens"] = stats.get("calibration_tokens", 0) + int(batch.attention_mask.sum())
            forward(input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        if peft_model is not None:
            peft_model.unload()
    if tokens == 0:
        raise NlsrError("the calibration rows have no response tokens (all truncated?); raise "
                        "--max-length or give rows with responses")
    # in the adapter's order; a module the pass never reached contributes nothing
    return {name: grams.get(name) or GramAccumulator(f.rank) for name, f in reference}, tokens


def _progress(items, enabled: bool, description: str):
    """A progress bar on stderr in a terminal; elsewhere (a log file, a pipe) a plain line at the
    start, about every 10% (at most every 5 s) and at the end."""
    if not enabled:
        return items
    from rich.console import Console

    console = Console(stderr=True)
    if console.is_terminal:
        from rich.progress import track

        return track(items, description=description, console=console)
    return _plain_progress(items, description, console)


def _plain_progress(items, description: str, console):
    import time

    total = len(items)
    start = last = time.monotonic()
    step = max(1, total // 10)
    console.print(f"{description}: {total} batches", highlight=False)
    for i, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if i < total and i % step == 0 and now - last >= 5:
            console.print(f"{description}: {i}/{total} batches, {now - start:.0f} s", highlight=False)
            last = now
    console.print(f"{description}: {total}/{total} batches in {time.monotonic() - start:.1f} s",
                  highlight=False)


def identify(model, reference: LoraAdapter, rows: Sequence[CalibrationRow], tokenizer,
             rho: float = 0.8, q: float = 0.2, batch_size: int = 8, max_length: int = 1024,
             progress: bool = True, template: str | None = None,
             metadata: Mapping[str, object] | None = None) -> SafetyMasks:
    """Safety-critical neuron masks of ``reference`` (NLSR step 2).

    The masks' metadata records their :func:`provenance`: the reference's fingerprint, the base
    model (``model.name_or_path``), ρ, q, the template, the calibration size and response tokens;
    ``metadata`` adds or overrides fields (e.g. ``beta``, ``calibration_sha256``, ``base``).

    Args:
        model: the weak aligned model ``W_0`` (a transformers causal LM).
        reference: the super-aligned reference adapter ``(A_e, B_e)``.
        rows: safety calibration rows (harmful prompt, safe response).
        tokenizer: the model's tokenizer.
        template: "alpaca" or "chat" (default: chat when the tokenizer has a chat template).
        rho: rank ratio, ``k = ceil(ρ r)``. q: fraction of entries kept per matrix.
    """
    if not 0 < rho <= 1:
        raise NlsrError(f"rank ratio must be in (0, 1] (got {rho})")
    if not 0 < q <= 1:
        raise NlsrError(f"keep fraction q must be in (0, 1] (got {q})")
    if not rows:
        raise NlsrError("no calibration rows given")
    if batch_size < 1 or max_length < 1:
        raise NlsrError(f"batch size and max length must be >= 1 (got {batch_size}, {max_length})")
    from nlsr.method.calibration import resolve_template

    template = resolve_template(tokenizer, template)
    stats: dict = {}
    grams, tokens = accumulate_grams(model, reference, rows, tokenizer, batch_size=batch_size,
                                     max_length=max_length, progress=progress, template=template, stats=stats)
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
