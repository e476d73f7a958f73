"""Where nlsr looks for things: the offline data sets, the model cache, model paths."""

from __future__ import annotations

import os
from pathlib import Path

from nlsr.errors import NlsrError

_REPO_ROOT = Path(__file__).resolve().parents[2]


BUNDLE_MANIFEST = "bundle.json"
"""The file that marks a data folder as the bundled subset (written by ``make_bundle``)."""
FULL_DATA_HINT = ("point --data-dir, NLSR_DATA_DIR or 'data_dir:' in the config at the full offline data "
                  "folder (shared/data)")


def bundled_data_dir() -> Path:
    """The small data subset shipped inside the package (``nlsr/data/bundled``, see its README.md)."""
    return Path(__file__).resolve().parent / "data" / "bundled"


def is_bundled(path: str | os.PathLike) -> bool:
    """Whether the data folder ``path`` is a bundled subset (it holds ``bundle.json``)."""
    return (Path(path) / BUNDLE_MANIFEST).is_file()


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data directory: ``explicit``, else ``$NLSR_DATA_DIR``, else a ``shared/data`` folder
    in or beside the current directory or this checkout, else the bundled subset
    (:func:`bundled_data_dir`: enough for ``configs/smoke.yaml`` only; :func:`describe_data_dir`
    says which one a caller got)."""
    if explicit is not None or os.environ.get("NLSR_DATA_DIR"):
        path = Path(explicit if explicit is not None else os.environ["NLSR_DATA_DIR"])
        if not path.is_dir():
            raise NlsrError(f"data directory '{path}' does not exist")
        return path
    for root in (Path.cwd(), _REPO_ROOT):
        for candidate in (root / "shared" / "data", root.parent / "shared" / "data"):
            if candidate.is_dir():
                return candidate
    bundled = bundled_data_dir()
    if not is_bundled(bundled):
        raise NlsrError(f"no data directory found, and the bundled subset ({bundled}) is missing; pass "
                        "--data-dir or set NLSR_DATA_DIR to the folder holding the offline data sets "
                        "(shared/data), or reinstall nlsr")
    return bundled


def on_bundled_data(explicit: str | os.PathLike | None = None) -> bool:
    """Whether :func:`data_dir` resolves to a bundled subset (False when it finds no folder at all)."""
    try:
        return is_bundled(data_dir(explicit))
    except NlsrError:
        return False


def describe_data_dir(path: str | os.PathLike) -> str:
    """One line saying which data folder is used; for the bundled subset, how to use the full data."""
    if is_bundled(path):
        return (f"{path}: the bundled data subset (a few hundred rows per set, enough for "
                f"configs/smoke.yaml; its numbers only show that the stages run). For real runs {FULL_DATA_HINT}")
    return str(path)


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
