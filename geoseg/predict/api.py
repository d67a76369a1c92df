"""Predict class maps for scenes: the public entry point of a mapping job.

:func:`predict_scenes` checks the options, expands the scenes, checks every scene against the model's
contract and every output for existence (:class:`~geoseg.predict.units.ScenePlan`), then runs the job
(:mod:`geoseg.predict.job`) on a scheduler (:mod:`geoseg.predict.schedule`): this process's threads by default, or a
dask.distributed cluster. The flow of one scene is ``units -> staged strips -> finished outputs``
(:mod:`geoseg.predict.units`, :mod:`geoseg.predict.engine`, :mod:`geoseg.predict.finish`); :mod:`geoseg.predict.manifest` makes a job
resumable. Outputs go to a local folder or to object storage (:mod:`geoseg.io.store`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geoseg.errors import DiskFullError, GeoSegError, InputError
from geoseg.io.profiles import check_compress
from geoseg.io.raster import BLOCK, check_writable, inspect_scene, scene_stem
from geoseg.io.stac_scenes import StackedScene, stack_scenes
from geoseg.io.store import Store
from geoseg.model.bundle import Bundle, LoadedModel, bundle_digest, read_bundle
from geoseg.model.contract import Contract, input_divisor
from geoseg.model.preflight import check_scene
from geoseg.predict.blend import get_profile
from geoseg.predict.finish import output_names
from geoseg.predict.hardware import DeviceSettings
from geoseg.predict.job import (
    JobOutcome,
    ProgressCallback,
    ProgressEvent,
    SceneResult,
    as_location,
    run_plans,
    scene_result,
)
from geoseg.predict.manifest import (
    MANIFEST,
    Manifest,
    drop_staging,
    folder_lock,
    staging_matches,
    stale_staging,
)
from geoseg.predict.units import ModelRef, PredictOptions, ScenePlan, fingerprint

log = logging.getLogger(__name__)

PROBABILITY_DTYPES = ("uint8", "float16", "float32")

__all__ = ["PredictOptions", "ProgressEvent", "ProgressCallback", "RunResult", "SceneResult", "predict_scene",
           "predict_scenes"]


@dataclass
class RunResult:
    """A whole job: every scene's outcome, the settings used, and per-stage busy seconds (summed over threads)."""

    scenes: list[SceneResult]
    seconds: float
    stage_seconds: dict[str, float]
    model: Contract
    model_path: str
    options: PredictOptions
    device: str
    amp: str | None
    scheduler: str = "threads"
    workers: int = 1
    output_dir: str = "."
    files: list[str] = field(default_factory=list)  # job-level files: manifest, mosaic
    machine: str = ""  # the CPU or GPU the device settings were chosen for

    @property
    def pixels(self) -> int:
        """Pixels of the scenes this run predicted (not those skipped as finished before)."""
        return sum(s.width * s.height for s in self.scenes if s.status == "done")

    @property
    def failed(self) -> list[SceneResult]:
        return [s for s in self.scenes if s.status == "failed"]

    @property
    def partial(self) -> bool:
        """Some scenes failed and others did not."""
        return bool(self.failed) and len(self.failed) < len(self.scenes)


SceneArg = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]  # a raster, a STAC file, or band files


def _expand(scenes: Sequence[SceneArg]) -> list[str | list[str]]:
    """The scenes with globs expanded; a list of band files stays one scene (a list of paths)."""
    out: list[str | list[str]] = []
    for s in scenes:
        if isinstance(s, list | tuple):
            out.append([os.fspath(f) for f in s])
        else:
            out.extend(expand_scenes([s]))  # type: ignore[list-item]
    if not out:
        expand_scenes([])  # its error
    return out


def expand_scenes(scenes: Sequence[str | os.PathLike[str]]) -> list[str]:
    import glob

    out: list[str] = []
    for s in scenes:
        p = os.fspath(s)
        if "://" not in p and not os.path.exists(p) and glob.has_magic(p):
            hits = sorted(glob.glob(p))
            if not hits:
                raise InputError(f"{p}: the pattern matches no file; check the path and quote the glob")
            out.extend(hits)
        else:
            out.append(p)
    if not out:
        raise InputError("no scene given; pass one or more GeoTIFF paths or a glob")
    return out


