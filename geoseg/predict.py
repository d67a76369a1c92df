"""The predict engine: read chips -> normalise -> batch -> model -> blend -> finalise -> write.

Work is split into *units*: vertical panels of a scene (at most ``panel_width`` columns, a multiple of
the 512-pixel output tile), each processed top to bottom with a :class:`~geoseg.blend.RollingAccumulator`
of ``chip + 512`` rows. Memory is therefore bounded by the panel width, the chip size, the batch size
and the number of chips in flight, never by the scene's height or area. Chips come from one global
grid (:class:`~geoseg.tiling.ChipGrid`) and are blended in grid order, so the class map does not depend
on how the scene is split into panels.

Dask's local threaded scheduler runs the units (of every scene) in parallel and then each scene's
finishing step (COG conversion); a shared pool of reader threads prefetches chips; one
:class:`~geoseg.inference.ModelServer` thread runs the model for all of them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from geoseg.blend import RollingAccumulator, chip_weights, get_profile, normalise
from geoseg.bundle import Bundle, Contract, LoadedModel, check_scene, load_model, read_bundle
from geoseg.errors import InputError
from geoseg.raster import (
    BLOCK,
    COMPRESSIONS,
    OutputRaster,
    SceneInfo,
    SceneReader,
    check_writable,
    classes_spec,
    gdal_env,
    inspect_scene,
    probabilities_spec,
    qml_style,
)
from geoseg.tiling import ChipGrid, clip_to_scene, panels

log = logging.getLogger(__name__)

PROBABILITY_DTYPES = ("uint8", "float16", "float32")


@dataclass
class ProgressEvent:
    """Where a run stands; passed to the ``progress`` callback after each chip and each written strip."""

    chips_done: int
    chips_total: int
    pixels_done: int
    pixels_total: int
    scene: str


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class PredictOptions:
    """Settings of a predict run. ``None`` means: take it from the model bundle (or a default)."""

    tile_size: int | None = None
    overlap: int | None = None
    batch_size: int = 8
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    bands: list[int] | None = None
    blend: Any = "cosine"
    probabilities: bool = False
    probabilities_dtype: str = "uint8"
    compress: str = "deflate"
    overwrite: bool = False
    tta: bool = False
    panel_width: int = 8192
    vector_format: str | None = None  # "gpkg", "shp", "geojson", "parquet"; None: no polygons
    min_area: float | str | None = None
    simplify: float | str | None = None
    connectivity: int = 4

    def resolved_workers(self) -> int:
        return self.workers if self.workers and self.workers > 0 else min(4, os.cpu_count() or 1)


@dataclass
class SceneResult:
    """What a scene's prediction produced, and what it cost."""

    scene: str
    classes_path: Path
    probabilities_path: Path | None
    vector_path: Path | None
    width: int
    height: int
    chips: int
    chips_skipped: int
    band_indexes: list[int]
    tile_size: int
    overlap: int
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    area_km2: float | None = None


@dataclass
class RunResult:
    """A whole run: its scenes, settings and per-stage busy seconds (summed over threads)."""

    scenes: list[SceneResult]
    seconds: float
    stage_seconds: dict[str, float]
    model: Contract
    model_path: str
    options: PredictOptions
    device: str
    amp: str | None

    @property
    def pixels(self) -> int:
        return sum(s.width * s.height for s in self.scenes)


