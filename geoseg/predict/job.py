"""Run a job: planned scenes -> units on a scheduler -> finished scenes -> manifest, mosaic.

The driver loop is the same for both schedulers (:mod:`geoseg.predict.schedule`): it submits every unit, finishes
a scene as soon as its own units are done, records it in the manifest, and removes its staging. A scene
whose unit or finishing step fails is marked failed with its reason (its staging removed) while the other
scenes go on. Once no unit is left to run, the scheduler is told (``units_done``): a local run frees the
network's memory there, so the last scenes' finishing steps (COGs, quicklook, polygons) do not add to it.
Ctrl-C cancels what is pending and leaves the staging of unfinished scenes for the next run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoseg.io.staging import disk_full
from geoseg.io.store import Store, is_remote
from geoseg.predict.engine import STAGES, Cancelled, UnitResult
from geoseg.predict.finish import FinishResult
from geoseg.predict.manifest import Manifest, drop_staging, prepare_staging
from geoseg.predict.units import ModelRef, PredictOptions, ScenePlan, Unit, plan_units

if TYPE_CHECKING:
    from geoseg.predict.schedule import Scheduler

log = logging.getLogger(__name__)


@dataclass
class ProgressEvent:
    """Where a job stands; passed to the ``progress`` callback, in order, from one thread at a time."""

    chips_done: int
    chips_total: int
    pixels_done: int
    pixels_total: int
    scene: str
    scenes_done: int = 0
    scenes_total: int = 0


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class SceneResult:
    """What happened to one scene: ``done``, ``skipped`` (finished by an earlier run) or ``failed``."""

    scene: str
    status: str
    classes_path: Path | str | None = None
    probabilities_path: Path | str | None = None
    confidence_path: Path | str | None = None
    vector_path: Path | str | None = None
    width: int = 0
    height: int = 0
    chips: int = 0  # chips of the scene's grid
    chips_computed: int = 0  # chips this run sent through the model or skipped as masked (halos included)
    chips_skipped: int = 0  # fully masked chips, never sent to the model
    rows_resumed: int = 0  # output rows found staged by an interrupted run
    band_indexes: list[int] = field(default_factory=list)
    tile_size: int = 0
    overlap: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    area_km2: float | None = None
    files: list[str] = field(default_factory=list)
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False, compare=False)


def as_location(url: str | None) -> Path | str | None:
    """A local output as a :class:`~pathlib.Path`, a remote one as its URL."""
    if url is None:
        return None
    return url if is_remote(url) else Path(url)


def scene_result(plan: ScenePlan, status: str, **kw: Any) -> SceneResult:
    info = plan.info
    return SceneResult(plan.scene, status, width=info.width, height=info.height, chips=len(plan.grid),
                       band_indexes=list(plan.band_indexes), tile_size=plan.tile, overlap=plan.overlap,
                       warnings=list(plan.warnings), area_km2=info.area_km2, **kw)


class _Tracker:
    """Counts chips, pixels and scenes, and calls the progress callback in order under one lock."""

    def __init__(self, progress: ProgressCallback | None, scenes: int):
        self.progress = progress
        self._lock = threading.Lock()
        self.ev = ProgressEvent(0, 0, 0, 0, "", 0, scenes)

    def advance(self, scene: str, chips: int = 0, pixels: int = 0, scenes: int = 0) -> None:
        with self._lock:
            ev = self.ev
            ev.chips_done += chips
            ev.pixels_done += pixels
            ev.scenes_done += scenes
            ev.scene = scene
            if self.progress is not None:
                self.progress(ProgressEvent(**vars(ev)))


@dataclass
class JobOutcome:
    results: dict[str, SceneResult]
    stage_seconds: dict[str, float]
    device: str | None = None
    amp: str | None = None


def run_plans(plans: list[ScenePlan], model: ModelRef, options: PredictOptions, scheduler: Scheduler,
              manifest: Manifest, progress: ProgressCallback | None) -> JobOutcome:
    """Run every unit of ``plans`` on ``scheduler`` and finish each scene (see the module docstring)."""
    tracker = _Tracker(progress, len(plans))
    if scheduler.per_chip_progress:
        scheduler.advance = tracker.advance
    stages = dict.fromkeys(STAGES, 0.0)
    outcome = JobOutcome({}, stages)
    units = {p.stem: plan_units(p, model, options) for p in plans}
    by_stem = {p.stem: p for p in plans}
    tracker.ev.chips_total = sum(u.chips() for us in units.values() for u in us)
    tracker.ev.pixels_total = sum(p.info.pixels for p in plans)
    remaining = {stem: len(us) for stem, us in units.items()}
    partial: dict[str, SceneResult] = {p.stem: scene_result(p, "running") for p in plans}
    started = {p.stem: time.perf_counter() for p in plans}
    pending: dict[Any, tuple[str, str, Unit | None]] = {}
    for p in plans:
        if prepare_staging(p):
            log.info("%s: resuming from the strips staged by an earlier run", p.scene)
        for u in units[p.stem]:
            pending[scheduler.submit_unit(u)] = ("unit", p.stem, u)

    def fail(stem: str, exc: BaseException) -> None:
        full = disk_full(exc, by_stem[stem].output_dir)
        res = partial[stem]
        res.status, res.error, res.exception = "failed", _reason(exc), exc
        outcome.results[stem] = res
        if full is None:
            log.error("%s: failed: %s", by_stem[stem].scene, res.error)
        mine = [f for f, (_, s, _) in pending.items() if s == stem]
        scheduler.cancel(mine)
        for f in mine:  # what already runs is waited for (as an orphan), so no strip lands after the cleanup
            if f.cancelled():
                del pending[f]
            else:
                pending[f] = ("orphan", stem, None)
        settle(stem)
        if full is not None:  # every scene would fail the same way: stop the job, say it once
            raise full

    def settle(stem: str) -> None:
        """A failed scene's staging goes once none of its tasks can still write into it."""
        if partial[stem].status == "failed" and not any(s == stem for _, s, _ in pending.values()):
            drop_staging(by_stem[stem])

    try:
        while pending:
            for fut in scheduler.wait_any(list(pending)):
                if fut not in pending:
                    continue
                kind, stem, unit = pending.pop(fut)
                if kind == "orphan" or partial[stem].status == "failed":
                    settle(stem)
                    continue
                try:
                    value = fut.result()
                except Cancelled:
                    raise KeyboardInterrupt from None
                except Exception as exc:
                    fail(stem, exc)
                    continue
                if kind == "unit":
                    assert unit is not None
                    _add_unit(value, unit, partial[stem], stages, tracker, scheduler.per_chip_progress)
                    outcome.device, outcome.amp = value.device or outcome.device, value.amp or outcome.amp
                    remaining[stem] -= 1
                    if not any(k in ("unit", "orphan") for k, _, _ in pending.values()):
                        scheduler.units_done()  # before the finish it is about to submit, which then runs lighter
                    if remaining[stem] == 0:
                        f = scheduler.submit_finish(by_stem[stem], units[stem], model, options)
                        pending[f] = ("finish", stem, None)
                else:
                    _finished(by_stem[stem], value, partial[stem], stages, manifest)
                    partial[stem].seconds = time.perf_counter() - started[stem]
                    outcome.results[stem] = partial[stem]
                    tracker.advance(by_stem[stem].scene, scenes=1)
    except BaseException:
        scheduler.interrupt(list(pending))
        raise
    return outcome


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _add_unit(res: UnitResult, unit: Unit, scene: SceneResult, stages: dict[str, float], tracker: _Tracker,
              per_chip: bool) -> None:
    for k, v in res.seconds.items():
        stages[k] += v
    scene.chips_computed += res.chips
    scene.chips_skipped += res.chips_skipped
    scene.rows_resumed += res.rows_resumed
    if per_chip:  # chips and strips were counted as they came; count what was not computed
        tracker.advance(unit.scene.scene, chips=unit.chips() - res.chips)
    else:
        tracker.advance(unit.scene.scene, chips=unit.chips(), pixels=unit.pixels)


def _finished(plan: ScenePlan, fin: FinishResult, scene: SceneResult, stages: dict[str, float],
              manifest: Manifest) -> None:
    for k, v in fin.seconds.items():
        stages[k] += v
    scene.status = "done"
    if scene.chips_computed and scene.chips_skipped == scene.chips_computed and not scene.rows_resumed:
        msg = (f"{plan.scene}: every pixel is nodata (or masked) in the model's bands; its outputs are all "
               "nodata: check --bands and the scene's nodata value")
        log.warning(msg)
        scene.warnings.append(msg)
    scene.classes_path = as_location(fin.outputs.get("classes"))
    scene.probabilities_path = as_location(fin.outputs.get("probabilities"))
    scene.confidence_path = as_location(fin.outputs.get("confidence"))
    scene.vector_path = as_location(fin.outputs.get("vector"))
    out = Store(plan.output_dir)
    scene.files = [out.url(name) for name in fin.files]
    manifest.record(plan, fin.files)
    drop_staging(plan)
