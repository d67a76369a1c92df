"""Where blocks are polygonised: worker processes, or threads of the calling process.

GDAL's polygoniser and the Python that turns its output into polygons hold the GIL, so threads barely
overlap; worker processes do. They are started with ``spawn`` (a fresh interpreter, safe in a caller with
torch loaded and threads running, where ``fork`` is not), one pool per call, shut down when the blocks are
done or the caller stops early. Each costs about half a second of CPU to start and ~130 MB, so rasters under
:data:`PROCESS_MIN_PIXELS`, ``workers=1`` and daemonic processes (which may not have children: a dask
worker's, for one) use threads. Calls running at once in one process (scenes finishing together) share
:data:`MAX_PROCESSES` worker processes; a call that finds none free uses threads.

Like every ``spawn`` pool, the workers import the caller's main module: a script that vectorises at import
time must do it under ``if __name__ == "__main__":`` (or pass ``workers=1``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from geoseg.errors import WorkerError
from geoseg.gis.vectorize.plan import Plan

log = logging.getLogger(__name__)

T = TypeVar("T")

# Measured on 2 cores: 4096^2 pixels gain 10 % for 30 % more memory (two workers' interpreters), 6144^2
# gain 23 % for 12 % more, 8192^2 gain 38 % with less memory (the pool is gone before the last row is merged).
PROCESS_MIN_PIXELS = 32 * 2**20


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


MAX_PROCESSES = _cores()  # worker processes of all calls in this process together
_free = MAX_PROCESSES
_free_lock = threading.Lock()


def use_processes(plan: Plan, workers: int) -> bool:
    """Whether ``workers`` worker processes, rather than threads, suit ``plan``'s blocks (see the module)."""
    if workers < 2 or plan.rows * plan.cols < 2 or plan.width * plan.height < PROCESS_MIN_PIXELS:
        return False
    if multiprocessing.current_process().daemon:
        log.debug("daemonic process: polygonising with threads, not worker processes")
        return False
    return True


@contextlib.contextmanager
def _reserve(workers: int) -> Iterator[int]:
    """Up to ``workers`` of the :data:`MAX_PROCESSES` worker processes for the duration: at least 2, or 0
    (one process would only add its start to the work of one thread)."""
    global _free
    with _free_lock:
        got = min(workers, _free)
        got = got if got >= 2 else 0
        _free -= got
    try:
        yield got
    finally:
        with _free_lock:
            _free += got


class BlockPool:
    """An executor for block work, and the one place where a dead worker process becomes a clear error."""

    def __init__(self, executor: Executor, plan: Plan):
        self.executor = executor
        self.plan = plan

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        try:
            return self.executor.submit(fn, *args)
        except BrokenProcessPool as exc:
            raise self._died(exc) from None

    def result(self, future: Future[T]) -> T:
        try:
            return future.result()
        except BrokenProcessPool as exc:
            raise self._died(exc) from None

    def _died(self, exc: BaseException) -> WorkerError:
        return WorkerError(
            f"{self.plan.path}: a vectorisation worker process died ({exc}); if memory ran out, lower "
            "block_size or workers; a script that vectorises at import time must do it under "
            "`if __name__ == \"__main__\":`; workers=1 polygonises in this process")


@contextlib.contextmanager
def block_executor(plan: Plan, workers: int) -> Iterator[BlockPool]:
    """A pool of ``workers`` processes (:func:`use_processes`, as many as are free) or threads.

    On exit, blocks not started are cancelled and running ones awaited, so no worker outlives the call.

    Raises:
        WorkerError: (from the pool's ``submit``/``result``) a worker process died.
    """
    workers = max(1, min(workers, plan.rows * plan.cols))
    with _reserve(workers if use_processes(plan, workers) else 0) as processes:
        executor: Executor | None = _process_pool(processes) if processes else None
        if executor is None:
            executor = ThreadPoolExecutor(workers, thread_name_prefix="geoseg-vectorize")
        try:
            yield BlockPool(executor, plan)
        finally:
            executor.shutdown(wait=True, cancel_futures=True)


def _process_pool(workers: int) -> ProcessPoolExecutor | None:
    try:
        executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker)
    except (OSError, ImportError, NotImplementedError) as exc:  # e.g. no working sem_open in a sandbox
        log.warning("cannot start vectorisation worker processes (%s): polygonising with threads", exc)
        return None
    log.debug("polygonising blocks in %d worker processes", workers)
    return executor


def _init_worker() -> None:
    # Ctrl-C is the caller's to handle: it stops submitting and shuts the pool down; a worker interrupted
    # mid-block would only add a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
