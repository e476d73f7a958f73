"""Filesystem helpers: atomic outputs that never leave partial results behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nlsr.errors import NlsrError


def check_output_path(path: str | os.PathLike, force: bool) -> Path:
    """Refuse an existing output unless ``force``; return the path. Call before any work."""
    out = Path(path)
    if out.exists() and not force:
        raise NlsrError(f"output path '{out}' already exists; choose another path or pass --force "
                        "to replace it")
    if not out.parent.exists():
        raise NlsrError(f"the folder '{out.parent}' for output '{out}' does not exist; create it "
                        "first")
    return out


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` that becomes ``path`` only on success.

    On an exception the temporary directory is removed, so a failed or killed run never leaves
    a half-written output under the final name.
    """
    out = check_output_path(path, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; it is renamed to ``path`` on success."""
    out = check_output_path(path, force)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (the caller provides atomicity)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
