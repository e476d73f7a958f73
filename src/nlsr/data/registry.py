"""Named data sets, each read from the offline data directory as it is and normalised on load.

A data set is registered with :func:`register_dataset` next to its loader, which turns the files
into plain dicts of one *kind* (schemas in :data:`KINDS`). :func:`load_records` finds the data
directory (``--data-dir``, ``$NLSR_DATA_DIR`` or ``shared/data``, see :func:`nlsr.paths.data_dir`),
runs the loader and checks every record against its kind. The files are never modified.

This module is the mechanism; the data sets are registered by role in ``datasets_safety``
(alignment and poison), ``datasets_tasks`` (fine-tuning tasks), ``datasets_evaluation`` (harmful
prompts, XSTest) and ``datasets_judge`` (labelled responses), which :mod:`nlsr.data` imports.

Every data set also records where it lives on the Hugging Face hub, when it does (``spec.hub``,
see :mod:`nlsr.data.hub`); ``load_records(name, source="hub")`` then loads it with
``datasets.load_dataset`` instead, for users who are online.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nlsr.data.hub import HubSource, load_hub
from nlsr.data.readers import require_file
from nlsr.errors import NlsrError
from nlsr.paths import data_dir as resolve_data_dir
from nlsr.registry import Registry

# Record schemas by kind: field -> type. Strings must be non-empty, except those in _MAY_BE_EMPTY.
KINDS: dict[str, dict[str, type]] = {
    "sft": {"prompt": str, "response": str},
    "preference": {"prompt": str, "chosen": str, "rejected": str},
    "task": {"instruction": str, "input": str, "output": str, "label": str},
    "prompts": {"prompt": str, "source": str},
    "xstest": {"prompt": str, "label": str, "type": str},
    "labelled": {"prompt": str, "response": str, "harmful": bool, "source": str},
    "poison": {"prompt": str, "response": str},
}
_MAY_BE_EMPTY = {("task", "input")}
XSTEST_LABELS = ("safe", "unsafe")
SOURCES = ("local", "hub")


class DataFiles:
    """A loader's view of the data directory: paths that must exist, named in errors."""

    def __init__(self, root: Path, dataset: str):
        self.root = root
        self.dataset = dataset

    def path(self, relative: str) -> Path:
        return require_file(self.root / relative, self.root, self.dataset)

    def glob(self, pattern: str) -> list[Path]:
        found = sorted(p for p in self.root.glob(pattern) if p.is_file())
        if not found:
            raise NlsrError(f"dataset '{self.dataset}' needs files matching '{self.root / pattern}', and "
                            f"there are none. The data directory is '{self.root}'; set another one with "
                            "--data-dir or NLSR_DATA_DIR")
        return found


Loader = Callable[[DataFiles], list[dict]]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered data set: its kind, what it is, the files it reads and its hub source."""

    name: str
    kind: str
    description: str
    loader: Loader
    files: tuple[str, ...] = ()
    hub: HubSource | None = None
    notes: str = ""

    def paths(self, root: str | os.PathLike) -> list[Path]:
        """The files this data set reads under the data directory ``root``, glob patterns expanded,
        sorted; files that do not exist are left out (loading names them in its error)."""
        root = Path(root)
        found: set[Path] = set()
        for relative in self.files:
            if any(c in relative for c in "*?["):
                found.update(p for p in root.glob(relative) if p.is_file())
            elif (root / relative).is_file():
                found.add(root / relative)
        return sorted(found)


DATASETS: Registry[DatasetSpec] = Registry("dataset")
"""The registered data sets; ``meta["kind"]`` is the spec's kind."""