def _validate(contract: Contract, opts: PredictOptions) -> tuple[int, int]:
    if opts.tile_size is not None and opts.tile_size < 1:
        raise InputError(f"--tile-size {opts.tile_size}: must be a positive number of pixels; leave it out to "
                         f"use the bundle's chip size ({contract.chip_size})")
    tile = opts.tile_size or contract.chip_size
    div = input_divisor(contract.model)
    if tile < 16 or tile % div:
        raise InputError(f"--tile-size {tile}: must be a multiple of {div} (at least 16) for "
                         f"{contract.model.architecture}; try {max(div, round(tile / div) * div)}")
    if opts.overlap is not None:
        overlap = opts.overlap
    else:
        overlap = contract.overlap if contract.overlap * 2 <= tile else tile // 4
    if not 0 <= overlap * 2 <= tile:
        raise InputError(f"--overlap {overlap}: must be between 0 and half the tile size ({tile // 2})")
    if opts.batch_size != "auto" and (not isinstance(opts.batch_size, int) or isinstance(opts.batch_size, bool)
                                      or opts.batch_size < 1):
        raise InputError(f"--batch-size {opts.batch_size}: must be a positive whole number or auto")
    check_compress(opts.compress)
    if opts.probabilities_dtype not in PROBABILITY_DTYPES:
        raise InputError(f"--probabilities-dtype {opts.probabilities_dtype}: valid values are "
                         f"{', '.join(PROBABILITY_DTYPES)}")
    if opts.panel_width < BLOCK:
        raise InputError(f"--panel-width {opts.panel_width}: must be at least {BLOCK}")
    if opts.unit_rows is not None and (opts.unit_rows < BLOCK or opts.unit_rows % BLOCK):
        raise InputError(f"--unit-rows {opts.unit_rows}: must be a positive multiple of {BLOCK}; try "
                         f"{max(BLOCK, round(opts.unit_rows / BLOCK) * BLOCK)}")
    get_profile(opts.blend)
    from geoseg.io.vrt import check_resampling

    check_resampling(opts.resampling)
    if opts.resolution is not None and not opts.resolution > 0:
        raise InputError(f"--resolution {opts.resolution}: must be a positive pixel size in the scenes' CRS units")
    from geoseg.predict.hardware import ALL_BACKENDS

    if opts.backend not in ALL_BACKENDS:
        raise InputError(f"--backend {opts.backend}: valid values are {', '.join(ALL_BACKENDS)}")
    from geoseg.gis.quantities import check_connectivity

    check_connectivity(opts.connectivity)
    from geoseg.gis.quantities import parse_mmu

    parse_mmu(opts.mmu)
    if opts.vector_format is not None:
        from geoseg.gis.vectorize import get_format, parse_min_area, parse_simplify

        get_format(opts.vector_format)
        parse_min_area(opts.min_area)
        parse_simplify(opts.simplify)
    return tile, overlap


