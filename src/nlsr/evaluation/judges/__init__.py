"""Harmfulness judges for the harmful score (HS): a registry of pluggable judges.

``refusal``: a refusal-phrase matcher (no model; over-counts). ``trained``: a TF-IDF + logistic
regression classifier trained here on labelled responses. ``hidden``: a logistic regression on the
embedded SmolLM2-135M-Instruct's hidden states, trained only on judge-reserved, evaluation-gated rows
(:mod:`nlsr.evaluation.judges.reserved_data`). ``beaverdam`` / ``llamaguard``: adapters
for real moderation models (beaver-dam-7b, Llama Guard) for users who have them. Heavy libraries
are imported only when a judge is built.
"""

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
from nlsr.evaluation.judges.classifier import TrainedJudge
from nlsr.evaluation.judges.hidden import HiddenJudge
from nlsr.evaluation.judges.labelled_data import heldout_rows, load_labelled_rows, split_rows
from nlsr.evaluation.judges.moderation import BeaverDamJudge, LlamaGuardJudge
from nlsr.evaluation.judges.refusal import REFUSAL_PHRASES, RefusalJudge, is_refusal
from nlsr.evaluation.judges.training import load_or_train_default, train_judge

__all__ = [
    "JUDGES", "REFUSAL_PHRASES", "BeaverDamJudge", "HiddenJudge", "Judge", "LlamaGuardJudge", "RefusalJudge",
    "TrainedJudge", "agreement", "agreement_metrics", "check_pairs", "harmful_score",
    "heldout_rows", "is_refusal", "load_labelled_rows", "load_or_train_default", "make_judge",
    "register_judge", "split_rows", "train_judge",
]
