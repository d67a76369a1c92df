"""A minimum mapping unit: GDAL's sieve (``rasterio.features.sieve``) of a whole class map, streamed in strips.

What GDAL's ``GDALSieveFilter`` does (read in alg/gdalsievefilter.cpp and its polygon enumerator; checked
against GDAL 3.10.3 as rasterio 1.4.4 ships it), which this module reproduces pixel for pixel:

* **Regions.** A region is a connected set of valid pixels of one value (``GDALRasterPolygonEnumerator``,
  4- or 8-connectivity). Pixels the mask marks invalid (nodata) belong to no region: they never change,
  never count in a size, and are nobody's neighbour. Its size is its pixel count, over the whole raster.
* **Largest neighbour.** Two regions are neighbours when two of their pixels are adjacent in the same
  connectivity (diagonals only with 8). Every region's largest neighbour is the neighbour with the most
  pixels; sizes are the regions' own, whether or not they are small themselves. Ties: GDAL scans the
  raster row by row, left to right, and at each pixel compares it with the pixel above, then (8 only) above
  left, above right, then left; a neighbour replaces the current one only when it is strictly larger, so
  among equally large neighbours the one met first in that order wins.
* **Which regions go.** Those with fewer than ``threshold`` pixels (``size < threshold``; threshold 1 or
  less changes nothing). Each follows the chain of largest neighbours (its largest neighbour, that one's
  largest neighbour, ...) to the first region of at least ``threshold`` pixels and takes that region's
  value. A small region whose chain comes back to a region already visited (a cycle of small regions),
  and a small region with no neighbour at all (surrounded by nodata or the raster's edge), keep their
  value. Decisions are taken on the original regions all at once (no region grows during the sieve, so
  the order in which GDAL walks them does not matter): a chain of small regions all go into the big region
  at its end, not into each other.
* Masked pixels are written back unchanged. GDAL reads values as Int32 and caps sizes at 2**31 - 1 pixels;
  class maps here are integers within Int32, and no region reaches that size on rasters geoseg writes.

``rasterio.features.sieve(data, threshold, mask=valid, connectivity=c)`` runs exactly that on an array;
the nodata value (or the dataset's mask) is what ``valid`` says, so masking it out is part of the call.

**Streaming.** The raster is read in strips of whole rows, twice:

1. *Scan.* Each strip is labelled (SciPy, per class) into *pieces* with provisional ids; pieces of one
   value that touch across the seam with the strip above are joined (union-find as a sparse graph, solved
   at the end with connected components), so that regions may span any number of strips. Per piece:
   value and size. Per pair of adjacent pieces of different values (seams included): the scan position
   of the first contact, kept only from the side of a piece with fewer than ``threshold`` pixels (only
   such a piece can belong to a small region). After the scan, regions are the connected components of
   pieces; sizes add up; every small region gets its largest neighbour by (size, first contact) exactly as
   above; chains are resolved by pointer doubling; each piece gets its output value.
2. *Apply.* The pixels of pieces under ``threshold`` pixels (the only ones that can change) were noted in
   the scan, per strip, as (position, piece), in files beside the output (:func:`sieve_raster`) or in
   memory (:func:`sieve_array`); each strip is read again and those pixels get their piece's output value.
   No second labelling.

The decisions are not left to the end: after each strip, every region that no longer reaches the strip's
last row is *closed* (its size is final), and a closed small region is decided as soon as its largest
neighbour is known for good (every neighbour closed, or a single open neighbour already ahead of all the
closed ones: it can only grow) and its chain ends in a decided region. Decided regions are forgotten; each
strip's output table (piece -> value) goes to a file once its pieces are decided (or after
``HOLD_STRIPS`` strips, the few pieces still waiting then come back as patches). What stays in memory is one
strip, the open regions (at most one per pixel of a row) and the closed small regions still waiting on an
open one, with the regions their contacts name: bounded by the width, not the area. On a 10000 x 10000
land-cover map of 1.16 M regions the process holds about 75 MB over its imports (the working arrays of one
2 M-pixel strip), against 200 MB when every region was kept to the end and 530 MB for rasterio's whole-map
sieve (``benchmarks/bench_sieve.py``); a map 16 times taller keeps as many regions at once
(``tests/gis/test_sieve.py``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import signal
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from geoseg.errors import InputError, WorkerError
from geoseg.gis.quantities import Quantity, check_connectivity, parse_mmu
from geoseg.gis.strip_sieve import SieveStats, StripScan, StripSieve, scan_strip, sieve_array
from geoseg.gis.strip_sieve import strips as strip_rows_of
from geoseg.io.geodesy import ground_pixel_area
from geoseg.io.raster import band_validity, check_writable, gdal_env, inspect_scene, open_scene
from geoseg.io.store import Store

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

STRIP_PIXELS = 1 << 21  # pixels per strip by default (~2 M: some 60 MB of working arrays)



# ---------------------------------------------------------------------------------------------- thresholds

def mmu_pixels(mmu: float | int | str | Quantity, *, crs: Any, transform: Any,
               bounds: tuple[float, float, float, float], path: str = "the raster") -> int:
    """The sieve threshold in pixels for a minimum mapping unit: regions with fewer pixels are merged.

    ``mmu`` is ``"12px"``, ``"5000m2"``, ``"0.5ha"``, ``"1km2"`` or a plain number of pixels. A ground area
    is divided by the ground area of one pixel (:func:`geoseg.io.geodesy.ground_pixel_area`: planar where the
    CRS keeps areas, geodesic at the scene's centre on a geographic CRS or a distorting projection, as
    polygon areas are measured). Rounding: a region goes when its area is below the unit, ``n * a < mmu``,
    that is ``n < mmu / a``, so the threshold is ``ceil(mmu / a)`` (``0.5ha`` on 10 m pixels: 50, a region
    of 49 pixels goes, one of 50 stays; on 9.9 m pixels: ``ceil(51.02) = 52``).

    Raises:
        InputError: not an area, or an area in square metres on a raster without a CRS.
    """
    q = parse_mmu(mmu)
    assert q is not None
    if q.unit == "px":
        px = q.value
    else:
        if crs is None:
            raise InputError(f"{path}: has no CRS, so --mmu {mmu!r} in square metres cannot be measured; give it "
                             "in pixels (e.g. 12px) or assign a CRS")
        px = q.value / ground_pixel_area(crs, transform, bounds)
    return max(0, math.ceil(px - 1e-9 * max(1.0, px)))  # 0.5 ha / 100 m2 may come out as 50.000000001


# ---------------------------------------------------------------------------------------------- rasters

@dataclass
class SieveResult:
    """What :func:`sieve_raster` wrote: the ``path``, the ``threshold`` in pixels, the ``connectivity``,
    region counts (:class:`SieveStats`), pixels changed, strips, wall seconds and CPU seconds (this
    process and its worker processes)."""

    path: Path
    threshold: int
    connectivity: int
    stats: SieveStats
    pixels_changed: int = 0
    strips: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def _cpu() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def default_strip_rows(width: int, block_rows: int = 1) -> int:
    """Rows per strip: about :data:`STRIP_PIXELS` pixels, a whole number of the source's block rows."""
    rows = max(1, STRIP_PIXELS // max(1, width))
    if block_rows > 1 and rows > block_rows:
        rows -= rows % block_rows
    return rows


def sieve_raster(src: str | os.PathLike[str], dst: str | os.PathLike[str], mmu: float | int | str | Quantity,
                 connectivity: int = 4, *, strip_rows: int | None = None, compress: str | None = "deflate",
                 workers: int | None = None, overwrite: bool = False,
                 progress: Progress | None = None) -> SieveResult:
    """Sieve a class raster to a minimum mapping unit, strip by strip; equal to GDAL's whole-raster sieve.

    Every region (connected pixels of one class) smaller than ``mmu`` takes the class of its largest
    neighbour, exactly as ``rasterio.features.sieve(band, threshold, mask=valid, connectivity=...)`` on the
    whole raster does (see the module's description; nodata and masked pixels stay as they are and are no
    one's neighbour).

    Args:
        src: one-band integer class raster (e.g. the class map of ``geoseg predict``).
        dst: the cleaned GeoTIFF (same grid, dtype, nodata, tags and colour table as ``src``); written to a
            temporary name beside it and renamed when complete.
        mmu: the minimum mapping unit: ``"0.5ha"``, ``"5000m2"``, ``"12px"``, or a number of pixels
            (:func:`mmu_pixels` says how ground units become pixels).
        connectivity: 4 or 8, for regions and for neighbours.
        strip_rows: rows per strip (default: about two million pixels a strip); the result does not
            depend on it.
        compress: GeoTIFF compression of ``dst`` (``None``: none, for a temporary file read once).
        workers: processes that label strips in the first read (default: the CPUs available, at most 4);
            rasters under :data:`PROCESS_MIN_PIXELS`, ``workers=1`` and daemonic processes (dask's workers)
            label in this process. The result is the same either way.
        overwrite: replace an existing ``dst``.
        progress: called as ``progress(done, total)`` after each strip of each of the two reads.

    Raises:
        InputError: unreadable raster, not one integer band, or a bad ``mmu`` / ``connectivity``.
        OutputExistsError: ``dst`` exists and ``overwrite`` is false.
        WorkerError: a worker process died (out of memory, killed).
    """
    t0, c0 = time.perf_counter(), _cpu()
    path = os.fspath(src)
    check_connectivity(connectivity)
    info = inspect_scene(path)
    if info.count != 1:
        raise InputError(f"{path}: has {info.count} bands; a class raster has one band of class ids")
    if np.dtype(info.dtype).kind not in "iu":
        raise InputError(f"{path}: band 1 is {info.dtype}; the sieve needs integer class ids (convert it, e.g. "
                         "gdal_translate -ot Byte)")
    threshold = mmu_pixels(mmu, crs=info.crs, transform=info.transform, bounds=info.bounds, path=path)
    out_path = Path(os.fspath(dst))
    check_writable(out_path, overwrite, elsewhere="another DST")
    rows = strip_rows or default_strip_rows(info.width, info.block_shapes[0][0])
    if rows < 1:
        raise InputError(f"sieve: strip_rows must be at least 1, got {rows}")
    strips = list(strip_rows_of(info.height, rows))
    result = SieveResult(out_path, threshold, connectivity, SieveStats(), strips=len(strips))
    store = Store(out_path.parent)
    store.prepare()
    # the pixels of small pieces wait for the second read in files beside the output, not in memory
    with gdal_env(), open_scene(path) as ds, \
            tempfile.TemporaryDirectory(prefix=f".{out_path.name}.spill-", dir=out_path.parent) as spill:
        sv = StripSieve(info.width, threshold, connectivity, spill=spill)
        total = 2 * len(strips)
        if threshold > 1:
            jobs = [(path, r0, h, info.width, info.mask, threshold, connectivity, Path(spill) / f"strip{i}.npy")
                    for i, (r0, h) in enumerate(strips)]
            nproc = _process_count(workers, len(strips), info.width * info.height)
            for i, facts in enumerate(_scans(jobs, nproc), start=1):
                sv.add(jobs[i - 1][1], facts)
                if progress is not None:
                    progress(i, total)
            result.stats = sv.decide()
        profile = _profile(ds, compress)
        with store.staged_file(out_path.name) as tmp:
            import rasterio

            with rasterio.open(tmp, "w", **profile) as out:
                _copy_metadata(ds, out)
                for i, (r0, h) in enumerate(strips, start=len(strips) + 1):
                    data = ds.read(1, window=Window(0, r0, info.width, h))
                    cleaned = sv.apply(r0, data) if threshold > 1 else data
                    result.pixels_changed += int(np.count_nonzero(cleaned != data))
                    out.write(cleaned, 1, window=Window(0, r0, info.width, h))
                    if progress is not None:
                        progress(i, total)
            check_writable(out_path, overwrite, elsewhere="another DST")
    result.seconds, result.cpu_seconds = time.perf_counter() - t0, _cpu() - c0
    log.info("sieved %s to %s: threshold %d px (%s), %d-connected, %d of %d small regions merged, %d pixels "
             "changed, %.1f s (%.1f s CPU)", path, out_path, threshold, mmu, connectivity, result.stats.merged,
             result.stats.small, result.pixels_changed, result.seconds, result.cpu_seconds)
    return result


PROCESS_MIN_PIXELS = 16 * 2**20  # below, starting worker processes costs more than it saves


def _process_count(workers: int | None, strips: int, pixels: int) -> int:
    """Worker processes for the first read: 0 (this process) or at least 2."""
    if workers is None:
        workers = min(4, _cores())
    if workers < 1:
        raise InputError(f"--workers must be a positive integer, got {workers!r}")
    n = min(workers, strips)
    if n < 2 or pixels < PROCESS_MIN_PIXELS or multiprocessing.current_process().daemon:
        return 0
    return n


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _scan_file_strip(path: str, row0: int, rows: int, width: int, mask_kind: str, threshold: int,
                     connectivity: int, spill: Path) -> StripScan:
    """:func:`scan_strip` of one strip read from ``path`` (in a worker process, or here)."""
    with gdal_env(), open_scene(path) as ds:
        win = Window(0, row0, width, rows)
        data = ds.read(1, window=win)
        valid = band_validity(data[None], ds, [1], win, mask_kind)[0]
    return scan_strip(row0, data, valid, threshold, connectivity, spill)


def _scans(jobs: list[tuple[Any, ...]], processes: int) -> Iterator[StripScan]:
    """The scans of ``jobs`` in order: here, or in ``processes`` worker processes (``spawn``; a few strips
    ahead, so that memory stays that of a few strips)."""
    pool = None
    if processes:
        try:
            pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker)
        except (OSError, ImportError, NotImplementedError) as exc:  # e.g. no working sem_open in a sandbox
            log.warning("cannot start sieve worker processes (%s): labelling in this process", exc)
    if pool is None:
        for job in jobs:
            yield _scan_file_strip(*job)
        return
    try:
        ahead: deque[Future[StripScan]] = deque()
        nxt = 0
        while nxt < len(jobs) and len(ahead) < 2 * processes:
            ahead.append(pool.submit(_scan_file_strip, *jobs[nxt]))
            nxt += 1
        while ahead:
            facts = ahead.popleft().result()
            if nxt < len(jobs):
                ahead.append(pool.submit(_scan_file_strip, *jobs[nxt]))
                nxt += 1
            yield facts
    except BrokenProcessPool as exc:
        raise WorkerError(f"{jobs[0][0]}: a sieve worker process died ({exc}); if memory ran out, lower workers; "
                          "a script that sieves at import time must do it under `if __name__ == \"__main__\":`; "
                          "workers=1 labels in this process") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's: it shuts the pool down