def predict_scenes(
    scenes: Sequence[SceneArg],
    model: LoadedModel | Bundle | str | os.PathLike[str],
    output_dir: str | os.PathLike[str] = ".",
    *,
    options: PredictOptions | None = None,
    progress: ProgressCallback | None = None,
    scheduler: Any = None,
    name: str = "mosaic",
    merge_vectors: bool = False,
    **kwargs: Any,
) -> RunResult:
    """Predict class maps (and optionally probabilities and polygons) for several scenes with one model.

    Every scene is checked against the model's contract, and every output for existence, before any
    model work. Outputs are COGs on each scene's exact grid, published whole. Running the same call again
    after an interruption skips finished scenes and resumes unfinished ones from their staged strips.

    Args:
        scenes: paths or URLs of rasters (globs are expanded), of STAC Items and ItemCollections (``.json``:
            each Item is a scene, its assets chosen by the model's band names and stacked virtually; outputs
            are named after the Item's id), or lists of band files (one scene; the files in the model's
            band order). See :mod:`geoseg.io.stac_scenes`.
        model: a loaded model, a bundle, or a bundle path.
        output_dir: folder or URL (``s3://bucket/maps/``) for ``<stem>.classes.tif`` (+ ``.qml`` style),
            ``<stem>.probs.tif``, ``<stem>.confidence.tif`` (+ ``.qml``) and the polygons.
        options: a :class:`PredictOptions`; keyword arguments override its fields.
        progress: called with a :class:`ProgressEvent` as chips, strips and scenes complete.
        scheduler: ``None`` (this process's threads, or ``DASK_SCHEDULER_ADDRESS`` when set), ``"threads"``,
            ``"local:N"`` (N local worker processes), a dask scheduler address or a ``distributed.Client``.
        name: the job's name: its mosaic of the class maps is ``<name>.vrt`` (with two scenes or more).
        merge_vectors: also write the polygons of every scene as one layer, ``<name>.<vector ext>``.

    Returns:
        A :class:`RunResult` with one :class:`SceneResult` per scene; a scene that failed while others
        did not has ``status == "failed"`` and its reason in ``error`` (see :attr:`RunResult.partial`).

    Raises:
        InputError, BundleError, OutputExistsError: before any compute, when the job cannot start or its
            only scene is refused; the first scene's error when every scene failed. Nothing incomplete is
            left under a final name.
    """
    from geoseg.predict.schedule import check_scheduler, resolve_scheduler

    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(PredictOptions)})
    if unknown:
        raise TypeError(f"predict got unexpected option(s) {', '.join(unknown)}")
    opts = dataclasses.replace(options or PredictOptions(), **kwargs)  # never mutate the caller's options
    if opts.workers is not None and opts.workers < 1:
        raise InputError(f"--workers {opts.workers}: must be at least 1; leave it out for min(4, CPU cores)")
    opts.workers = opts.resolved_workers()
    started = time.perf_counter()
    bundle = model.bundle if isinstance(model, LoadedModel) else model if isinstance(model, Bundle) else read_bundle(model)
    contract = bundle.contract
    if bundle.format == "onnx" and opts.backend == "eager":  # runs without torch (geoseg.predict.runtime)
        opts.backend = "onnxruntime"
    tile, overlap = _validate(contract, opts)
    scheduler = resolve_scheduler(scheduler)
    check_scheduler(scheduler)
    paths = _expand(scenes)
    out_dir = os.fspath(output_dir)
    # workers load the model from where the job found it: the URL it was fetched from, or the local path
    ref = ModelRef(bundle.source or str(Path(bundle.path).resolve()), bundle_digest(bundle.files))
    loader = _Loader(bundle, model)
    dask_sched = None
    if scheduler is not None and scheduler != "threads":
        from geoseg.predict.schedule import open_dask

        dask_sched = open_dask(scheduler)
    try:
        settings = _device_settings(opts, tile, len(contract.input.bands), ref, dask_sched, loader)
        opts.precision, opts.batch_size, opts.backend = settings.precision, settings.batch_size, settings.backend
        return _job(paths, bundle, loader, ref, opts, tile, overlap, out_dir, dask_sched, settings, progress, name,
                    merge_vectors, started)
    finally:
        if dask_sched is not None:
            dask_sched.close()


class _Loader:
    """The job's model in this process, loaded at most once (only the local scheduler and CUDA sizing need it)."""

    def __init__(self, bundle: Bundle, model: Any):
        self.bundle = bundle
        self.loaded: LoadedModel | None = model if isinstance(model, LoadedModel) else None

    def __call__(self) -> LoadedModel:
        if self.loaded is None:
            from geoseg.predict.runtime import load_for_predict

            self.loaded = load_for_predict(self.bundle)
        return self.loaded


def _device_settings(opts: PredictOptions, tile: int, bands: int, ref: ModelRef, dask_sched: Any,
                     loader: _Loader) -> DeviceSettings:
    """``auto`` backend, precision and batch size made concrete once for the job, where the model runs."""
    from geoseg.predict.runtime import resolve_settings

    if dask_sched is not None:
        settings = dask_sched.device_settings(ref, opts, tile, bands)
    else:
        settings = resolve_settings(opts, tile, bands, bundle=loader.bundle, load=loader)
    probed = ", ".join(f"{b} {s:.3f} s" for b, _, s in settings.probe)
    log.info("model settings: %s%s, %s, batch %d on %s (%s)", settings.backend,
             f" (auto: {probed} per batch)" if probed else " (auto)" if opts.backend == "auto" else "",
             settings.precision, settings.batch_size, settings.device, settings.machine)
    return settings


