"""Run one unit: read chips -> normalise -> batch -> model -> blend -> staged strips.

:func:`run_unit` is a plain function of a :class:`~geoseg.predict.units.Unit`; whoever calls it (a local thread pool
or a dask.distributed worker) gets the same strips. A unit rolls top to bottom over its columns with a
:class:`~geoseg.predict.blend.RollingAccumulator` of ``chip + 512`` rows; each finished 512-row strip is classified
and published whole into the scene's staging folder (local or object storage), where it doubles as the
record that the strip is done. A unit that starts again (after Ctrl-C, a killed process or a lost worker)
skips its finished strips and recomputes only the chips that reach below them.

The model runs in a :class:`Runtime`: one :class:`~geoseg.predict.server.ModelServer` per process and device,
fed by a pool of reader threads. Local runs make one runtime and pass it in; a dask worker keeps one per
model digest (:func:`worker_runtime`), so it loads a model once however many units it runs.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from geoseg.errors import BundleError
from geoseg.io.profiles import OutputSpec
from geoseg.io.raster import BLOCK, SceneReader, gdal_env
from geoseg.io.store import Store
from geoseg.model.bundle import LoadedModel
from geoseg.predict.blend import RollingAccumulator, chip_weights, normalise
from geoseg.predict.hardware import DeviceSettings
from geoseg.predict.tiling import Chip, clip_to_scene
from geoseg.predict.units import ModelRef, PredictOptions, Unit, parse_strip, staged_outputs, strip_key

log = logging.getLogger(__name__)

STAGES = ("read", "model", "blend", "write", "cog", "vectorize")
# rows the blend accumulator finalises at a time: it holds a chip and the rows its top may lag behind (512 rows for
# 512 px chips at a 384 px stride, at most 640, instead of 1024 with whole strips), and finished rows wait as
# class ids until their strip of BLOCK rows is full
RING_STEP = 128
Advance = Callable[[str, int, int], None]  # (scene, chips, pixels): called as chips and strips complete


class Cancelled(Exception):
    """The run was interrupted; finished strips stay staged for the next run."""


class Runtime:
    """One process's model on its device: the model server thread, reader threads, chip slots."""

    def __init__(self, model: LoadedModel, options: PredictOptions):
        from geoseg.predict.hardware import cpu_batch_size
        from geoseg.predict.runtime import make_predictor
        from geoseg.predict.server import ModelServer

        if not isinstance(options.batch_size, int) or "auto" in (options.precision, options.backend):
            # predict_scenes resolves auto once per job; units made by hand get this process's choice
            from geoseg.predict.runtime import resolve_settings

            settings = resolve_settings(options, model.contract.chip_size, len(model.contract.input.bands),
                                        bundle=model.bundle, load=lambda: model)
            options = dataclasses.replace(options, precision=settings.precision, batch_size=settings.batch_size,
                                          backend=settings.backend)
        assert isinstance(options.batch_size, int)
        self.contract = model.contract
        self.predictor = make_predictor(model, options.device, options.precision, options.tta, options.backend)
        # on a CPU every network call is the auto batch of the chip size, whatever --batch-size gathers: the
        # same bytes at any batch size (geoseg.predict.server)
        tile = options.tile_size or model.contract.chip_size
        net_batch = cpu_batch_size(tile) if self.predictor.device.type == "cpu" else None
        self.server = ModelServer(self.predictor, options.batch_size, net_batch=net_batch)
        self.readers = ThreadPoolExecutor(options.resolved_workers(), thread_name_prefix="geoseg-read")
        self.slots = threading.Semaphore(max(6, 3 * self.server.batch_size))  # chips read, not yet blended
        # units blending at once: on a CPU one unit keeps the model busy (its reads run ahead on the reader
        # threads), and each unit holds a blend accumulator as wide as its panel, so one at a time keeps
        # memory flat as scenes grow; a GPU may need several units' blending to keep up with it
        self.unit_gate = threading.Semaphore(1 if self.predictor.device.type == "cpu" else options.resolved_workers())
        self.cancel = threading.Event()
        self.server.__enter__()

    @property
    def amp(self) -> str | None:
        dt = self.predictor.amp_dtype
        return str(dt).replace("torch.", "") if dt is not None else None

    def close(self) -> None:
        self.cancel.set()
        self.readers.shutdown(wait=True, cancel_futures=True)
        self.server.close()

    def release(self) -> None:
        """Close the runtime and free the network's memory where the predictor can (the torch-free
        :class:`~geoseg.predict.onnx_predictor.OnnxPredictor`): called once the job has no chip left to run."""
        self.close()
        release = getattr(self.predictor, "release", None)
        if release is not None:
            release()

    def take_slot(self, wait: bool) -> bool:
        if not wait:
            return self.slots.acquire(blocking=False)
        while not self.slots.acquire(timeout=0.5):
            if self.cancel.is_set():
                raise Cancelled()
        return True


