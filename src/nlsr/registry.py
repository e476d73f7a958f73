"""One small registry for every variation point: transplant forms, selection rules, judges, defences,
data sets and tasks.

A name is registered next to its code (:meth:`Registry.register`, a decorator) or, for a built-in
whose module imports torch or scikit-learn, declared with a ``"package.module:attr"`` target
(:meth:`Registry.declare`) that is imported on the first :meth:`Registry.get`. Names, summaries and
checks never import anything, so the config check and the command line answer at once.
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from nlsr.errors import NlsrError

T = TypeVar("T")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


@dataclass(frozen=True)
class Entry:
    """What a registry knows about a name without importing it."""

    name: str
    summary: str = ""
    reference: str | None = None
    target: str = ""
    """``"package.module:attr"``: where the implementation lives."""
    meta: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """Names of one ``kind`` ("transplant form", "judge", ...) mapped to implementations."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._loaded: dict[str, T] = {}

    def _free(self, name: str, target: str) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise NlsrError(f"{self.kind} name {name!r} is not allowed; use lower case letters, digits, '-' "
                            "and '_', starting with a letter or digit")
        if name in self._entries:
            raise NlsrError(f"{self.kind} '{name}' is already registered, by {self._entries[name].target}; "
                            f"register {target} under another name")

    def _add(self, name: str, target: str, summary: str, reference: str | None, meta: dict[str, Any]) -> None:
        self._free(name, target)
        self._entries[name] = Entry(name, summary, reference, target, dict(meta))

    def register(self, name: str, *, summary: str = "", reference: str | None = None,
                 **meta: Any) -> Callable[[T], T]:
        """Decorator: register the decorated object as ``name`` (it is returned unchanged).
        The name is checked at once, so a taken name fails at the decorator."""
        self._free(name, "the new one")

        def decorate(obj: T) -> T:
            where = getattr(obj, "__qualname__", type(obj).__name__)
            self._add(name, f"{getattr(obj, '__module__', '?')}:{where}", summary, reference, meta)
            self._loaded[name] = obj
            return obj
        return decorate

    def declare(self, name: str, target: str, *, summary: str = "", reference: str | None = None,
                **meta: Any) -> None:
        """Register ``name`` lazily: ``target`` (``"package.module:attr"``) is imported on first :meth:`get`."""
        if target.count(":") != 1:
            raise NlsrError(f"{self.kind} '{name}': target {target!r} should read 'package.module:attr'")
        self._add(name, target, summary, reference, meta)

    def unregister(self, name: str) -> None:
        """Forget ``name`` (for tests and plugins that replace a registration)."""
        self._entries.pop(self.check(name), None)
        self._loaded.pop(name, None)

    def names(self) -> tuple[str, ...]:
        """The registered names in registration order; imports nothing."""
        return tuple(self._entries)

    def info(self, name: str) -> Entry:
        """Summary, reference and metadata of ``name``; imports nothing."""
        return self._entries[self.check(name)]

    def check(self, name: str, option: str | None = None) -> str:
        """``name`` if it is registered, else :class:`NlsrError` naming ``option`` (or the kind), the
        closest name and every name; imports nothing."""
        if name in self._entries:
            return name
        known = sorted(self._entries)
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise NlsrError(f"unknown {option or self.kind} '{name}'{hint} (known: {', '.join(known) or 'none'})")

    def get(self, name: str) -> T:
        """The implementation of ``name``, importing a declared target on first use."""
        if name not in self._loaded:
            module, attr = self.info(name).target.split(":")
            try:
                self._loaded[name] = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as err:
                raise NlsrError(f"{self.kind} '{name}' is declared as {module}:{attr}, which cannot be "
                                f"imported ({err}); fix the declaration or install what it needs") from err
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
