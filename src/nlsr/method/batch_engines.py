"""The engines of :func:`nlsr.method.batch.realign_batch`: where the repairs run.

* ``local``: a pool of ``workers`` processes (each loads the reference and masks once, at start)
  or threads (sharing the caller's), fed a bounded window of fine-tunes at a time.
* ``ray``: the same work as Ray tasks; the reference and masks are put in the object store once
  (``ray.put``) and each Ray worker process deserializes them once, for all its tasks.

Both run :func:`nlsr.method.batch.run_item` per fine-tune, so their outputs are the same files.
No queue or scheduler of our own: the pool's and Ray's; we only keep at most two tasks per worker
in flight, so that memory stays bounded and a stopped batch leaves little work started.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from nlsr.errors import NlsrError
from nlsr.method.batch_item import BatchItem, BatchJob, BatchResult, Shared, load_shared, one_line, run_item

_WORKER: dict = {}        # in a worker process: {"shared": Shared, "job": BatchJob}


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def _init_process(job: BatchJob, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER.update(shared=load_shared(job), job=job)


def _run_in_process(item: BatchItem) -> BatchResult:
    return run_item(_WORKER["shared"], _WORKER["job"], item)


def run_local(shared: Shared | None, job: BatchJob, items: list[BatchItem], workers: int,
              pool: str = "thread") -> Iterator[BatchResult]:
    """Repair ``items`` on a local pool of ``workers`` processes (each loads ``job``'s reference and masks
    once; ``shared`` is not used) or threads (sharing ``shared``); results as they finish."""
    if pool == "thread":
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(_threads_per_worker(workers))
        executor = ThreadPoolExecutor(workers)
        try:
            yield from _as_finished(executor, lambda item: executor.submit(run_item, shared, job, item), items,
                                    2 * workers)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(before)
        return
    # spawn: a fresh interpreter per worker (forking a process that has run torch/BLAS threads can hang)
    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_process,
                                   initargs=(job, _threads_per_worker(workers)))
    try:
        yield from _as_finished(executor, lambda item: executor.submit(_run_in_process, item), items, 2 * workers)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _as_finished(executor, submit, items: list[BatchItem], window: int) -> Iterator[BatchResult]:
    pending: dict[Future, BatchItem] = {}
    queue = iter(items)
    for item in queue:
        pending[submit(item)] = item
        if len(pending) >= window:
            break
    while pending:
        finished, _ = wait(pending, return_when=FIRST_COMPLETED)
        for future in finished:
            item = pending.pop(future)
            try:
                result = future.result()
            except BrokenProcessPool as err:
                raise NlsrError(f"a worker process died while repairing '{item.name}' ({one_line(err)}); "
                                "out of memory? Run again with fewer --workers: finished outputs are kept") from err
            yield result
            following = next(queue, None)
            if following is not None:
                pending[submit(following)] = following


# ---- Ray -------------------------------------------------------------------------------------

_RAY_CACHE: dict = {}     # in a Ray worker process: the shared object of the last batch, by object id


def _ray_run(handles: list, job: BatchJob, item: BatchItem) -> BatchResult:
    """One Ray task. ``handles`` wraps the object ref so that Ray passes the ref, not the value:
    the worker process fetches the reference and masks once and keeps them for later tasks."""
    import ray

    key = handles[0].hex()
    if key not in _RAY_CACHE:
        _RAY_CACHE.clear()
        _RAY_CACHE[key] = ray.get(handles[0])
    return run_item(_RAY_CACHE[key], job, item)


def run_ray(shared: Shared, job: BatchJob, items: list[BatchItem], workers: int,
            address: str | None = None) -> Iterator[BatchResult]:
    """Repair ``items`` as Ray tasks (one CPU each) on the running Ray instance, the cluster at
    ``address``, or a local instance of ``workers`` CPUs started (and stopped) here."""
    try:
        import ray
    except ImportError:
        raise NlsrError("--engine ray needs Ray: pip install 'nlsr[ray]' (or use --engine local)") from None
    started = False
    if not ray.is_initialized():
        src = str(Path(__file__).resolve().parents[2])       # so that Ray's workers import this nlsr
        path = os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])])
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
        started = True
    pending: dict = {}
    try:
        handle = ray.put(shared)
        task = ray.remote(num_cpus=1, max_retries=0)(_ray_run)
        window = 2 * max(workers, int(ray.cluster_resources().get("CPU", workers)))
        queue = iter(items)
        for item in queue:
            pending[task.remote([handle], job, item)] = item
            if len(pending) >= window:
                break
        while pending:
            finished, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(finished[0])
            try:
                result = ray.get(finished[0])
            except Exception as err:  # noqa: BLE001 - a crashed task fails its fine-tune, not the batch
                result = BatchResult(item.name, "failed", error=f"the Ray task failed: {one_line(err)[:500]}")
            yield result
            following = next(queue, None)
            if following is not None:
                pending[task.remote([handle], job, following)] = following
    finally:
        for ref in pending:
            ray.cancel(ref)
        if started:
            ray.shutdown()