def register_dataset(name: str, *, kind: str, description: str, files: Sequence[str] = (),
                     hub: HubSource | None = None, notes: str = "") -> Callable[[Loader], Loader]:
    """Register the decorated loader ``(files: DataFiles) -> list[dict]`` as data set ``name``.

    Args:
        kind: one of :data:`KINDS`; every record is checked against its schema on load.
        description: one line for ``nlsr ls`` and data cards.
        files: every file the loader reads, relative to the data directory (glob patterns
            allowed); their contents are hashed into the keys of the stages that load the set.
        hub: the hub source for ``source="hub"``, or None when the set exists only offline.
        notes: quirks of the offline copy worth knowing.
    """
    if kind not in KINDS:
        raise NlsrError(f"dataset {name!r}: kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    add = DATASETS.register(name, summary=description, kind=kind)

    def wrap(loader: Loader) -> Loader:
        add(DatasetSpec(name, kind, description, loader, tuple(files), hub, notes))
        return loader
    return wrap


def get_dataset(name: str) -> DatasetSpec:
    """The spec of data set ``name``; an unknown name is an error suggesting close matches."""
    return DATASETS.get(name)


def list_datasets(kind: str | None = None) -> list[DatasetSpec]:
    """All registered data sets (of one ``kind``, if given), sorted by name."""
    if kind is not None and kind not in KINDS:
        raise NlsrError(f"kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    return [DATASETS.get(n) for n in sorted(DATASETS) if kind is None or DATASETS.info(n).meta["kind"] == kind]


def check_records(records: Sequence[dict], kind: str, dataset: str) -> None:
    """Check every record against the schema of ``kind``.

    Raises:
        NlsrError: naming the data set, the record number (1-based) and the field.
    """
    schema = KINDS[kind]
    for index, record in enumerate(records, start=1):
        where = f"dataset '{dataset}', record {index}"
        for key, typ in schema.items():
            if key not in record:
                raise NlsrError(f"{where}: field '{key}' is missing (a {kind} record needs "
                                f"{', '.join(schema)})")
            value = record[key]
            if not isinstance(value, typ):
                raise NlsrError(f"{where}: field '{key}' should be {typ.__name__}, "
                                f"got {type(value).__name__}")
            if typ is str and not value.strip() and (kind, key) not in _MAY_BE_EMPTY:
                raise NlsrError(f"{where}: field '{key}' is empty")
        if kind == "xstest" and record["label"] not in XSTEST_LABELS:
            raise NlsrError(f"{where}: label {record['label']!r} is not one of {', '.join(XSTEST_LABELS)}")


def load_records(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None,
                 source: str = "local") -> list[dict]:
    """The records of data set ``name``, normalised to its kind's schema, in file order.

    Args:
        name: a registered data set (see :func:`list_datasets`).
        data_dir: the offline data directory; default ``$NLSR_DATA_DIR`` or ``shared/data``.
        limit: keep only the first ``limit`` records.
        source: ``"local"`` (the offline files) or ``"hub"`` (``datasets.load_dataset``; needs network).

    Raises:
        NlsrError: unknown name or source, missing file, malformed row (file, row and field named),
            no usable rows, bad ``limit``.
    """
    spec = get_dataset(name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise NlsrError(f"limit must be a positive number of records or None, got {limit!r}")
    if source == "local":
        root = resolve_data_dir(data_dir)
        records = spec.loader(DataFiles(root, name))
        where = ", ".join(str(root / f) for f in spec.files) or str(root)
    elif source == "hub":
        records = _load_hub(spec, limit)
        where = spec.hub.call if spec.hub else ""
    else:
        raise NlsrError(f"source {source!r} is unknown; use one of {', '.join(SOURCES)}")
    if not records:
        raise NlsrError(f"dataset '{name}' has no usable rows ({where})")
    records = records[:limit]
    check_records(records, spec.kind, name)
    return records


def split_records(records: Sequence[Any], parts: Sequence[int] | Sequence[float],
                  seed: int = 0) -> list[list[Any]]:
    """Disjoint random subsets of ``records``, reproducible from ``seed``.

    ``parts`` are either sizes (ints) or fractions (floats in [0, 1] summing to at most 1); with
    fractions the boundaries are ``round(len(records) * cumulative fraction)``, so fractions that
    sum to 1 use every record. The records are permuted once with ``random.Random(seed)`` and cut
    in order, so the same call always gives the same parts and parts never share a record.

    Returns:
        One list per part (the same objects as in ``records``, not copies).

    Raises:
        NlsrError: mixed or negative parts, fractions above 1, sizes adding up to more than there are.
    """
    parts = list(parts)
    if not parts:
        raise NlsrError("split_records needs at least one part size or fraction")
    if any(isinstance(x, bool) for x in parts):
        raise NlsrError(f"split parts must be sizes (ints) or fractions (floats), got {parts}")
    n = len(records)
    if all(isinstance(x, int) for x in parts):
        sizes = parts
        if any(x < 0 for x in sizes):
            raise NlsrError(f"split sizes must be non-negative, got {sizes}")
        if sum(sizes) > n:
            raise NlsrError(f"split sizes {' + '.join(map(str, sizes))} = {sum(sizes)} exceed the "
                            f"{n} records available")
    elif all(isinstance(x, float) for x in parts):
        if any(not 0.0 <= x <= 1.0 for x in parts) or sum(parts) > 1.0 + 1e-9:
            raise NlsrError(f"split fractions must be in [0, 1] and sum to at most 1, got {parts}")
        bounds, total = [0], 0.0
        for fraction in parts:
            total += fraction
            bounds.append(min(n, round(n * total)))
        sizes = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    else:
        raise NlsrError(f"split parts must be all sizes (ints) or all fractions (floats), got {parts}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    out, start = [], 0
    for size in sizes:
        out.append([records[i] for i in order[start:start + size]])
        start += size
    return out




def _load_hub(spec: DatasetSpec, limit: int | None) -> list[dict]:
    """Load ``spec`` from the Hugging Face hub (kept apart from the offline path; needs network)."""
    if spec.hub is None:
        raise NlsrError(f"dataset '{spec.name}' exists only as offline files ({', '.join(spec.files)}); "
                        "load it with source='local'")
    return load_hub(spec.hub, limit)


def dataset_files(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The offline files data set ``name`` reads (see :meth:`DatasetSpec.paths`)."""
    return get_dataset(name).paths(resolve_data_dir(data_dir))
