"""Harmfulness judges for the harmful score (HS): a registry of pluggable judges.

``refusal``: a refusal-phrase matcher (no model; over-counts). ``trained``: a TF-IDF + logistic
regression classifier trained here on labelled responses. ``hidden``: a logistic regression on the
embedded SmolLM2-135M-Instruct's hidden states, trained only on judge-reserved, evaluation-gated rows
(:mod:`nlsr.evaluation.judges.reserved_data`). ``beaverdam`` / ``llamaguard``: adapters
for real moderation models (beaver-dam-7b, Llama Guard) for users who have them. Importing this
package is light (no numpy or scikit-learn): the judges that need them load on first use.
"""

import importlib
from typing import Any

from nlsr.evaluation.judges.base import (
    JUDGES,
    Judge,
    agreement,
    agreement_metrics,
    check_pairs,
    harmful_score,
    make_judge,
    register_judge,
)
from nlsr.evaluation.judges.labelled_data import heldout_rows, load_labelled_rows, split_rows
from nlsr.evaluation.judges.refusal import REFUSAL_PHRASES, RefusalJudge, is_refusal

_LAZY = {"TrainedJudge": "classifier", "HiddenJudge": "hidden", "BeaverDamJudge": "moderation",
         "LlamaGuardJudge": "moderation", "load_or_train_default": "training", "train_judge": "training"}


def __getattr__(name: str) -> Any:
    """The judges that import numpy or scikit-learn, imported when first asked for."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "JUDGES", "REFUSAL_PHRASES", "BeaverDamJudge", "HiddenJudge", "Judge", "LlamaGuardJudge", "RefusalJudge",
    "TrainedJudge", "agreement", "agreement_metrics", "check_pairs", "harmful_score",
    "heldout_rows", "is_refusal", "load_labelled_rows", "load_or_train_default", "make_judge",
    "register_judge", "split_rows", "train_judge",
]
