"""``nlsr realign-batch``: repair every fine-tune of a folder or manifest against one reference.

A thin wrapper over :func:`nlsr.method.batch.realign_batch`, which checks the options; the paths and
the source are checked here before torch is imported; a live progress bar (on a terminal) shows
adapters per hour; one summary line at the end, exit status 1 when any fine-tune failed (each is in
``OUT/batch.jsonl`` with its reason).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from nlsr.cli.common import (
    AllowBaseMismatch,
    AllowMaskMismatch,
    AllowPickle,
    Epsilon,
    Granularity,
    MinOriginCosine,
    PBase,
    Seed,
    Select,
    Threshold,
    Transplant,
    errors_to_exit,
    require_file,
)
from nlsr.errors import NlsrError
from nlsr.method import DEFAULT_TRANSPLANT


@errors_to_exit
def realign_batch(
    reference: Annotated[Path, typer.Option(help="The reference adapter (or model) directory.")],
    masks: Annotated[Path, typer.Option(help="Mask file from `nlsr identify`.")],
    adapters: Annotated[Path, typer.Option(
        help='A folder with one fine-tuned adapter (or model directory) per subfolder, or a JSONL manifest '
             'of {"name": ..., "path": ...} lines.')],
    out: Annotated[Path, typer.Option(help="Output folder: OUT/NAME/ per fine-tune, OUT/batch.jsonl.")],
    engine: Annotated[str, typer.Option(help="local (a pool of processes or threads) or ray.")] = "local",
    workers: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="Parallel repairs (default: the CPUs, at most 4).")] = None,
    pool: Annotated[str, typer.Option(
        help="Local engine: thread (default: no start-up, one copy of the reference) or process.")] = "thread",
    ray_address: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Ray engine: the cluster to join (default: a local Ray instance).")] = None,
    select: Select = "paper",
    transplant: Transplant = DEFAULT_TRANSPLANT,
    threshold: Threshold = None,
    p_base: PBase = 0.5,
    epsilon: Epsilon = 0.2,
    seed: Seed = 0,
    min_origin_cosine: MinOriginCosine = 0.5,
    granularity: Granularity = "entry",
    base: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Model directories: the model both updates are measured from.")] = None,
    rebase: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="Neuron granularity, adapters: the adapter merged into the fine-tunes' base.")] = None,
    allow_base_mismatch: AllowBaseMismatch = False,
    allow_mask_mismatch: AllowMaskMismatch = False,
    allow_pickle: AllowPickle = False,
    force: Annotated[bool, typer.Option(
        "--force", help="Repair every fine-tune again, replacing outputs (default: skip finished ones).")] = False,
) -> None:
    """Repair many fine-tunes against one reference and masks (loaded once); resumable."""
    if not reference.is_dir():
        raise NlsrError(f"--reference '{reference}' {'is a file' if reference.exists() else 'does not exist'}; "
                        "give the reference adapter (or model) directory")
    require_file(masks, "mask file", "make one with `nlsr identify`")
    from nlsr.method.batch import read_sources

    items = read_sources(adapters)              # a bad source: one line, exit 2, nothing written

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from nlsr.method.batch import realign_batch as run

    # the options are checked, and the reference and masks loaded, in this call (before the progress bar)
    results = run(reference, masks, items, out, engine=engine, workers=workers, pool=pool,
                  ray_address=ray_address, base=base, rebase=rebase, allow_pickle=allow_pickle, force=force,
                  select=select, transplant=transplant, threshold=threshold, p_base=p_base, epsilon=epsilon,
                  seed=seed, min_origin_cosine=min_origin_cosine, granularity=granularity,
                  allow_base_mismatch=allow_base_mismatch, allow_mask_mismatch=allow_mask_mismatch)
    counts = {"repaired": 0, "unchanged": 0, "failed": 0}
    resumed, start = 0, time.perf_counter()
    console = Console(stderr=True)
    with Progress(TextColumn("realign-batch"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]} adapters/h, {task.fields[failed]} failed"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("", total=len(items), rate="-", failed=0)
        for result in results:
            counts[result.status] += 1
            resumed += result.resumed
            if result.status == "failed":
                console.print(f"failed: {result.name}: {result.error}", markup=False, highlight=False)
            processed = sum(counts.values()) - resumed
            rate = processed / max(time.perf_counter() - start, 1e-9) * 3600
            progress.update(task, advance=1, rate=f"{rate:,.0f}" if processed else "-", failed=counts["failed"])
    seconds = time.perf_counter() - start
    processed = sum(counts.values()) - resumed
    typer.echo(f"{counts['repaired']} repaired, {counts['unchanged']} unchanged, {counts['failed']} failed of "
               f"{len(items)} fine-tunes ({resumed} done earlier, skipped; {processed} in {seconds:.1f} s, "
               f"{processed / max(seconds, 1e-9) * 3600:,.0f} adapters/hour) -> {out}"
               + (f"; the failures and their reasons are in {out / 'batch.jsonl'}" if counts["failed"] else ""))
    if counts["failed"]:
        raise typer.Exit(1)
