"""The safety masks of step 2 and their file format.

Entry granularity: one bool per LoRA factor entry, keyed like the adapter's weights
(``...lora_A.weight`` / ``...lora_B.weight``). Neuron granularity: one bool per output row of a
module's weight, keyed ``<module>.weight``. The safetensors metadata records the granularity, the
reference's fingerprint and what the masks were made from (:func:`provenance`), so that a realign
refuses masks of another reference.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from nlsr.errors import NlsrError
from nlsr.io import atomic_file
from nlsr.weights.adapters import LoraAdapter, fingerprint, read_safetensors, weight_key


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



NEURON = "neuron"


ENTRY = "entry"


GRANULARITIES = (ENTRY, NEURON)


def neuron_key(module: str) -> str:
    """The masks-file key of a module's row mask: the name of its weight."""
    return f"{module}.weight"


def granularity_of(masks: SafetyMasks) -> str:
    """``entry`` (one mask entry per LoRA factor entry) or ``neuron`` (one per weight row)."""
    return masks.metadata.get("granularity", ENTRY)