_RUNTIMES: dict[tuple[Any, ...], Runtime] = {}
_RUNTIMES_LOCK = threading.Lock()
_KEEP = 2  # runtimes (models) a worker process keeps


def worker_runtime(model: ModelRef, options: PredictOptions) -> Runtime:
    """This process's runtime for ``model`` and the device settings of ``options``, made once and kept.

    The bundle is read from ``model.path`` and must have ``model.digest`` (a worker never runs another
    model than the one the job was planned with). In a dask worker, torch uses as many threads as the
    worker has (``dask worker --nthreads``).

    Raises:
        BundleError: the bundle at that path is missing or is not the job's model.
    """
    key = (model.digest, options.device, options.precision, options.batch_size, options.tta, options.backend,
           options.resolved_workers())
    with _RUNTIMES_LOCK:
        rt = _RUNTIMES.get(key)
        if rt is not None and rt.server.failed:  # a model that failed (an int8 refusal, memory) is made anew
            _RUNTIMES.pop(key).close()
            rt = None
        if rt is None:
            from geoseg.model.bundle import bundle_digest
            from geoseg.predict.runtime import load_for_predict

            bundle = model.read()
            if bundle_digest(bundle.files) != model.digest:
                raise BundleError(f"{model.path}: this worker's copy of the model differs from the job's "
                                  "(digest mismatch); give every worker the same bundle")
            _set_worker_threads()
            while len(_RUNTIMES) >= _KEEP:
                _RUNTIMES.pop(next(iter(_RUNTIMES))).close()
            rt = _RUNTIMES[key] = Runtime(load_for_predict(bundle), options)
        return rt


def worker_settings(model: ModelRef, options: PredictOptions, tile: int, bands: int) -> DeviceSettings:
    """The job's device settings (:func:`geoseg.predict.inference.resolve_settings`) as a dask worker sees them."""
    from geoseg.predict.runtime import load_for_predict, resolve_settings

    _set_worker_threads()
    bundle = model.read()
    return resolve_settings(options, tile, bands, bundle=bundle, load=lambda: load_for_predict(bundle))


def _set_worker_threads() -> None:
    try:
        from distributed import get_worker

        nthreads = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        return
    from geoseg.model.onnxrt import set_session_threads

    set_session_threads(max(1, nthreads))
    torch = sys.modules.get("torch")  # an ONNX job never loads it
    if torch is not None:
        torch.set_num_threads(max(1, nthreads))


@dataclass
class UnitResult:
    """What a unit did: plain data, returned to whoever scheduled it."""

    stem: str
    c0: int
    r0: int
    chips: int = 0  # chips computed (0 when every strip was already staged)
    chips_skipped: int = 0  # fully masked chips, never sent to the model
    rows_resumed: int = 0  # rows found already staged by an earlier run
    device: str | None = None  # where the model ran, e.g. "cpu" or "cuda:0"
    amp: str | None = None  # the autocast dtype, if any
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))


def staged_rows(unit: Unit, store: Store, outputs: list[str]) -> int:
    """The first row of ``unit`` whose strips are not all staged yet (``unit.r1`` when all are)."""
    names = [{parse_strip(n) for n in store.list(o)} for o in outputs]
    row = unit.r0
    while row < unit.r1 and all((row, unit.c0, unit.c1) in n for n in names):
        row += BLOCK
    return min(row, unit.r1)


