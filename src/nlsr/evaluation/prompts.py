"""A user's own prompt file: ``.txt`` (one prompt per line), ``.jsonl`` (a ``prompt`` field) or
``.csv`` (a ``prompt`` column). Light: no torch, so the CLI checks the file before loading a model."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from nlsr.errors import NlsrError

PROMPT_SUFFIXES = (".txt", ".jsonl", ".csv")
DEFAULT_FIELD = "prompt"


def read_prompts(path: str | os.PathLike, field: str | None = None, limit: int | None = None) -> list[str]:
    """The prompts of ``path``, in file order (the first ``limit`` when given).

    ``.txt``: every non-blank line is a prompt. ``.jsonl``: every line a JSON object whose ``field``
    (default ``prompt``) is a non-empty string. ``.csv``: a header row naming a ``field`` column.

    Raises:
        NlsrError: a missing file, an unknown suffix, a field on a ``.txt`` file, a row without the
            field (its line number and the fields it has are named), or no prompt at all.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise NlsrError(f"prompt file '{path}' {what}; give a .txt (one prompt per line), .jsonl "
                        "(a 'prompt' field per line) or .csv (a 'prompt' column) file")
    suffix = path.suffix.lower()
    if suffix not in PROMPT_SUFFIXES:
        raise NlsrError(f"prompt file '{path}' has suffix '{suffix or '(none)'}'; use .txt (one prompt per "
                        "line), .jsonl (a 'prompt' field per line) or .csv (a 'prompt' column)")
    if limit is not None and limit < 1:
        raise NlsrError(f"--limit must be >= 1 (got {limit}); leave it out to use every prompt")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise NlsrError(f"prompt file '{path}' is not UTF-8 text ({err.reason}); save it as UTF-8") from None
    if suffix == ".txt":
        if field is not None:
            raise NlsrError(f"--prompt-field applies to .jsonl and .csv files; '{path}' is plain text "
                            "with one prompt per line: drop --prompt-field")
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    elif suffix == ".jsonl":
        prompts = _jsonl_prompts(path, text, field or DEFAULT_FIELD)
    else:
        prompts = _csv_prompts(path, text, field or DEFAULT_FIELD)
    if not prompts:
        raise NlsrError(f"prompt file '{path}' holds no prompts; give at least one")
    return prompts[:limit] if limit is not None else prompts


def _jsonl_prompts(path: Path, text: str, field: str) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise NlsrError(f"{path}:{number} is not JSON ({err.msg}); each line must be one object "
                            f"such as {{\"{field}\": \"...\"}}") from None
        value = row.get(field) if isinstance(row, dict) else None
        if not isinstance(value, str) or not value.strip():
            fields = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise NlsrError(f"{path}:{number} has no non-empty string field '{field}' (it has: {fields}); "
                            "name the field that holds the prompt with --prompt-field")
        prompts.append(value.strip())
    return prompts


def _csv_prompts(path: Path, text: str, field: str) -> list[str]:
    reader = csv.DictReader(text.splitlines())
    columns = reader.fieldnames or []
    if field not in columns:
        raise NlsrError(f"prompt file '{path}' has no column '{field}' (columns: {', '.join(columns) or 'none'}); "
                        "name the column that holds the prompt with --prompt-field")
    return [row[field].strip() for row in reader if (row.get(field) or "").strip()]
