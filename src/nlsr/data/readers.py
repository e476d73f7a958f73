"""Read the offline data files as they are, row by row, with errors that name file, row and field.

Every reader yields :class:`Row` objects; a loader asks a row for its fields with :meth:`Row.text`
or :meth:`Row.value`, which raise :class:`~nlsr.errors.NlsrError` naming the file, the row number
(1-based: the line for JSONL, the record for JSON lists, the data row for CSV/TSV) and the field.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlsr.errors import NlsrError
from nlsr.paths import FULL_DATA_HINT, is_bundled

_MISSING = object()


@dataclass(frozen=True)
class Row:
    """One raw record of a data file and where it came from."""

    path: Path
    number: int
    data: dict

    def error(self, message: str) -> NlsrError:
        return NlsrError(f"{self.path}, row {self.number}: {message}")

    def value(self, key: str) -> Any:
        """The raw value of ``key``; a missing key is an error."""
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            raise self.error(f"field '{key}' is missing (fields present: {', '.join(map(str, self.data))})")
        return value

    def text(self, key: str, allow_empty: bool = False) -> str:
        """The string value of ``key``; missing, non-string or (unless allowed) blank is an error."""
        value = self.value(key)
        if not isinstance(value, str):
            raise self.error(f"field '{key}' should be a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise self.error(f"field '{key}' is empty")
        return value


def require_file(path: Path, root: Path | None = None, dataset: str | None = None) -> Path:
    """``path`` if it is a file, else an error naming it and how to point nlsr at the data."""
    if not path.is_file():
        what = f"dataset '{dataset}' needs" if dataset else "nlsr needs"
        where = f"The data directory is '{root}'; set" if root is not None else "Set"
        if root is not None and is_bundled(root):
            raise NlsrError(f"{what} the file '{path}', which is not in the bundled data subset ('{root}', "
                            f"only what configs/smoke.yaml needs): {FULL_DATA_HINT}")
        raise NlsrError(f"{what} the file '{path}', which does not exist. {where} the data directory "
                        "with --data-dir or NLSR_DATA_DIR (the folder holding the offline data sets, "
                        "shared/data)")
    return path


def read_json(path: Path) -> Any:
    """A whole JSON document."""
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise NlsrError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from err


def json_rows(path: Path, key: str | None = None) -> Iterator[Row]:
    """The records of a JSON list (or of the list under ``key`` of a JSON object)."""
    document = read_json(path)
    if key is not None:
        if not isinstance(document, dict) or key not in document:
            raise NlsrError(f"{path} should be a JSON object with a list under '{key}'")
        document = document[key]
    if not isinstance(document, list):
        raise NlsrError(f"{path} should hold a JSON list of records, got {type(document).__name__}")
    for number, record in enumerate(document, start=1):
        if not isinstance(record, dict):
            raise NlsrError(f"{path}, row {number}: should be a JSON object, got {type(record).__name__}")
        yield Row(path, number, record)


def jsonl_rows(path: Path) -> Iterator[Row]:
    """The objects of a JSONL file, one per non-blank line (numbered by line)."""
    with path.open(encoding="utf-8") as handle:
        number = 0
        while True:
            try:
                line = handle.readline()
            except UnicodeDecodeError as err:
                raise NlsrError(f"{path}, row {number + 1}: not UTF-8 text ({err.reason}); the file "
                                "should be JSONL, one JSON object per line") from err
            if not line:
                return
            number += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise NlsrError(f"{path}, row {number}: not valid JSON ({err.msg}); the file is JSONL, "
                                "one object per line") from err
            if not isinstance(record, dict):
                raise NlsrError(f"{path}, row {number}: should be a JSON object")
            yield Row(path, number, record)


def csv_rows(path: Path, delimiter: str = ",", fieldnames: Sequence[str] | None = None,
             header: bool = True) -> Iterator[Row]:
    """The data rows of a CSV/TSV file as dicts.

    Args:
        fieldnames: column names to use instead of the header (for files whose header is wrong or
            absent); with ``header=True`` the header line is still skipped.
        header: whether the first line is a header.
    """
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        names = list(fieldnames) if fieldnames is not None else None
        if header:
            first = next(reader, None)
            if first is None:
                return
            names = names or first
        if names is None:
            raise NlsrError(f"{path}: no header and no column names given")
        for number, values in enumerate(reader, start=1):
            if not values:
                continue
            if len(values) != len(names):
                raise NlsrError(f"{path}, row {number}: has {len(values)} columns, expected {len(names)} "
                                f"({', '.join(names)})")
            yield Row(path, number, dict(zip(names, values, strict=True)))


def line_rows(path: Path, field: str = "text") -> Iterator[Row]:
    """The non-blank lines of a text file, as ``{field: line}`` rows."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield Row(path, number, {field: line.rstrip("\n")})
