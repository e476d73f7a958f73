"""Step 2 on a real model: one streaming calibration pass, then the safety masks.

Forward hooks on every ``lora_A`` module of the reference model (``W_0 + s B_e A_e``) accumulate
the ``r x r`` Gram matrix of its outputs over response tokens only; :mod:`nlsr.ops.neurons` turns
each Gram matrix into the masks ``M_A`` and ``M_B``. Memory is O(r²) per module, and the pass skips
the LM head when no adapted module lives there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nlsr.adapters import LoraAdapter, attach_adapter, weight_key
from nlsr.calibration import CalibrationRow, make_batches
from nlsr.errors import NlsrError
from nlsr.io import atomic_file
from nlsr.ops.neurons import GramAccumulator, safety_masks


@dataclass
class SafetyMasks:
    """Boolean masks keyed by the adapter's weight keys (same shapes as the factors)."""

    masks: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    def pair(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M_A, M_B)`` of a module, by its name in the base model."""
        return self.masks[weight_key(module, "A")], self.masks[weight_key(module, "B")]

    def density(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)


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
    masks = load_file(path)
    for key, value in masks.items():
        if value.dtype != torch.bool:
            raise NlsrError(f"mask '{key}' in '{path}' has dtype {value.dtype}, expected bool")
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    return SafetyMasks(masks=masks, metadata=dict(metadata))


def _decoder_only_forward(peft_model, adapter: LoraAdapter):
    """The transformer body without the LM head, when every adapted module lives in it."""
    base = peft_model.get_base_model()
    prefix = getattr(base, "base_model_prefix", "")
    body = getattr(base, prefix, None) if prefix else None
    if body is not None and body is not base and all(m.startswith(prefix + ".") for m in adapter.modules):
        return body
    return base


@torch.inference_mode()
def accumulate_grams(model, reference: LoraAdapter, rows: Sequence[CalibrationRow], tokenizer,
                     batch_size: int = 8, max_length: int = 1024, progress: bool = True,
                     template: str | None = None) -> tuple[dict[str, GramAccumulator], int]:
    """One forward pass of the reference model over ``rows``; Gram matrices of every ``A_e`` output.

    ``model`` is the base (weak) model ``W_0``; the reference adapter is attached for the pass and
    removed afterwards, leaving ``model`` as it was. Returns the accumulators by module name and
    the number of response tokens seen.
    """
    peft_model = attach_adapter(model, reference, adapter_name="nlsr_reference")
    device = next(model.parameters()).device
    grams: dict[str, GramAccumulator] = {}
    current: dict[str, torch.Tensor] = {}
    handles = []
    try:
        modules = dict(peft_model.named_modules())
        for name, f in reference:
            lora_a = modules[f"base_model.model.{name}"].lora_A["nlsr_reference"]
            grams[name] = GramAccumulator(f.rank, device=device)

            def hook(_module, _inputs, output, acc=grams[name]):
                acc.update(output[current["mask"]])
            handles.append(lora_a.register_forward_hook(hook))
        forward = _decoder_only_forward(peft_model, reference)
        batches = list(make_batches(tokenizer, rows, batch_size=batch_size, max_length=max_length,
                                    template=template))
        tokens = 0
        for batch in _progress(batches, progress, "calibration pass"):
            current["mask"] = batch.response_mask.to(device)
            tokens += int(batch.response_mask.sum())
            forward(input_ids=batch.input_ids.to(device),
                    attention_mask=batch.attention_mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        peft_model.unload()
    if tokens == 0:
        raise NlsrError("the calibration rows have no response tokens (all truncated?); raise "
                        "--max-length or give rows with responses")
    return grams, tokens


def _progress(items, enabled: bool, description: str):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=description, transient=True)


def identify(model, reference: LoraAdapter, rows: Sequence[CalibrationRow], tokenizer,
             rho: float = 0.8, q: float = 0.2, batch_size: int = 8, max_length: int = 1024,
             progress: bool = True, template: str | None = None) -> SafetyMasks:
    """Safety-critical neuron masks of ``reference`` (NLSR step 2).

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
    grams, tokens = accumulate_grams(model, reference, rows, tokenizer, batch_size=batch_size,
                                     max_length=max_length, progress=progress, template=template)
    masks: dict[str, torch.Tensor] = {}
    for name, f in reference:
        m_a, m_b = safety_masks(f.A, f.B, grams[name].gram.cpu(), rho=rho, q=q)
        masks[weight_key(name, "A")] = m_a
        masks[weight_key(name, "B")] = m_b
    metadata = {"rank_ratio": str(rho), "keep_fraction": str(q), "calibration_rows": str(len(rows)),
                "response_tokens": str(tokens)}
    return SafetyMasks(masks=masks, metadata=metadata)
