"""Where nlsr looks for things: the offline data sets, the model cache, model paths."""

from __future__ import annotations

import os
from pathlib import Path

from nlsr.errors import NlsrError

_REPO_ROOT = Path(__file__).resolve().parents[2]


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data directory: ``explicit``, else ``$NLSR_DATA_DIR``, else a ``shared/data`` folder
    in or beside the current directory or this checkout."""
    if explicit is not None or os.environ.get("NLSR_DATA_DIR"):
        path = Path(explicit if explicit is not None else os.environ["NLSR_DATA_DIR"])
        if not path.is_dir():
            raise NlsrError(f"data directory '{path}' does not exist")
        return path
    for root in (Path.cwd(), _REPO_ROOT):
        for candidate in (root / "shared" / "data", root.parent / "shared" / "data"):
            if candidate.is_dir():
                return candidate
    raise NlsrError("no data directory found; pass --data-dir or set NLSR_DATA_DIR to the folder "
                    "holding the offline data sets (shared/data)")


def cache_dir() -> Path:
    """Where converted models are cached: ``$NLSR_CACHE_DIR`` or ``~/.cache/nlsr``."""
    return Path(os.environ.get("NLSR_CACHE_DIR", Path.home() / ".cache" / "nlsr"))


def check_model_spec(spec: str | os.PathLike) -> None:
    """A model spec that names a path must be a model directory (with config.json); one that looks
    like a path must exist. Hub ids and ``smollm2`` pass. Cheap: no torch, no network."""
    text = str(spec)
    path = Path(text)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise NlsrError(f"model directory '{path}' has no config.json; give a transformers model "
                            "directory, a hub id, or 'smollm2'")
        return
    if text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1):
        raise NlsrError(f"model path '{text}' does not exist; give an existing directory, a hub id "
                        "such as 'org/name', or 'smollm2' for the embedded default")


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as a report should record it: ``<nlsr cache>/...`` inside the model cache, relative
    inside the working directory, else as given (no machine-specific prefix in committed files)."""
    resolved = Path(path).resolve()
    for root, label in ((cache_dir().resolve(), "<nlsr cache>"), (Path.cwd().resolve(), None)):
        try:
            rest = resolved.relative_to(root)
        except ValueError:
            continue
        return str(Path(label) / rest) if label else str(rest)
    return str(path)
