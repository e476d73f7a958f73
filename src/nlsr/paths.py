"""Where nlsr looks for the offline data sets."""

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
