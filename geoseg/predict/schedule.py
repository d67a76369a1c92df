"""Who runs the units: this process's threads (the default, no setup) or a dask.distributed cluster.

Both schedulers take the same plain units and call the same :func:`~geoseg.predict.engine.run_unit` and
:func:`~geoseg.predict.finish.finish_scene`; they differ only in where those calls happen.

- :class:`LocalScheduler`: a thread pool in this process sharing one model runtime, with per-chip
  progress. A plain executor does this job better than a Dask graph: units are submitted as they are
  planned, each scene is finished as soon as its own units are done, and one failing scene does not stop
  the others.
- :class:`DaskScheduler`: a ``distributed.Client`` (an address such as ``tcp://host:8786``, ``local:N``
  for a cluster of N worker processes on this machine, or a client you made). Each worker process loads
  the model once (:func:`~geoseg.predict.engine.worker_runtime`); a worker that dies has its tasks run again
  elsewhere, and they resume from the strips it had staged.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import re
import uuid
from collections.abc import Iterable
from typing import Any

from geoseg.errors import InputError
from geoseg.predict.engine import Advance, Runtime, run_unit, worker_settings
from geoseg.predict.finish import finish_scene
from geoseg.predict.hardware import DeviceSettings
from geoseg.predict.units import ModelRef, PredictOptions, ScenePlan, Unit

log = logging.getLogger(__name__)

_ADDRESS = re.compile(r"^(tcp|tls|ws|wss|inproc|ucx)://\S+$")
_LOCAL_CLUSTER = re.compile(r"^local:(\d+)$")


class LocalScheduler:
    """Units on a thread pool of this process, sharing one :class:`~geoseg.predict.engine.Runtime`."""

    name = "threads"

    def __init__(self, runtime: Runtime, workers: int, advance: Advance | None):
        self.runtime = runtime
        self.workers = workers
        self.advance = advance
        self._pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="geoseg-unit")
        self.per_chip_progress = True

    def submit_unit(self, unit: Unit) -> cf.Future[Any]:
        return self._pool.submit(run_unit, unit, self.runtime, self.advance)

    def submit_finish(self, plan: ScenePlan, units: list[Unit], model: ModelRef, options: PredictOptions
                      ) -> cf.Future[Any]:
        return self._pool.submit(finish_scene, plan, units, model, options)

    def wait_any(self, pending: Iterable[Any]) -> set[Any]:
        return set(cf.wait(list(pending), timeout=0.5, return_when=cf.FIRST_COMPLETED).done)

    def units_done(self) -> None:
        """Every unit of the job has run: the model's memory goes before the last scenes are finished."""
        self.runtime.release()

    def cancel(self, futures: Iterable[Any]) -> None:
        """Cancel what has not started (one scene's units after it failed)."""
        for f in futures:
            f.cancel()

    def interrupt(self, futures: Iterable[Any]) -> None:
        """Stop the whole job: pending units are cancelled, running ones stop at their next chip."""
        self.runtime.cancel.set()
        self.cancel(futures)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class DaskScheduler:
    """Units and finishing steps as dask.distributed tasks (see the module docstring)."""

    name = "distributed"

    def __init__(self, client: Any, owned: list[Any]):
        self.client = client
        self._owned = owned  # a client and cluster we started, closed with us
        # task keys are unique to this job: a later job on the same client (another output folder, the same
        # scenes) must never be answered with this one's results
        self._token = uuid.uuid4().hex[:12]
        self.per_chip_progress = False
        self.advance: Advance | None = None

    @property
    def workers(self) -> int:
        return len(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    def device_settings(self, model: ModelRef, options: PredictOptions, tile: int, bands: int) -> DeviceSettings:
        """``auto`` precision and batch size, resolved on one of the cluster's workers (where the model runs)."""
        key = f"geoseg-settings-{self._token}"
        return self.client.submit(worker_settings, model, options, tile, bands, key=key, pure=False).result()

    def submit_unit(self, unit: Unit) -> Any:
        key = f"geoseg-unit-{unit.scene.stem}-{unit.c0}-{unit.r0}-{self._token}"
        return self.client.submit(run_unit, unit, key=key, pure=False)

    def submit_finish(self, plan: ScenePlan, units: list[Unit], model: ModelRef, options: PredictOptions) -> Any:
        key = f"geoseg-finish-{plan.stem}-{self._token}"
        return self.client.submit(finish_scene, plan, units, model, options, key=key, pure=False)

    def units_done(self) -> None:
        """Every unit of the job has run; the workers keep their models for the next job."""

    def wait_any(self, pending: Iterable[Any]) -> set[Any]:
        from distributed import wait

        futures = list(pending)
        with contextlib.suppress(TimeoutError):
            wait(futures, timeout=0.5, return_when="FIRST_COMPLETED")
        return {f for f in futures if f.done()}

    def cancel(self, futures: Iterable[Any]) -> None:
        self.client.cancel(list(futures))

    def interrupt(self, futures: Iterable[Any]) -> None:
        self.cancel(futures)

    def close(self) -> None:
        for obj in self._owned:
            obj.close()


def resolve_scheduler(scheduler: Any) -> Any:
    """``scheduler`` as given, or dask's own setting (``DASK_SCHEDULER_ADDRESS``) when it is ``None``."""
    if scheduler is not None:
        return scheduler
    import dask

    return dask.config.get("scheduler-address", None) or os.environ.get("DASK_SCHEDULER_ADDRESS") or None


def check_scheduler(scheduler: Any) -> None:
    """Refuse a scheduler that is neither ``threads``, ``local:N``, an address nor a client.

    Raises:
        InputError: with the accepted forms.
    """
    if scheduler is None or not isinstance(scheduler, str):
        return
    if scheduler == "threads" or _ADDRESS.match(scheduler):
        return
    m = _LOCAL_CLUSTER.match(scheduler)
    if m and int(m.group(1)) >= 1:
        return
    raise InputError(f"--scheduler {scheduler!r}: give 'threads' (the default), 'local:N' (N worker processes "
                     "on this machine) or a dask scheduler address such as tcp://host:8786")


def open_dask(scheduler: Any, threads: int | None = None) -> DaskScheduler:
    """Connect to (or start) the dask.distributed cluster that ``scheduler`` names.

    Raises:
        InputError: the scheduler cannot be reached.
    """
    from distributed import Client

    if not isinstance(scheduler, str):
        return DaskScheduler(scheduler, [])
    m = _LOCAL_CLUSTER.match(scheduler)
    if m:
        import dask
        from distributed import LocalCluster

        n = int(m.group(1))
        per = threads or max(1, (os.cpu_count() or 1) // n)
        # dask starts workers with MALLOC_TRIM_THRESHOLD_ set, which turns off glibc's adaptive mmap threshold:
        # every large tensor of a forward pass is then mapped and unmapped afresh (measured ~30 % slower per
        # chip, benchmarks/bench_cluster.py); geoseg's own workers run with glibc's defaults
        environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", {}).items()
                   if k != "MALLOC_TRIM_THRESHOLD_"}
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
            cluster = LocalCluster(n_workers=n, threads_per_worker=per, processes=True, dashboard_address=":0")
        client = Client(cluster)
        return DaskScheduler(client, [client, cluster])
    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise InputError(f"--scheduler {scheduler}: cannot reach the dask scheduler ({exc}); start it with "
                         "`dask scheduler` and check the address and port") from None
    return DaskScheduler(client, [client])


Scheduler = LocalScheduler | DaskScheduler