class _Stages:
    """Thread-safe busy-time counters per stage."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds = {"read": 0.0, "model": 0.0, "blend": 0.0, "write": 0.0, "cog": 0.0, "vectorize": 0.0}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] += seconds


class _Cancelled(Exception):
    pass


def _scene_stem(path: str) -> str:
    name = re.split(r"[/\\]", path.split("?")[0].rstrip("/"))[-1]
    for suffix in (".tiff", ".tif", ".vrt", ".img", ".jp2"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0] if "." in name else name


def output_paths(scene: str, output_dir: str | os.PathLike[str], vector_format: str | None = None) -> dict[str, Path]:
    """Where a scene's outputs go: ``<stem>.classes.tif``, ``<stem>.probs.tif`` and ``<stem>.<vector ext>``."""
    stem = _scene_stem(scene)
    out = Path(output_dir)
    paths = {"classes": out / f"{stem}.classes.tif", "probabilities": out / f"{stem}.probs.tif"}
    if vector_format is not None:
        from geoseg.vectorize import get_format

        paths["vector"] = out / f"{stem}{get_format(vector_format).extensions[0]}"
    return paths


class _SceneJob:
    """Everything one scene's units share. Plain class on purpose: Dask must not copy it."""

    def __init__(self, info: SceneInfo, band_indexes: list[int], grid: ChipGrid, units: list[tuple[int, int]],
                 warnings: list[str]):
        self.info = info
        self.units = units  # (first column, end column) of each panel
        self.band_indexes = band_indexes
        self.grid = grid
        self.warnings = warnings
        self.reader: SceneReader | None = None
        self.classes: OutputRaster | None = None
        self.probs: OutputRaster | None = None
        self.vector_path: Path | None = None
        self.chips_skipped = 0
        self.started = 0.0
        self.seconds = 0.0


