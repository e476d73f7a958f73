"""One item of a batch repair: where the fine-tunes come from, what every item shares (the reference
and the masks, loaded once), and the repair of one fine-tune exactly as ``nlsr realign`` does it.
Used by :mod:`nlsr.method.batch` and by the engines of :mod:`nlsr.method.batch_engines`."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nlsr.errors import NlsrError
from nlsr.method import DEFAULT_TRANSPLANT

LOG_NAME = "batch.jsonl"
SETTINGS_NAME = "batch.json"
REPORT_NAME = "realign_report.json"
ADAPTER_CONFIG = "adapter_config.json"
ENGINES = ("local", "ray")
POOLS = ("process", "thread")
STATUSES = ("repaired", "unchanged", "failed")
_RESERVED = {LOG_NAME, SETTINGS_NAME}
# realign() options a batch takes, with nlsr realign's defaults
OPTION_DEFAULTS = {"select": "paper", "transplant": DEFAULT_TRANSPLANT, "threshold": None, "p_base": 0.5,
                   "epsilon": 0.2, "seed": 0, "min_origin_cosine": 0.5, "granularity": "entry",
                   "allow_base_mismatch": False, "allow_mask_mismatch": False}


@dataclass(frozen=True)
class BatchItem:
    """One fine-tune of a batch: its output name and where it is."""

    name: str
    path: Path


@dataclass
class BatchResult:
    """What happened to one fine-tune (one line of ``batch.jsonl``).

    ``relative_change``: ``||ΔW_out - ΔW_in||_F / ||ΔW_in||_F`` over all modules of the adapter (from
    ``r x r`` Gram matrices in float32, summed in float64; about 1e-3 absolute accuracy), None for
    model directories and failures. ``seconds``: wall time of the repair; ``cpu_seconds``: CPU time of
    the thread that ran it (its own work when each worker computes on one thread, as when there are
    as many workers as cores). ``resumed``: the output was already there from an earlier run.
    """

    name: str
    status: str
    modules: int | None = None
    modules_repaired: int | None = None
    relative_change: float | None = None
    seconds: float | None = None
    cpu_seconds: float | None = None
    error: str | None = None
    resumed: bool = False
    out: str | None = field(default=None, compare=False)

    def record(self) -> dict:
        row = asdict(self)
        row.pop("out")
        if not self.resumed:
            row.pop("resumed")
        if self.error is None:
            row.pop("error")
        return row


@dataclass(frozen=True)
class BatchJob:
    """Everything a worker needs besides the loaded reference and masks (small, picklable)."""

    kind: str                       # "adapter" or "model"
    reference: str                  # paths as given (they go into each report, as nlsr realign writes them)
    masks: str
    out: str
    options: dict
    base: str | None = None
    rebase: str | None = None
    allow_pickle: bool = False
    force: bool = False
    masks_checked: bool = False     # the masks were checked against the reference once, up front


@dataclass
class Shared:
    """What every repair reads: the reference, the masks (and base or rebase), loaded once."""

    reference: object               # LoraAdapter or ModelDir
    masks: object                   # SafetyMasks
    base: object | None = None      # ModelDir (model directories)
    rebase: object | None = None    # LoraAdapter (neuron granularity, adapters)
    masked_reference: dict | None = None   # entry masks: the reference's masked factors, made once


# ---- inputs ----------------------------------------------------------------------------------

def read_sources(source: str | os.PathLike | Iterable[BatchItem]) -> list[BatchItem]:
    """The fine-tunes of a batch: a folder with one fine-tune per subfolder (hidden ones skipped),
    a JSONL manifest of ``{"name": ..., "path": ...}`` lines (relative paths are relative to the
    manifest's folder), or items already made. Raises :class:`NlsrError` for a missing or empty
    source, a bad manifest line, or names that repeat or cannot be folder names."""
    if not isinstance(source, (str, os.PathLike)):
        items = list(source)
    else:
        path = Path(source)
        if not path.exists():
            raise NlsrError(f"--adapters '{path}' does not exist; give a folder with one adapter per "
                            'subfolder, or a JSONL manifest of {"name": ..., "path": ...} lines')
        items = _read_manifest(path) if path.is_file() else [
            BatchItem(p.name, p) for p in sorted(path.iterdir(), key=lambda p: p.name)
            if p.is_dir() and not p.name.startswith(".")]
        if not items:
            what = "manifest" if path.is_file() else "folder"
            raise NlsrError(f"--adapters {what} '{path}' holds no fine-tunes; give a folder with one "
                            'adapter per subfolder, or a JSONL manifest of {"name": ..., "path": ...} lines')
    seen: dict[str, BatchItem] = {}
    for item in items:
        if not item.name or "/" in item.name or "\\" in item.name or item.name.startswith(".") \
                or item.name in _RESERVED:
            raise NlsrError(f"--adapters: '{item.name}' cannot be an output name (it becomes OUT/NAME/: "
                            f"no path separators, no leading dot, not {' or '.join(sorted(_RESERVED))})")
        if item.name in seen:
            raise NlsrError(f"--adapters: the name '{item.name}' appears twice ('{seen[item.name].path}' "
                            f"and '{item.path}'); names must be unique")
        seen[item.name] = item
    return items


def _read_manifest(path: Path) -> list[BatchItem]:
    from nlsr.data.readers import jsonl_rows

    items = []
    try:
        for row in jsonl_rows(path):
            name, target = row.data.get("name"), row.data.get("path")
            if not isinstance(name, str) or not isinstance(target, str) or not target:
                raise NlsrError(f"{path}, row {row.number}: lacks a string \"name\" and \"path\"")
            target = Path(target)
            items.append(BatchItem(name, target if target.is_absolute() else path.parent / target))
    except NlsrError as err:
        raise NlsrError(f"--adapters manifest: {err}; each line is {{\"name\": ..., \"path\": ...}}") from None
    return items


def reference_kind(reference: str | os.PathLike) -> str:
    """``model`` for a model directory (config.json, no adapter_config.json), else ``adapter``."""
    path = Path(reference)
    return "model" if path.is_dir() and not (path / ADAPTER_CONFIG).is_file() \
        and (path / "config.json").is_file() else "adapter"


# ---- one fine-tune ---------------------------------------------------------------------------

def load_shared(job: BatchJob) -> Shared:
    """Load the reference, masks (and base or rebase) of ``job``."""
    from nlsr.method.masks import load_masks

    masks = load_masks(job.masks)
    if job.kind == "model":
        from nlsr.weights.model_dirs import ModelDir

        return Shared(ModelDir(job.reference, "--reference"), masks, base=ModelDir(job.base, "--base"))
    from nlsr.weights.adapters import load_adapter

    rebase = load_adapter(job.rebase, job.allow_pickle) if job.rebase else None
    shared = Shared(load_adapter(job.reference, job.allow_pickle), masks, rebase=rebase)
    if job.masks_checked:
        _mask_reference(shared, job)
    return shared


def _mask_reference(shared: Shared, job: BatchJob) -> None:
    """Entry masks: make the reference's masked factors once for every repair (masks already checked)."""
    if job.kind == "adapter" and job.options["granularity"] == "entry":
        from nlsr.method.realign import masked_reference_of

        shared.masked_reference = masked_reference_of(shared.reference, shared.masks)


def check_shared(shared: Shared, job: BatchJob, mask_reference: bool = True) -> None:
    """The checks of the masks against the reference that every repair would repeat (adapters):
    done once here, so that each repair can skip them (``masks_checked``); then (``mask_reference``:
    the repairs run with this ``shared``) the reference's masked factors are made, once."""
    if job.kind != "adapter":
        return
    from nlsr.method.checks import check_entry_granularity, check_masks, check_neuron_masks
    from nlsr.weights.adapters import fingerprint

    allow = job.options["allow_mask_mismatch"]
    if job.options["granularity"] == "entry":
        check_entry_granularity(shared.masks)
        check_masks(shared.masks, shared.reference, allow_mismatch=allow)
    else:
        check_neuron_masks(shared.masks, {n: f.B.shape[0] for n, f in shared.reference},
                           {} if allow else fingerprint(shared.reference), f"'{job.reference}'", allow)
    if mask_reference:
        _mask_reference(shared, job)


def repair_adapter(shared: Shared, job: BatchJob, item: BatchItem):
    """Repair one adapter as ``nlsr realign`` does and write ``OUT/NAME/``; returns the
    :class:`~nlsr.method.realign.RealignResult` and the input adapter (raises on a bad input)."""
    from nlsr.method.checks import check_template
    from nlsr.method.realign import realign, write_repaired
    from nlsr.weights.adapters import load_adapter
    from nlsr.weights.records import recorded_template

    o = job.options
    finetuned = load_adapter(item.path, job.allow_pickle, dtype=None)
    template = check_template(shared.masks.metadata.get("template"), recorded_template(item.path),
                              o.get("template"), f"the fine-tuned adapter '{item.name}'")
    rule = dict(select=o["select"], threshold=o["threshold"], p_base=o["p_base"], epsilon=o["epsilon"],
                seed=o["seed"], check_base=not o["allow_base_mismatch"],
                allow_mask_mismatch=o["allow_mask_mismatch"] or job.masks_checked)
    if o["granularity"] == "entry":
        result = realign(shared.reference, finetuned, shared.masks, transplant=o["transplant"],
                         min_origin_cosine=o["min_origin_cosine"], granularity="entry",
                         masked_reference=shared.masked_reference, **rule)
    else:
        result = realign(shared.reference, finetuned, shared.masks, rebase=shared.rebase,
                         granularity="neuron", **rule)
    write_repaired(result, Path(job.out) / item.name, force=job.force, template=template,
                   reference=job.reference, finetuned=item.path, masks=job.masks)
    return result, finetuned


def repair_model_dir(shared: Shared, job: BatchJob, item: BatchItem):
    """Repair one full fine-tune as ``nlsr realign --granularity neuron --base`` does."""
    from nlsr.method.realign import realign_model_dir
    from nlsr.weights.model_dirs import ModelDir

    o = job.options
    return realign_model_dir(shared.reference, ModelDir(item.path, f"--adapters '{item.name}'"), shared.base,
                             shared.masks, Path(job.out) / item.name, select=o["select"],
                             threshold=o["threshold"], p_base=o["p_base"], epsilon=o["epsilon"], seed=o["seed"],
                             check_base=not o["allow_base_mismatch"],
                             allow_mask_mismatch=o["allow_mask_mismatch"], force=job.force)


def run_item(shared: Shared, job: BatchJob, item: BatchItem) -> BatchResult:
    """Repair one fine-tune; every error becomes a ``failed`` result with a one-line reason."""
    start, cpu = time.perf_counter(), time.thread_time()
    try:
        change = None
        if job.kind == "model":
            result = repair_model_dir(shared, job, item)
        else:
            result, _ = repair_adapter(shared, job, item)
            change = result.change.get("relative_change")
    except Exception as err:  # noqa: BLE001 - a bad fine-tune must not stop the batch
        return BatchResult(item.name, "failed", seconds=round(time.perf_counter() - start, 3),
                           cpu_seconds=round(time.thread_time() - cpu, 3), error=one_line(err))
    repaired = sum(d.repaired for d in result.decisions)
    return BatchResult(item.name, "repaired" if repaired else "unchanged", modules=len(result.decisions),
                       modules_repaired=repaired, relative_change=change,
                       seconds=round(time.perf_counter() - start, 3), cpu_seconds=round(time.thread_time() - cpu, 3),
                       out=str(Path(job.out) / item.name))


def one_line(err: BaseException) -> str:
    """An error as one line: the message of an :class:`NlsrError`, else its type and message."""
    if isinstance(err, NlsrError):
        text = str(err)
    elif isinstance(err, OSError):
        text = f"cannot use '{err.filename}': {err.strerror or err}" if err.filename else f"OSError: {err}"
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(text.split()) or type(err).__name__




# ---- the batch -------------------------------------------------------------------------------
