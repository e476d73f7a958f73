"""Filesystem helpers: atomic outputs that never leave partial results behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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
    if not out.parent.is_dir():
        raise NlsrError(f"'{out.parent}' (the folder for output '{out}') is a file, not a folder")
    check_writable(out.parent, out)
    return out


def check_writable(folder: Path, out: Path | None = None) -> None:
    """Refuse a folder where a file cannot be created (read-only file system, permissions), by
    creating and removing a probe file there: nothing expensive should run before this fails."""
    try:
        fd, name = tempfile.mkstemp(prefix=".nlsr-write-probe-", dir=folder)
    except OSError as err:
        what = f"output '{out}'" if out is not None else "the output"
        raise NlsrError(f"cannot write {what}: the folder '{folder}' is not writable "
                        f"({err.strerror or err}); choose a writable location") from None
    os.close(fd)
    os.unlink(name)


def _write_error(out: Path, err: OSError) -> NlsrError:
    where = f" ('{err.filename}')" if err.filename else ""
    return NlsrError(f"writing '{out}' failed: {err.strerror or err}{where}; nothing was written. "
                     "Check free space and permissions, or choose another output")


def _chmod_like_new(path: Path, mode: int) -> None:
    """Temporary files are private (0600/0700); give the output the mode a plain new file or
    folder gets under the current umask, as the pipeline's outputs have."""
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.chmod(path, mode & ~umask)


def _give_usual_modes(folder: Path) -> None:
    """Some writers (safetensors) create private files (0600); give everything in ``folder`` the
    mode a new file or folder gets under the umask, as PEFT's own outputs have."""
    for entry in folder.rglob("*"):
        if not entry.is_symlink():
            _chmod_like_new(entry, 0o777 if entry.is_dir() else 0o666)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False,
               owned: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` that becomes ``path`` only on success.

    On an exception the temporary directory is removed, so a failed or killed run never leaves
    a half-written output under the final name.

    ``owned``: for a folder that other files may share (a results folder with its README), the
    names this command writes. When ``force`` replaces an existing folder, every entry whose name
    is not ``owned`` (and that the new output does not hold) is carried into the new folder, so
    only the command's own earlier outputs are replaced. Without it the whole folder is replaced.
    """
    out = check_output_path(path, force)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    _chmod_like_new(tmp, 0o777)
    try:
        yield tmp
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(out, err) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _give_usual_modes(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        if old.is_dir() and owned is not None:      # killed in this loop: the rest stays in ``old``
            for entry in sorted(old.iterdir()):
                if not owned(entry.name) and not (out / entry.name).exists():
                    os.replace(entry, out / entry.name)
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
    _chmod_like_new(Path(name), 0o666)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_error(out, err) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON (the caller provides atomicity)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