def run_unit(unit: Unit, runtime: Runtime | None = None, advance: Advance | None = None) -> UnitResult:
    """Compute ``unit`` and stage its strips; finished strips of an earlier run are kept, not recomputed.

    Args:
        unit: the unit (plain data).
        runtime: the model runtime; ``None`` takes this process's :func:`worker_runtime`.
        advance: called with ``(scene, chips, pixels)`` as chips are blended and strips staged.

    Returns:
        A :class:`UnitResult`.
    """
    rt = runtime or worker_runtime(unit.model, unit.options)
    plan, opts = unit.scene, unit.options
    result = UnitResult(plan.stem, unit.c0, unit.r0, device=str(rt.predictor.device), amp=rt.amp)
    store = Store(plan.staging)
    start = staged_rows(unit, store, staged_outputs(opts))
    result.rows_resumed = start - unit.r0
    if advance is not None and start > unit.r0:
        advance(plan.scene, 0, (start - unit.r0) * (unit.c1 - unit.c0))
    if start >= unit.r1:
        return result
    while not rt.unit_gate.acquire(timeout=0.5):
        if rt.cancel.is_set():
            raise Cancelled()
    try:
        with gdal_env():
            reader = SceneReader(plan.info.path, list(plan.band_indexes), rt.contract.input.mean,
                                 rt.contract.input.std)
            try:
                wants = getattr(rt.predictor, "wants_check_chips", None)
                if wants is not None and wants():  # an int8 network not yet checked: chips of the scene to check on
                    rt.predictor.add_check_chips(_check_chips(plan, reader))
                _Rolling(unit, rt, reader, store, result, advance).run(start)
            finally:
                reader.close()
    finally:
        rt.unit_gate.release()
    return result


def _check_chips(plan: Any, reader: SceneReader) -> np.ndarray:
    """The int8 check's :data:`~geoseg.predict.onnx_predictor.CHECK_CHIPS` chips of the scene's grid, the first
    and others evenly spread over it, read as predict reads them (chips less than half valid are skipped): the
    same chips in every run, whatever the reader threads do."""
    from geoseg.predict.onnx_predictor import CHECK_CHIPS

    grid, info = plan.grid, plan.info
    cols = grid.shape[1]
    out = []
    for i in np.unique(np.linspace(0, len(grid) - 1, CHECK_CHIPS + 1)[:-1].round().astype(int)):
        chip = grid.chip_at(*divmod(int(i), cols))  # grid order is row-major
        data, valid = reader.read(clip_to_scene(chip.window, info.width, info.height), size=(grid.chip, grid.chip))
        if valid.mean() >= 0.5:
            out.append(data)
    return np.stack(out) if out else np.zeros((0,), np.float32)


@dataclass
class _Strip:
    """A strip of output rows being finalised (staged when full): first row, class ids, encoded probabilities,
    encoded confidence."""

    r0: int
    classes: np.ndarray
    probs: np.ndarray | None
    conf: np.ndarray | None = None


