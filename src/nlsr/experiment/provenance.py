"""What a stage's key is made of besides its parameters: the code that made it, the content of what it read.

:func:`nlsr.experiment.pipeline.stage_key` hashes, with a stage's parameters and its inputs' keys:

- :func:`code_version`: nlsr's version and the git commit that last changed the installed source
  tree (``src/nlsr``), when it is a git checkout. A commit that touches only configs, docs or
  results leaves the keys alone. Uncommitted edits to the source (``dirty``) are recorded in every
  manifest (:func:`source_state`) but are **not** part of the key: keying on them would rerun every
  stage after every edit, including edits that cannot change a number. So stages made from
  uncommitted code can be skipped or reused by a run of the same commit; the manifest says so.
- the stage's *content*: the SHA-256 of every data file a data stage reads
  (:func:`datasets_content`) and of the trained judge the report uses, so a stage made from other
  data or another judge is never skipped or copied by ``reuse_from``.

Files are hashed once per process (:func:`content_hash` caches by path, size and modification time).
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

_HASHES: dict[tuple[str, int, int], str] = {}


def _git(*args: str, cwd: Path) -> str | None:
    """``git args`` in ``cwd``; None when git is missing, fails or takes too long."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def source_state() -> dict[str, str | bool | None]:
    """nlsr's version, the last commit that changed the installed source tree (None outside a git
    checkout), and whether that tree has uncommitted changes (None when unknown)."""
    import nlsr

    package = Path(nlsr.__file__).resolve().parent
    commit = _git("log", "-1", "--format=%H", "--", ".", cwd=package) or None
    status = _git("status", "--porcelain", "--", ".", cwd=package) if commit else None
    return {"nlsr": nlsr.__version__, "commit": commit, "dirty": None if status is None else bool(status)}


def code_version() -> dict[str, str | None]:
    """The part of :func:`source_state` that enters every stage key: version and commit, not ``dirty``."""
    state = source_state()
    return {"nlsr": state["nlsr"], "commit": state["commit"]}


def content_hash(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, computed once per process for each (path, size, mtime)."""
    from nlsr.io import file_sha256

    resolved = Path(path).resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_sha256(resolved)
    return _HASHES[key]


def files_content(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> dict[str, str]:
    """``{path: sha256}`` of existing files (paths relative to ``root`` when given, so the same data
    in another folder gives the same content); a missing file maps to ``"missing"``."""
    out = {}
    for path in paths:
        path = Path(path)
        name = str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else str(path)
        out[name] = content_hash(path) if path.is_file() else "missing"
    return dict(sorted(out.items()))


def datasets_content(names: Iterable[str], data_dir: str | os.PathLike) -> dict[str, dict[str, str]]:
    """``{data set: {file: sha256}}`` of the offline files each registered data set reads."""
    from nlsr.data import get_dataset

    root = Path(data_dir).resolve()
    return {name: files_content(get_dataset(name).paths(root), root) for name in sorted(set(names))}
