"""nlsr: Neuron-Level Safety Realignment of LoRA-fine-tuned language models.

The four steps of NLSR (Yi et al., AAAI 2025) as functions over in-memory objects::

    import nlsr
    aligned = nlsr.load_adapter("aligned/")
    reference = nlsr.extrapolate(aligned, beta=0.9)                # step 1
    masks = nlsr.identify(model, reference, rows, tokenizer)        # step 2
    result = nlsr.realign(reference, nlsr.load_adapter("ft/"), masks)  # steps 3-4
    nlsr.save_adapter(result.adapter, "repaired/")

Heavy imports (torch, transformers) happen on first use, so ``nlsr --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "NlsrError": "nlsr.errors",
    # weights in and out
    "LoraAdapter": "nlsr.weights.adapters",
    "LoraFactors": "nlsr.weights.adapters",
    "load_adapter": "nlsr.weights.adapters",
    "save_adapter": "nlsr.weights.adapters",
    "check_comparable": "nlsr.weights.adapters",
    "attach_adapter": "nlsr.weights.adapters",
    "load_model": "nlsr.weights.models",
    "load_tokenizer": "nlsr.weights.models",
    # the method, step by step
    "extrapolate": "nlsr.method.extrapolate",
    "read_calibration_jsonl": "nlsr.method.calibration",
    "CalibrationRow": "nlsr.method.calibration",
    "identify": "nlsr.method.identify",
    "identify_model_dir": "nlsr.method.identify",
    "SafetyMasks": "nlsr.method.masks",
    "save_masks": "nlsr.method.masks",
    "load_masks": "nlsr.method.masks",
    "realign": "nlsr.method.realign",
    "realign_model_dir": "nlsr.method.realign",
    "RealignResult": "nlsr.method.realign",
    "safelora": "nlsr.method.safelora",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nlsr' has no attribute '{name}'")
