"""Error messages for unknown names in the data registries, with close-match suggestions."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from nlsr.errors import NlsrError


def unknown_name_error(what: str, name: str, valid: Iterable[str]) -> NlsrError:
    """``<what> 'name' is unknown; did you mean ...? Valid <what>s: ...``."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
    return NlsrError(f"{what} {name!r} is unknown{hint} Valid {what} names: {', '.join(valid)}")