@contextlib.contextmanager
def sieved_source(src: str | os.PathLike[str], mmu: float | int | str | Quantity | None, connectivity: int,
                  folder: str | os.PathLike[str], workers: int | None = None) -> Iterator[str]:
    """``src`` itself when there is no ``mmu``; otherwise ``src`` sieved (:func:`sieve_raster`) into a hidden
    temporary folder in ``folder``, removed on the way out, for a step that reads the cleaned map."""
    if mmu is None:
        yield os.fspath(src)
        return
    parent = Path(os.fspath(folder))
    parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sieve-", dir=parent) as tmp:
        out = Path(tmp) / (Path(os.fspath(src)).stem + ".sieved.tif")
        sieve_raster(src, out, mmu, connectivity, compress=None, workers=workers)
        yield os.fspath(out)


def _profile(ds: Any, compress: str | None) -> dict[str, Any]:
    profile = dict(ds.profile)
    profile.pop("compress", None)
    profile.update(driver="GTiff", tiled=True, blockxsize=512, blockysize=512, BIGTIFF="IF_SAFER")
    if ds.width < 512 or ds.height < 512:
        profile.update(tiled=False, blockxsize=None, blockysize=None)
        profile = {k: v for k, v in profile.items() if v is not None}
    if compress is not None:
        profile["compress"] = compress
    return profile


def _copy_metadata(ds: Any, out: Any) -> None:
    out.update_tags(**ds.tags())
    out.update_tags(1, **ds.tags(1))
    with contextlib.suppress(ValueError):  # no colour table
        out.write_colormap(1, ds.colormap(1))
    if ds.descriptions[0]:
        out.set_band_description(1, ds.descriptions[0])


__all__ = ["STRIP_PIXELS", "SieveResult", "SieveStats", "StripSieve", "default_strip_rows", "mmu_pixels",
           "sieve_array", "sieve_raster", "sieved_source"]