class _Engine:
    def __init__(self, model: LoadedModel, opts: PredictOptions, progress: ProgressCallback | None):
        from geoseg.inference import ModelServer, Predictor

        self.model = model
        self.contract = model.contract
        self.opts = opts
        self.progress = progress
        self.stages = _Stages()
        self.predictor = Predictor(model, opts.device, opts.precision, opts.tta)
        self.server = ModelServer(self.predictor, opts.batch_size)
        self.cancel = threading.Event()
        self.slots = threading.Semaphore(3 * opts.batch_size)  # chips read but not yet blended, all units
        self.blend = opts.blend
        self.lut = np.asarray(self.contract.class_ids, dtype=np.uint16)
        self._lock = threading.Lock()
        self.chips_done = 0
        self.chips_total = 0
        self.pixels_done = 0
        self.pixels_total = 0

    # ---------------------------------------------------------------------------------- progress
    def _advance(self, scene: str, chips: int = 0, pixels: int = 0) -> None:
        with self._lock:
            self.chips_done += chips
            self.pixels_done += pixels
            ev = ProgressEvent(self.chips_done, self.chips_total, self.pixels_done, self.pixels_total, scene)
        if self.progress is not None:
            self.progress(ev)

    def _take_slot(self, wait: bool) -> bool:
        if not wait:
            return self.slots.acquire(blocking=False)
        while not self.slots.acquire(timeout=0.5):
            if self.cancel.is_set():
                raise _Cancelled()
        return True

    # ---------------------------------------------------------------------------------- one unit
    def run_panel(self, job: _SceneJob, c0: int, c1: int, readers: ThreadPoolExecutor) -> None:
        grid, chip, info = job.grid, job.grid.chip, job.info
        assert job.reader is not None
        reader = job.reader
        cols = grid.cols_touching(c0, c1)
        x_lo = grid.xs[cols.start]
        x_hi = min(grid.xs[cols.stop - 1] + chip, info.width)
        k = len(self.contract.classes)
        acc = RollingAccumulator(k, x_lo, x_hi - x_lo, chip=chip, step=BLOCK)

        def read(c: Any) -> tuple[Future[np.ndarray] | None, np.ndarray | None, Window]:
            if self.cancel.is_set():
                raise _Cancelled()
            t0 = time.perf_counter()
            win = clip_to_scene(c.window, info.width, info.height)
            data, valid = reader.read(win, size=(chip, chip))
            self.stages.add("read", time.perf_counter() - t0)
            if not valid.any():  # fully masked: never sent to the model
                return None, None, win
            return self.server.submit(data), valid, win

        chips = (grid.chip_at(r, c) for r in range(grid.shape[0]) for c in cols)
        inflight: deque[tuple[Any, Future[Any]]] = deque()

        def top_up() -> None:
            # chips in flight are limited across all units; a unit with none in flight may wait for a slot
            # (the others free theirs as they blend), one with some never waits, so no unit starves
            while self._take_slot(wait=not inflight):
                c = next(chips, None)
                if c is None:
                    self.slots.release()
                    return
                inflight.append((c, readers.submit(read, c)))

        top_up()
        while inflight:
            if self.cancel.is_set():
                raise _Cancelled()
            c, fut = inflight.popleft()
            row_off = int(c.window.row_off)
            while acc.top + BLOCK <= row_off:  # rows above this chip row are final
                self._emit(job, acc, BLOCK, c0, c1)
            probs_future, valid, win = fut.result()
            if probs_future is None or valid is None:
                with self._lock:
                    job.chips_skipped += 1
            else:
                probs = probs_future.result()
                t0 = time.perf_counter()
                h, w = int(win.height), int(win.width)
                weights = chip_weights(self.blend, chip, grid.overlap, c.ramps)[:h, :w] * valid[:h, :w]
                acc.add(probs[:, :h, :w], weights, int(win.row_off), int(win.col_off))
                del probs, probs_future
                self.stages.add("blend", time.perf_counter() - t0)
            self.slots.release()
            self._advance(info.path, chips=1)
            top_up()
        while acc.top < info.height:
            self._emit(job, acc, min(BLOCK, info.height - acc.top), c0, c1)

    def _emit(self, job: _SceneJob, acc: RollingAccumulator, n: int, c0: int, c1: int) -> None:
        """Finalise the top ``n`` rows of a panel's accumulator and write columns ``[c0, c1)``."""
        t0 = time.perf_counter()
        r0 = acc.top
        sums, wsum = acc.peek(n)
        assert job.classes is not None
        spec = job.classes.spec
        classes = np.empty((n, c1 - c0), dtype=spec.dtype)
        probs_out = None
        if job.probs is not None:
            probs_out = np.empty((sums.shape[0], n, c1 - c0), dtype=job.probs.spec.dtype)
        # column chunks keep the temporaries (argmax indexes, normalised probabilities) small
        for a in range(c0, c1, 2048):
            b = min(a + 2048, c1)
            sl, out = slice(a - acc.col_off, b - acc.col_off), slice(a - c0, b - c0)
            s, w = sums[:, :, sl], wsum[:, sl]
            valid = w > 0
            # the weight is the same for every class, so the arg max of the sums is that of the probabilities
            chunk = self.lut[np.argmax(s, axis=0)].astype(spec.dtype)
            chunk[~valid] = spec.nodata
            classes[:, out] = chunk
            if probs_out is not None:
                p = normalise(s, w)
                if probs_out.dtype == np.uint8:
                    enc = np.rint(p * 254).astype(np.uint8)
                    enc[:, ~valid] = 255
                else:
                    enc = p
                    enc[:, ~valid] = np.nan
                probs_out[:, :, out] = enc
        acc.advance(n)
        window = Window(c0, r0, c1 - c0, n)
        self.stages.add("blend", time.perf_counter() - t0)
        t0 = time.perf_counter()
        job.classes.write(classes[None], window)
        if job.probs is not None and probs_out is not None:
            job.probs.write(probs_out, window)
        self.stages.add("write", time.perf_counter() - t0)
        self._advance(job.info.path, pixels=n * (c1 - c0))

    def finish_scene(self, job: _SceneJob, _units: Sequence[None]) -> None:
        t0 = time.perf_counter()
        assert job.classes is not None
        job.classes.commit({".qml": qml_style(self.contract.classes)})
        if job.probs is not None:
            job.probs.commit()
        self.stages.add("cog", time.perf_counter() - t0)
        if job.vector_path is not None:
            from geoseg.vectorize import vectorize_raster

            t0 = time.perf_counter()
            c = self.contract
            bg = [c.background_class] if c.background_class is not None else []
            vectorize_raster(job.classes.path, job.vector_path, vector_format=self.opts.vector_format,
                             connectivity=self.opts.connectivity, min_area=self.opts.min_area,
                             simplify=self.opts.simplify, skip_classes=bg,
                             class_names={k.id: k.name for k in c.classes},
                             workers=self.opts.resolved_workers(), overwrite=self.opts.overwrite)
            self.stages.add("vectorize", time.perf_counter() - t0)
        job.seconds = time.perf_counter() - job.started