def _job(given: list[str | list[str]], bundle: Bundle, loader: _Loader, ref: ModelRef, opts: PredictOptions, tile: int,
         overlap: int, out_dir: str, dask_sched: Any, settings: DeviceSettings, progress: ProgressCallback | None,
         name: str, merge_vectors: bool, started: float) -> RunResult:
    contract = bundle.contract
    out = Store(out_dir)
    manifest = Manifest(out_dir)
    scenes = stack_scenes(given, contract.input.bands, out_dir, resolution=opts.resolution,
                          resampling=opts.resampling)
    paths = [s.scene for s in scenes]
    if (opts.resolution is not None or opts.resampling != "nearest") and all(s.scene == s.source for s in scenes):
        log.warning("--resolution and --resampling apply to STAC Items and band-file lists; rasters are read on "
                    "their own grid")
    plans, results = _preflight(scenes, contract, opts, ref, out, manifest, tile, overlap, settings.probe)
    todo = [p for p in plans if p.stem not in results]
    failed = [r for r in results.values() if r.status == "failed"]
    if failed and len(failed) == len(paths):
        raise failed[0].exception or GeoSegError(failed[0].error or "every scene failed")
    out.prepare()
    with folder_lock(out):
        try:
            outcome, sched_name, workers = _run(todo, loader, ref, opts, dask_sched, manifest, progress)
        except DiskFullError:
            for plan in todo:  # the strips staged so far hold the space the user must free
                drop_staging(plan)
            raise
        results.update(outcome.results)
        ordered = [results[scene_stem(p)] for p in paths]
        if todo and all(r.status == "failed" for r in ordered):
            first = next(r for r in ordered if r.status == "failed")
            raise first.exception or GeoSegError(first.error or "every scene failed")
        files = _job_files(ordered, out, name, manifest, opts.vector_format if merge_vectors else None)
        for left in stale_staging(out, {scene_stem(p) for p in paths}):
            log.warning("%s: strips of a scene an earlier run did not finish; run that command again to resume "
                        "it, or delete the folder", left)
    return RunResult(ordered, time.perf_counter() - started, outcome.stage_seconds, contract, str(bundle.path),
                     opts, outcome.device or settings.device, outcome.amp, sched_name, workers, out_dir, files,
                     machine=settings.machine)


def _preflight(scenes: list[StackedScene], contract: Contract, opts: PredictOptions, ref: ModelRef, out: Store,
               manifest: Manifest, tile: int, overlap: int, probe: tuple[tuple[str, str, float], ...] = ()
               ) -> tuple[list[ScenePlan], dict[str, SceneResult]]:
    """Plan every scene; a scene that cannot be read, breaks the contract or would overwrite fails alone.

    After a ``--backend auto`` probe (``probe``: each timed backend and its precision), a job that an earlier
    run began under another of the candidates resumes with that one (``opts`` and the plans change to it).
    """
    planned: list[tuple[StackedScene, ScenePlan | GeoSegError]] = []
    seen: dict[str, str] = {}
    for s in scenes:
        stem = scene_stem(s.scene)
        if stem in seen:
            raise InputError(f"{s.source}: its outputs ({stem}.*) would overwrite those of {seen[stem]}; "
                             "predict scenes with the same file name (or Item id) into different --output-dir")
        seen[stem] = s.source
        try:
            if s.error is not None:
                raise s.error
            planned.append((s, _plan_scene(s.scene, contract, opts, ref, out, tile, overlap, s.band_indexes)))
        except GeoSegError as exc:
            planned.append((s, exc))
    if len(probe) > 1 and not opts.overwrite:
        planned = _resume_backend(planned, opts, ref, manifest, probe)
    plans: list[ScenePlan] = []
    results: dict[str, SceneResult] = {}
    for s, plan in planned:
        p = s.scene
        stem = scene_stem(p)
        try:
            if isinstance(plan, GeoSegError):
                raise plan
            if manifest.is_done(plan) and not opts.overwrite:
                log.info("%s: finished by an earlier run; skipped", p)
                names = output_names(stem, opts.vector_format)
                results[stem] = scene_result(
                    plan, "skipped", files=[out.url(n) for n in manifest.scenes[stem].get("files", [])],
                    classes_path=as_location(out.url(names["classes"])),
                    probabilities_path=as_location(out.url(names["probabilities"])) if opts.probabilities else None,
                    confidence_path=as_location(out.url(names["confidence"])) if opts.confidence else None,
                    vector_path=as_location(out.url(names["vector"])) if "vector" in names else None)
            elif not opts.overwrite and not staging_matches(plan):
                for kind, name in output_names(stem, opts.vector_format).items():
                    if (kind != "probabilities" or opts.probabilities) and \
                            (not kind.startswith("confidence") or opts.confidence):
                        check_writable(out.url(name), overwrite=False)
        except GeoSegError as exc:
            if len(scenes) == 1:
                raise
            log.error("%s", exc)
            results[stem] = SceneResult(p, "failed", error=str(exc), exception=exc)
            continue
        plans.append(plan)
    return plans, results