class _Rolling:
    """One pass of a unit from ``start`` down to ``unit.r1`` (the body of :func:`run_unit`)."""

    def __init__(self, unit: Unit, rt: Runtime, reader: SceneReader, store: Store, result: UnitResult,
                 advance: Advance | None):
        from geoseg.io.profiles import classes_spec, confidence_spec, probabilities_spec

        self.unit, self.rt, self.reader, self.store, self.result, self.advance = unit, rt, reader, store, result, advance
        self.grid = unit.scene.grid
        contract = rt.contract
        self.lut = np.asarray(contract.class_ids, dtype=np.uint16)
        self.classes_spec = classes_spec(contract.classes)
        self.probs_spec = (probabilities_spec(contract.classes, unit.options.probabilities_dtype)
                           if unit.options.probabilities else None)
        self.conf_spec = confidence_spec() if unit.options.confidence else None
        self.strip: _Strip | None = None  # the strip being filled, RING_STEP rows at a time

    def _chips(self, start: int) -> Iterator[Chip]:
        u, g = self.unit, self.grid
        cols = g.cols_touching(u.c0, u.c1)
        return (g.chip_at(r, c) for r in g.rows_touching(start, u.r1) for c in cols)

    def _read(self, chip: Chip) -> tuple[Future[Any] | None, np.ndarray | None, Window]:
        if self.rt.cancel.is_set():
            raise Cancelled()
        info = self.unit.scene.info
        t0 = time.perf_counter()
        win = clip_to_scene(chip.window, info.width, info.height)
        data, valid = self.reader.read(win, size=(self.grid.chip, self.grid.chip))
        self.result.seconds["read"] += time.perf_counter() - t0
        if not valid.any():  # fully masked: never sent to the model
            return None, None, win
        return self.rt.server.submit(data), valid, win

    def run(self, start: int) -> None:
        u, rt, grid = self.unit, self.rt, self.grid
        cols = grid.cols_touching(u.c0, u.c1)
        x_lo = grid.xs[cols.start]
        x_hi = min(grid.xs[cols.stop - 1] + grid.chip, u.scene.info.width)
        # a chip row is added once the rows above it are released, RING_STEP at a time from `start`: it starts
        # (origin - start) % RING_STEP rows below the top, and the ring holds the chip plus the largest of those
        lag = max((max(0, grid.ys[r] - start) % RING_STEP for r in grid.rows_touching(start, u.r1)), default=0)
        acc = RollingAccumulator(len(rt.contract.classes), x_lo, x_hi - x_lo, chip=grid.chip, step=RING_STEP, top=start,
                                 lag=lag)
        chips = self._chips(start)
        inflight: deque[tuple[Chip, Future[Any]]] = deque()

        def top_up() -> None:
            # chips in flight are limited across all units; a unit with none in flight may wait for a slot
            # (the others free theirs as they blend), one with some never waits, so no unit starves
            while rt.take_slot(wait=not inflight):
                c = next(chips, None)
                if c is None:
                    rt.slots.release()
                    return
                inflight.append((c, rt.readers.submit(self._read, c)))

        try:
            top_up()
            while inflight:
                if rt.cancel.is_set():
                    raise Cancelled()
                c, fut = inflight.popleft()
                try:
                    row_off = max(int(c.window.row_off), start)
                    while acc.top + RING_STEP <= row_off:  # rows above this chip row are final
                        self._emit(acc, RING_STEP)
                    self._blend(acc, c, fut, start)
                finally:
                    rt.slots.release()
                top_up()
            while acc.top < u.r1:
                self._emit(acc, min(RING_STEP, u.r1 - acc.top))
        finally:
            for _, fut in inflight:  # on error: let the readers finish, give their slots back
                fut.cancel() or fut.exception()
                rt.slots.release()

    def _blend(self, acc: RollingAccumulator, c: Chip, fut: Future[Any], start: int) -> None:
        probs_future, valid, win = fut.result()
        self.result.chips += 1
        if probs_future is None or valid is None:
            self.result.chips_skipped += 1
        else:
            probs, model_seconds = probs_future.result()
            self.result.seconds["model"] += model_seconds
            t0 = time.perf_counter()
            h, w = int(win.height), int(win.width)
            weights = chip_weights(self.unit.options.blend, self.grid.chip, self.grid.overlap, c.ramps)[:h, :w]
            weights = weights * valid[:h, :w]
            skip = max(0, start - int(win.row_off))  # rows above the first unfinished strip: staged already
            if skip < h:
                acc.add(probs[:, skip:h, :w], weights[skip:], int(win.row_off) + skip, int(win.col_off))
            self.result.seconds["blend"] += time.perf_counter() - t0
        if self.advance is not None:
            self.advance(self.unit.scene.scene, 1, 0)

    def _emit(self, acc: RollingAccumulator, n: int) -> None:
        """Finalise the top ``n`` rows of the accumulator into the strip being filled; stage it when it has
        :data:`BLOCK` rows or reaches the unit's bottom."""
        u = self.unit
        t0 = time.perf_counter()
        if self.strip is None:
            rows = min(BLOCK, u.r1 - acc.top)
            k = len(self.rt.contract.classes)
            self.strip = _Strip(acc.top, np.empty((1, rows, u.c1 - u.c0), dtype=self.classes_spec.dtype),
                                None if self.probs_spec is None else
                                np.empty((k, rows, u.c1 - u.c0), dtype=self.probs_spec.dtype),
                                None if self.conf_spec is None else np.empty((1, rows, u.c1 - u.c0), dtype=np.uint8))
        strip = self.strip
        at = acc.top - strip.r0
        self._finalise(acc, n, strip.classes[:, at:at + n],
                       None if strip.probs is None else strip.probs[:, at:at + n],
                       None if strip.conf is None else strip.conf[0, at:at + n])
        acc.advance(n)
        self.result.seconds["blend"] += time.perf_counter() - t0
        if acc.top - strip.r0 < strip.classes.shape[1]:
            return
        self.strip = None
        t0 = time.perf_counter()
        rows = strip.classes.shape[1]
        window = Window(u.c0, strip.r0, u.c1 - u.c0, rows)
        # probabilities and confidence first: a strip counts as staged when its class strip is there
        if strip.probs is not None and self.probs_spec is not None:
            self._stage(strip_key("probabilities", strip.r0, u.c0, u.c1), strip.probs, window, self.probs_spec)
        if strip.conf is not None and self.conf_spec is not None:
            self._stage(strip_key("confidence", strip.r0, u.c0, u.c1), strip.conf, window, self.conf_spec)
        self._stage(strip_key("classes", strip.r0, u.c0, u.c1), strip.classes, window, self.classes_spec)
        self.result.seconds["write"] += time.perf_counter() - t0
        if self.advance is not None:
            self.advance(u.scene.scene, 0, rows * (u.c1 - u.c0))

    def _finalise(self, acc: RollingAccumulator, n: int, classes: np.ndarray, probs_out: np.ndarray | None,
                  conf_out: np.ndarray | None = None) -> None:
        """Class ids (and encoded probabilities and confidence) of the accumulator's top ``n`` rows, columns
        ``[c0, c1)``."""
        c0, c1 = self.unit.c0, self.unit.c1
        sums, wsum = acc.peek(n)
        # column chunks keep the temporaries (argmax indexes, normalised probabilities) small
        for a in range(c0, c1, 2048):
            b = min(a + 2048, c1)
            sl, out = slice(a - acc.col_off, b - acc.col_off), slice(a - c0, b - c0)
            s, w = sums[:, :, sl], wsum[:, sl]
            valid = w > 0
            # the weight is the same for every class, so the arg max of the sums is that of the probabilities
            chunk = self.lut[np.argmax(s, axis=0)].astype(classes.dtype)
            chunk[~valid] = self.classes_spec.nodata
            classes[0, :, out] = chunk
            if conf_out is not None:
                # the top class's blended probability: the largest sum over the weight (a division by a
                # positive weight keeps the order, so this is exactly the max of normalise(s, w) over the
                # classes), encoded as the uint8 probabilities are; one max and one division per pixel
                top = s.max(axis=0)
                np.divide(top, w, out=top, where=valid)
                top *= 254
                conf = np.rint(top, out=top).astype(np.uint8)
                conf[~valid] = 255
                conf_out[:, out] = conf
            if probs_out is not None:
                p = normalise(s, w)
                if probs_out.dtype == np.uint8:
                    enc = np.rint(p * 254).astype(np.uint8)
                    enc[:, ~valid] = 255
                else:
                    enc = p
                    enc[:, ~valid] = np.nan
                probs_out[:, :, out] = enc

    def _stage(self, key: str, array: np.ndarray, window: Window, spec: OutputSpec) -> None:
        info = self.unit.scene.info
        profile: dict[str, Any] = dict(
            driver="GTiff", width=array.shape[2], height=array.shape[1], count=array.shape[0], dtype=array.dtype,
            crs=info.crs, transform=window_transform(window, info.transform), nodata=spec.nodata,
            tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="zstd", zstd_level=1, bigtiff="if_safer",
        )
        if spec.nbits:
            profile["nbits"] = spec.nbits
        with self.store.staged_file(key) as tmp, rasterio.open(tmp, "w", **profile) as dst:
            dst.write(array)
