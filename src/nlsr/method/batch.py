"""Repair many fine-tunes against one reference and one set of masks: fine-tuning as a service.

One aligned model, one reference, one masks file, and many customer adapters (or full fine-tunes).
:func:`realign_batch` loads and checks the reference and the masks once, then repairs each fine-tune
exactly as ``nlsr realign`` does (:func:`repair_adapter`: the same loading, :func:`~nlsr.method.realign.realign`
or :func:`~nlsr.method.realign.realign_model_dir`, report and :func:`~nlsr.weights.adapters.save_adapter`)
into ``OUT/NAME/``, and yields one :class:`BatchResult` per fine-tune as it finishes. A fine-tune
that cannot be repaired (corrupt file, other base or rank, unrelated to the reference) is a
``failed`` result with a one-line reason; the rest goes on.

``OUT/batch.jsonl`` gets one line per result as it finishes; ``OUT/batch.json`` records the
settings. Every ``OUT/NAME/`` appears atomically (complete or not at all), so a run that was killed
is finished by running it again: names whose output exists are skipped (``resumed``), temporary
folders of the killed run are removed, the rest is repaired. The settings must be the same (else
``force``, which repairs everything again).

Engines (:mod:`nlsr.method.batch_engines`): ``local``, a pool of worker threads (``pool="thread"``, the
default: no start-up, one copy of the reference and masks, half the memory; within 6% of processes
for the default ``block`` form in ``benchmarks/service_bench.py`` on 2 cores, 9,730 against 10,268
adapters/hour, but slower for ``factor``, 7,786 against 9,449: ``results/service_bench*.md``) or
processes; and
``ray``, the same work as Ray tasks with the reference and masks put in the object store once.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from nlsr.errors import NlsrError
from nlsr.method.batch_item import (  # noqa: F401 (the batch API)
    _RESERVED,
    ADAPTER_CONFIG,
    ENGINES,
    LOG_NAME,
    OPTION_DEFAULTS,
    POOLS,
    REPORT_NAME,
    SETTINGS_NAME,
    STATUSES,
    BatchItem,
    BatchJob,
    BatchResult,
    Shared,
    _read_manifest,
    check_shared,
    load_shared,
    one_line,
    read_sources,
    reference_kind,
    repair_adapter,
    repair_model_dir,
    run_item,
)


def make_job(reference, masks, out, *, base=None, rebase=None, allow_pickle=False, force=False,
             **options) -> BatchJob:
    """Check the options (names as ``nlsr realign``'s) and build the :class:`BatchJob`."""
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise TypeError(f"realign_batch() got unknown options {unknown}; known: {sorted(OPTION_DEFAULTS)}")
    opts = {**OPTION_DEFAULTS, **options}
    from nlsr.method import SELECTION_RULES, TRANSPLANTS
    from nlsr.method.masks import GRANULARITIES
    from nlsr.method.select import check_rule

    SELECTION_RULES.check(opts["select"], "--select")
    check_rule(opts["select"], opts["threshold"], opts["p_base"], opts["epsilon"])
    TRANSPLANTS.check(opts["transplant"], "--transplant")
    if opts["granularity"] not in GRANULARITIES:
        raise NlsrError(f"unknown --granularity '{opts['granularity']}'; use one of {', '.join(GRANULARITIES)}")
    if not opts["min_origin_cosine"] <= 1:
        raise NlsrError(f"--min-origin-cosine is a cosine, at most 1 (got {opts['min_origin_cosine']}); 0 "
                        "disables it")
    kind = reference_kind(reference)
    if kind == "model":
        if opts["granularity"] != "neuron":
            raise NlsrError(f"--reference '{reference}' is a model directory: full fine-tunes are repaired at "
                            "neuron granularity (--granularity neuron --base DIR)")
        if base is None:
            raise NlsrError("model directories need --base DIR, the model both updates are measured from")
        if rebase is not None:
            raise NlsrError("--rebase is for adapters; for model directories give --base")
    else:
        if base is not None:
            raise NlsrError("--base is for model directories; adapters record their base in adapter_config.json")
        if rebase is not None and opts["granularity"] != "neuron":
            raise NlsrError("--base and --rebase apply to --granularity neuron only")
    return BatchJob(kind, str(reference), str(masks), str(out), opts, base=None if base is None else str(base),
                    rebase=None if rebase is None else str(rebase), allow_pickle=allow_pickle, force=force)


def _settings(job: BatchJob) -> dict:
    return {"reference": job.reference, "masks": job.masks, "base": job.base, "rebase": job.rebase,
            "allow_pickle": job.allow_pickle, **job.options}


def prepare_out(job: BatchJob, items: list[BatchItem]) -> set[str]:
    """Create or reopen ``OUT``: refuse a folder of another batch (other settings) or of something
    else unless ``force``, remove the temporary folders of a killed run, and return the names whose
    output is complete (skipped unless ``force``)."""
    out = Path(job.out)
    settings_file = out / SETTINGS_NAME
    if out.exists() and not out.is_dir():
        raise NlsrError(f"--out '{out}' is a file; give a folder for the repaired fine-tunes")
    if not out.exists():
        if not out.parent.is_dir():
            raise NlsrError(f"the folder '{out.parent}' for --out '{out}' does not exist; create it first")
    elif settings_file.is_file():
        try:
            recorded = json.loads(settings_file.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded != _settings(job) and not job.force:
            changed = sorted(k for k in _settings(job) if not isinstance(recorded, dict)
                             or recorded.get(k) != _settings(job)[k])
            raise NlsrError(f"--out '{out}' holds a batch made with other settings ({', '.join(changed)}); "
                            "give another --out, or pass --force to repair every fine-tune again")
    elif any(out.iterdir()) and not job.force:
        raise NlsrError(f"--out '{out}' exists and is not the output of a batch (no {SETTINGS_NAME}); give "
                        "another --out, or pass --force to write into it")
    from nlsr.io import check_writable

    out.mkdir(exist_ok=True)
    check_writable(out)
    names = {item.name for item in items}
    for entry in out.iterdir():     # what a killed run left: .NAME.partial-XXXX / .NAME.old-PID
        if entry.name.startswith(".") and (".partial-" in entry.name or ".old-" in entry.name):
            stem = entry.name[1:].split(".partial-")[0].split(".old-")[0]
            if stem in names:
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    if job.force:
        (out / LOG_NAME).unlink(missing_ok=True)
    settings_file.write_text(json.dumps(_settings(job), indent=2) + "\n")
    if job.force:
        return set()
    return {n for n in names if (out / n / REPORT_NAME).is_file()}


def _logged(out: Path) -> dict[str, dict]:
    """The last line per name of ``batch.jsonl`` (a torn last line of a killed run is ignored)."""
    rows = {}
    try:
        text = (out / LOG_NAME).read_text(encoding="utf-8")
    except OSError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "name" in row:
            rows[row["name"]] = row
    return rows


def _append(out: Path, result: BatchResult) -> None:
    log = out / LOG_NAME
    with open(log, "a+", encoding="utf-8") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell():
            handle.seek(handle.tell() - 1)
            if handle.read(1) != "\n":          # a line torn by a kill: end it
                handle.write("\n")
        handle.write(json.dumps(result.record()) + "\n")
        handle.flush()


def _resumed(out: Path, name: str, logged: dict) -> BatchResult:
    row = logged.get(name)
    if row and row.get("status") in ("repaired", "unchanged"):
        fields = {k: row.get(k) for k in ("modules", "modules_repaired", "relative_change", "seconds", "cpu_seconds")}
        return BatchResult(name, row["status"], resumed=True, out=str(out / name), **fields)
    summary = json.loads((out / name / REPORT_NAME).read_text())["summary"]
    return BatchResult(name, "repaired" if summary["repaired"] else "unchanged", modules=summary["modules"],
                       modules_repaired=summary["repaired"], resumed=True, out=str(out / name))


def realign_batch(reference: str | os.PathLike, masks: str | os.PathLike,
                  sources: str | os.PathLike | Iterable[BatchItem], out: str | os.PathLike, *,
                  engine: str = "local", workers: int | None = None, pool: str = "thread",
                  ray_address: str | None = None, base: str | os.PathLike | None = None,
                  rebase: str | os.PathLike | None = None, allow_pickle: bool = False, force: bool = False,
                  **options) -> Iterator[BatchResult]:
    """Repair every fine-tune of ``sources`` against ``reference`` and ``masks`` into ``out/NAME/``.

    Args:
        reference, masks: the reference adapter (or model directory) and its masks file.
        sources: a folder with one fine-tune per subfolder, a JSONL manifest, or :class:`BatchItem`s.
        out: the output folder (created; its parent must exist).
        engine: ``local`` or ``ray``. workers: parallel repairs (default: the CPUs, at most 4).
            pool: ``thread`` or ``process`` (local engine). ray_address: a Ray cluster to join
            (default: a local Ray instance, started and stopped here, unless one is running).
        base: model directories: the model both updates are measured from. rebase: neuron
            granularity adapters: the adapter merged into the fine-tunes' base.
        options: ``nlsr realign``'s (:data:`OPTION_DEFAULTS`): select, transplant, threshold,
            p_base, epsilon, seed, min_origin_cosine, granularity, allow_base_mismatch,
            allow_mask_mismatch.

    Returns:
        An iterator of one :class:`BatchResult` per fine-tune, in the order they finish (first the
        resumed ones); each is in ``out/batch.jsonl`` before it is yielded. Bad inputs of the batch
        itself (the source, reference, masks, options, ``out``) raise :class:`NlsrError` here, in
        the call, before anything is written; a bad fine-tune is a ``failed`` result.
    """
    if engine not in ENGINES:
        raise NlsrError(f"unknown --engine '{engine}'; use one of {', '.join(ENGINES)}")
    if pool not in POOLS:
        raise NlsrError(f"unknown pool '{pool}'; use one of {', '.join(POOLS)}")
    if workers is not None and workers < 1:
        raise NlsrError(f"--workers must be at least 1 (got {workers})")
    job = make_job(reference, masks, out, base=base, rebase=rebase, allow_pickle=allow_pickle, force=force,
                   **options)
    items = read_sources(sources)
    shared = load_shared(job)
    check_shared(shared, job, mask_reference=not (engine == "local" and pool == "process"))  # workers mask their own
    job = BatchJob(**{**job.__dict__, "masks_checked": job.kind == "adapter"})
    done = prepare_out(job, items)
    return _results(shared, job, items, done, engine, pool, workers, ray_address)


def _results(shared: Shared, job: BatchJob, items: list[BatchItem], done: set[str], engine: str, pool: str,
             workers: int | None, ray_address: str | None) -> Iterator[BatchResult]:
    """The resumed results, then the repairs on the engine, each logged before it is yielded."""
    from nlsr.method.batch_engines import run_local, run_ray

    out_dir = Path(job.out)
    logged = _logged(out_dir)
    for item in items:
        if item.name in done:
            result = _resumed(out_dir, item.name, logged)
            if logged.get(item.name, {}).get("status") != result.status:
                _append(out_dir, result)
            yield result
    todo = [item for item in items if item.name not in done]
    if not todo:
        return
    workers = max(1, min(workers or min(os.cpu_count() or 1, 4), len(todo)))
    if engine == "ray":
        results = run_ray(shared, job, todo, workers, ray_address)
    elif pool == "process":
        del shared          # each worker process loads its own copy: free this one
        results = run_local(None, job, todo, workers, pool)
    else:
        results = run_local(shared, job, todo, workers, pool)
    for result in results:
        _append(out_dir, result)
        yield result