def _expand_scenes(scenes: Sequence[str | os.PathLike[str]]) -> list[str]:
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
    from geoseg.models import input_divisor

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
    if opts.batch_size < 1:
        raise InputError(f"--batch-size {opts.batch_size}: must be at least 1")
    if opts.compress not in COMPRESSIONS:
        raise InputError(f"--compress {opts.compress}: valid values are {', '.join(COMPRESSIONS)}")
    if opts.probabilities_dtype not in PROBABILITY_DTYPES:
        raise InputError(f"--probabilities-dtype {opts.probabilities_dtype}: valid values are "
                         f"{', '.join(PROBABILITY_DTYPES)}")
    if opts.panel_width < BLOCK:
        raise InputError(f"panel width {opts.panel_width}: must be at least {BLOCK}")
    get_profile(opts.blend)
    if opts.connectivity not in (4, 8):
        raise InputError(f"--connectivity {opts.connectivity}: must be 4 or 8")
    if opts.vector_format is not None:
        from geoseg.vectorize import get_format, parse_min_area, parse_simplify

        get_format(opts.vector_format)
        parse_min_area(opts.min_area)
        parse_simplify(opts.simplify)
    return tile, overlap


def predict_scenes(
    scenes: Sequence[str | os.PathLike[str]],
    model: LoadedModel | Bundle | str | os.PathLike[str],
    output_dir: str | os.PathLike[str] = ".",
    *,
    options: PredictOptions | None = None,
    progress: ProgressCallback | None = None,
    **kwargs: Any,
) -> RunResult:
    """Predict class maps (and optionally probabilities) for several scenes with one model.

    Every scene is checked against the model's contract, and every output path for existence, before
    any model work. Outputs are written as COGs on each scene's exact grid.

    Args:
        scenes: paths or URLs of rasters; globs are expanded.
        model: a loaded model, a bundle, or a bundle path.
        output_dir: folder for ``<stem>.classes.tif`` (+ ``.qml`` style) and ``<stem>.probs.tif``.
        options: a :class:`PredictOptions`; keyword arguments override its fields.
        progress: called with a :class:`ProgressEvent` as chips and strips complete.

    Returns:
        A :class:`RunResult` with one :class:`SceneResult` per scene.

    Raises:
        InputError, BundleError, OutputExistsError: before any compute; other errors leave no output.
    """
    import dask
    from dask import delayed

    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(PredictOptions)})
    if unknown:
        raise TypeError(f"predict got unexpected option(s) {', '.join(unknown)}")
    opts = dataclasses.replace(options or PredictOptions(), **kwargs)  # never mutate the caller's options
    started = time.perf_counter()
    if isinstance(model, LoadedModel):
        bundle = model.bundle
    elif isinstance(model, Bundle):
        bundle = model
    else:
        bundle = read_bundle(model)
    contract = bundle.contract
    tile, overlap = _validate(contract, opts)
    paths = _expand_scenes(scenes)

    # preflight: every scene and every output, before any model work
    jobs: list[_SceneJob] = []
    seen: dict[Path, str] = {}
    for p in paths:
        info = inspect_scene(p)
        pre = check_scene(contract, info, opts.bands)
        if info.crs is None:
            pre.warnings.append(f"{p}: has no CRS; the outputs will carry none")
        for w in pre.warnings:
            log.warning(w)
        outs = output_paths(p, output_dir, opts.vector_format)
        wanted = [outs["classes"]] + ([outs["probabilities"]] if opts.probabilities else [])
        wanted += [outs["vector"]] if "vector" in outs else []
        for o in wanted:
            if o in seen:
                raise InputError(f"{p}: its output {o.name} would overwrite the one of {seen[o]}; "
                                 "predict scenes with the same file name into different --output-dir")
            seen[o] = p
            check_writable(o, opts.overwrite)
        grid = ChipGrid(info.width, info.height, tile, overlap)
        job = _SceneJob(info, pre.band_indexes, grid, panels(info.width, opts.panel_width, BLOCK), pre.warnings)
        job.vector_path = outs.get("vector")
        jobs.append(job)

    loaded = model if isinstance(model, LoadedModel) else load_model(bundle)
    engine = _Engine(loaded, opts, progress)
    engine.chips_total = sum(len(j.grid) for j in jobs)
    engine.pixels_total = sum(j.info.pixels for j in jobs)
    workers = opts.resolved_workers()
    tags = {"GEOSEG_MODEL": contract.name, "GEOSEG_TILE_SIZE": str(tile), "GEOSEG_OVERLAP": str(overlap)}
    with gdal_env():
        try:
            for job in jobs:
                outs = output_paths(job.info.path, output_dir)
                job.reader = SceneReader(job.info.path, job.band_indexes, contract.input.mean, contract.input.std)
                job.classes = OutputRaster(outs["classes"], job.info, classes_spec(contract.classes, tags),
                                           compress=opts.compress, overwrite=opts.overwrite)
                if opts.probabilities:
                    job.probs = OutputRaster(outs["probabilities"], job.info,
                                             probabilities_spec(contract.classes, opts.probabilities_dtype, tags),
                                             compress=opts.compress, overwrite=opts.overwrite)
            with engine.server, ThreadPoolExecutor(workers, thread_name_prefix="geoseg-read") as readers:
                tasks = []
                for job in jobs:
                    job.started = time.perf_counter()
                    units = [delayed(engine.run_panel, pure=False)(job, c0, c1, readers) for c0, c1 in job.units]
                    tasks.append(delayed(engine.finish_scene, pure=False)(job, units))
                try:
                    dask.compute(*tasks, scheduler="threads", num_workers=workers)
                except BaseException:
                    engine.cancel.set()
                    raise
        finally:
            for job in jobs:
                for out in (job.classes, job.probs):
                    if out is not None:
                        out.abort()
                if job.reader is not None:
                    job.reader.close()
    engine.stages.add("model", engine.server.seconds)
    results = [
        SceneResult(
            scene=j.info.path, classes_path=j.classes.path if j.classes else Path(),
            probabilities_path=j.probs.path if j.probs else None, vector_path=j.vector_path,
            width=j.info.width, height=j.info.height, chips=len(j.grid), chips_skipped=j.chips_skipped,
            band_indexes=j.band_indexes, tile_size=tile, overlap=overlap, seconds=j.seconds,
            warnings=j.warnings, area_km2=j.info.area_km2,
        )
        for j in jobs
    ]
    amp = str(engine.predictor.amp_dtype).replace("torch.", "") if engine.predictor.amp_dtype else None
    return RunResult(results, time.perf_counter() - started, dict(engine.stages.seconds), contract,
                     str(bundle.path), opts, str(engine.predictor.device), amp)


def predict_scene(
    scene: str | os.PathLike[str],
    model: LoadedModel | Bundle | str | os.PathLike[str],
    output_dir: str | os.PathLike[str] = ".",
    **kwargs: Any,
) -> SceneResult:
    """Predict one scene; see :func:`predict_scenes` for the arguments (``kwargs`` are :class:`PredictOptions`)."""
    progress = kwargs.pop("progress", None)
    return predict_scenes([scene], model, output_dir, progress=progress, **kwargs).scenes[0]
