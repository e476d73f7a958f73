"""What an output records about how it was made, beside its weights: the prompt template.

A model answers in the template it was trained in; a repair, an evaluation or a mask made in another
template measures something else. So every adapter nlsr writes records its template in
``nlsr.json`` (``{"template": "alpaca"}``), and readers take it from there (or, for adapters written
before, from the masks recorded in ``realign_report.json``). Light: no torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from nlsr.data.templates import TEMPLATES

RECORD_FILE = "nlsr.json"
DEFAULT_TEMPLATE = "alpaca"
"""The paper's template, and the default of the pipeline and of every command that makes masks."""


def read_record(folder: str | os.PathLike) -> dict:
    """``nlsr.json`` of ``folder`` as a dict (empty when absent or unreadable)."""
    try:
        data = json.loads((Path(folder) / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_template(folder: str | os.PathLike) -> str | None:
    """The template an adapter or model folder records, or None when it records none."""
    template = read_record(folder).get("template")
    if template in TEMPLATES:
        return template
    try:
        report = json.loads((Path(folder) / "realign_report.json").read_text())
        template = report["settings"]["masks"]["template"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return template if template in TEMPLATES else None


def record_bytes(**fields: object) -> bytes:
    """The bytes of an ``nlsr.json`` holding ``fields`` (None values left out), for ``extra_files``."""
    return (json.dumps({k: v for k, v in fields.items() if v is not None}, indent=2) + "\n").encode()
