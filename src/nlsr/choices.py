"""The names an option or a config field may take, importable without torch.

The registries that implement them (:data:`nlsr.method.select.SELECTION_RULES`,
:data:`nlsr.method.transplant.TRANSPLANTS`, :data:`nlsr.evaluation.judges.JUDGES`) import torch or numpy; the
command line and the config check names against these tuples before any heavy import, and a test
keeps both in step.
"""

from __future__ import annotations

from nlsr.errors import NlsrError

SELECTION_RULE_NAMES: tuple[str, ...] = ("paper", "reverse", "threshold", "all")
TRANSPLANT_NAMES: tuple[str, ...] = ("exact", "factor")
TEMPLATE_NAMES: tuple[str, ...] = ("alpaca", "chat")
JUDGE_NAMES: tuple[str, ...] = ("trained", "beaverdam", "llamaguard", "refusal", "refusal-v2", "hidden")
MODEL_JUDGES: tuple[str, ...] = ("beaverdam", "llamaguard")
"""Judges that need a ``model`` (a folder or hub id) and run it on a device in a precision."""


def check_choice(option: str, value: str | None, names: tuple[str, ...]) -> None:
    """Raise :class:`NlsrError` unless ``value`` (when given) is one of ``names``."""
    if value is not None and value not in names:
        raise NlsrError(f"unknown {option} '{value}'; use one of {', '.join(names)}")