def _resume_backend(planned: list[tuple[StackedScene, ScenePlan | GeoSegError]], opts: PredictOptions, ref: ModelRef,
                    manifest: Manifest, probe: tuple[tuple[str, str, float], ...]
                    ) -> list[tuple[StackedScene, ScenePlan | GeoSegError]]:
    """The plans under the backend an earlier run of this job chose by its probe, when that differs from this
    run's choice: a scene finished or staged under the fingerprint of another candidate (and none under this
    run's) makes the job resume with that candidate, so that a resumed job never mixes backends nor refuses
    its own outputs. ``opts`` changes with it."""
    plans = [p for _, p in planned if isinstance(p, ScenePlan)]

    def began(backend: str, precision: str) -> list[ScenePlan] | None:
        alt = dataclasses.replace(opts, backend=backend, precision=precision)
        again = [dataclasses.replace(p, fingerprint=fingerprint(p.info, list(p.band_indexes), p.tile, p.overlap,
                                                                ref, alt)) for p in plans]
        return again if any(manifest.is_done(p) or staging_matches(p) for p in again) else None

    if began(opts.backend, opts.precision) is not None:
        return planned
    for backend, precision, _ in probe:
        if backend == opts.backend or (again := began(backend, precision)) is None:
            continue
        log.info("--backend auto: resuming with %s (%s), the choice of the run that began this job", backend,
                 precision)
        opts.backend, opts.precision = backend, precision
        by_stem = {p.stem: p for p in again}
        return [(s, by_stem[p.stem] if isinstance(p, ScenePlan) else p) for s, p in planned]
    return planned


def _plan_scene(p: str, contract: Contract, opts: PredictOptions, ref: ModelRef, out: Store, tile: int,
                overlap: int, stacked_bands: tuple[int, ...] | None = None) -> ScenePlan:
    info = inspect_scene(p)
    # --bands wins; a stack of the model's bands (geoseg.io.stac_scenes) holds them in input order
    pre = check_scene(contract, info, opts.bands if opts.bands is not None or stacked_bands is None
                      else list(stacked_bands))
    if info.crs is None:
        pre.warnings.append(f"{p}: has no CRS; the outputs will carry none")
    for w in pre.warnings:
        log.warning(w)
    fp = fingerprint(info, pre.band_indexes, tile, overlap, ref, opts)
    return ScenePlan(info, scene_stem(p), tuple(pre.band_indexes), tile, overlap, out.location, fp,
                     tuple(pre.warnings))


def _run(plans: list[ScenePlan], loader: _Loader, ref: ModelRef, opts: PredictOptions, dask_sched: Any,
         manifest: Manifest, progress: ProgressCallback | None) -> tuple[JobOutcome, str, int]:
    from geoseg.predict.engine import STAGES

    if not plans:
        return JobOutcome({}, dict.fromkeys(STAGES, 0.0)), "threads", 0
    if dask_sched is not None:
        return run_plans(plans, ref, opts, dask_sched, manifest, progress), dask_sched.name, dask_sched.workers
    from geoseg.predict.engine import Runtime
    from geoseg.predict.schedule import LocalScheduler

    runtime = Runtime(loader(), opts)
    workers = opts.resolved_workers()
    local = LocalScheduler(runtime, workers, None)
    try:
        outcome = run_plans(plans, ref, opts, local, manifest, progress)
    finally:
        local.close()
        runtime.close()
    outcome.device, outcome.amp = str(runtime.predictor.device), runtime.amp
    return outcome, local.name, workers


def _job_files(results: list[SceneResult], out: Store, name: str, manifest: Manifest,
               merge_format: str | None) -> list[str]:
    files = [out.url(MANIFEST)] if manifest.scenes else []
    finished = [r for r in results if r.status in ("done", "skipped")]
    maps = [str(r.classes_path) for r in finished]
    if len(maps) >= 2:
        from geoseg.gis.mosaic import write_mosaic

        files += write_mosaic(maps, out, name)
    if merge_format is not None and finished:
        from geoseg.gis.mosaic import merge_vectors

        vectors = [out.url(output_names(scene_stem(r.scene), merge_format)["vector"]) for r in finished]
        files.append(merge_vectors(vectors, out, name, merge_format, scenes=[r.scene for r in finished]))
    return files


def predict_scene(
    scene: str | os.PathLike[str],
    model: LoadedModel | Bundle | str | os.PathLike[str],
    output_dir: str | os.PathLike[str] = ".",
    **kwargs: Any,
) -> SceneResult:
    """Predict one scene; see :func:`predict_scenes` for the arguments (``kwargs`` are :class:`PredictOptions`,
    ``progress`` and ``scheduler``). Polygons are written as by the CLI unless ``vector_format=None``."""
    progress = kwargs.pop("progress", None)
    scheduler = kwargs.pop("scheduler", None)
    return predict_scenes([scene], model, output_dir, progress=progress, scheduler=scheduler, **kwargs).scenes[0]
