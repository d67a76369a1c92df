"""The tools: :func:`vectorize_raster` (to a file, streaming) and :func:`polygonize` (to a GeoDataFrame).

They plan (:mod:`.plan`), polygonise blocks (:mod:`.blocks`), join pieces across seams (:mod:`.merge`,
:mod:`.stitch`), turn pieces into features (:mod:`.features`) and write them (:mod:`.writers`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd

from geoseg.errors import InputError
from geoseg.gis.sieve import sieved_source
from geoseg.gis.vectorize import formats
from geoseg.gis.vectorize.blocks import iter_blocks
from geoseg.gis.vectorize.features import (
    Features,
    empty_frame,
    finalize,
    to_geodataframe,
)
from geoseg.gis.vectorize.formats import format_for
from geoseg.gis.vectorize.merge import Merger
from geoseg.gis.vectorize.plan import BLOCK_SIZE, Plan, make_plan
from geoseg.gis.vectorize.simplify import simplify_coverage
from geoseg.gis.vectorize.writers import rebatch, write_ogr, write_parquet
from geoseg.io.raster import check_writable
from geoseg.io.store import Store

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class VectorizeResult:
    """What :func:`vectorize_raster` wrote.

    Attributes:
        path: the output file (for a shapefile, the ``.shp``).
        vector_format: the format's registry name.
        features: number of polygons written.
        class_counts: polygons per class id.
        class_areas_m2: total area in square metres per class id (NaN when the raster has no CRS).
        crs: the output CRS as a string (``None`` when the raster has none).
        blocks: number of blocks polygonised.
        seconds: wall time.
    """

    path: Path
    vector_format: str
    features: int = 0
    class_counts: dict[int, int] = field(default_factory=dict)
    class_areas_m2: dict[int, float] = field(default_factory=dict)
    crs: str | None = None
    blocks: int = 0
    seconds: float = 0.0

    def add(self, batch: Features) -> None:
        self.features += len(batch)
        if not len(batch):
            return
        frame = pd.DataFrame({"class_id": batch.class_id, "area_m2": batch.area_m2})
        grouped = frame.groupby("class_id")["area_m2"].agg(["count", "sum"])
        for cid, row in grouped.iterrows():
            k = int(cid)  # type: ignore[call-overload]
            self.class_counts[k] = self.class_counts.get(k, 0) + int(row["count"])
            self.class_areas_m2[k] = self.class_areas_m2.get(k, 0.0) + float(row["sum"])


def polygonize(src: str | os.PathLike[str], *, connectivity: int = 4,
               min_area: float | str | None = None, simplify: float | str | None = None,
               skip_classes: Iterable[int] = (), class_names: Mapping[int, str] | None = None,
               to_crs: Any = None, block_size: int = BLOCK_SIZE, workers: int | None = None,
               progress: Progress | None = None, mmu: float | str | None = None,
               confidence: str | os.PathLike[str] | None = None) -> gpd.GeoDataFrame:
    """Polygons of a class raster as a GeoDataFrame, without writing a file.

    Same polygons and options (``mmu`` included) as :func:`vectorize_raster` (which streams them to a file
    instead); the
    result is held in memory, so prefer :func:`vectorize_raster` for large rasters.

    Returns:
        GeoDataFrame with columns ``class_id`` (int32), ``class_name`` (str or None), ``area_m2``,
        ``perim_m``, with ``confidence`` also ``confidence_mean`` (float64, 0..1), and ``geometry`` (Polygon; MultiPolygon with 8-connectivity), in the raster's CRS or
        ``to_crs``.

    Raises:
        InputError: unreadable raster, not a one-band integer raster, or a bad option.
    """
    with sieved_source(src, mmu, connectivity, tempfile.gettempdir(), workers) as source:
        plan = make_plan(source, connectivity=connectivity, min_area=min_area, simplify=simplify,
                         skip_classes=skip_classes, class_names=class_names, to_crs=to_crs, block_size=block_size,
                         confidence=confidence)
        batches = list(_iter_features(plan, _workers(workers), progress))
    if not batches:
        return empty_frame(plan)
    return to_geodataframe(plan, Features.concat(batches))




def vectorize_raster(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                     vector_format: str | None = None, connectivity: int = 4,
                     min_area: float | str | None = None, simplify: float | str | None = None,
                     skip_classes: Iterable[int] = (), class_names: Mapping[int, str] | None = None,
                     to_crs: Any = None, block_size: int = BLOCK_SIZE, workers: int | None = None,
                     overwrite: bool = False, progress: Progress | None = None,
                     mmu: float | str | None = None,
                     confidence: str | os.PathLike[str] | None = None) -> VectorizeResult:
    """Polygonise a class raster block by block and stream the polygons to a vector file.

    Args:
        src: one-band integer class raster (e.g. the class map of ``geoseg predict``).
        dst: output path; its extension picks the format unless ``vector_format`` is given
            (``.gpkg`` default, ``.shp``, ``.geojson``, ``.parquet``).
        vector_format: a name in :data:`FORMATS` (``gpkg``, ``shp``, ``geojson``, ``parquet``).
        connectivity: 4 (edge neighbours) or 8 (also diagonal neighbours) joins pixels into polygons.
        min_area: drop smaller polygons: ``"40px"``, ``"200m2"``, ``"0.5ha"``; a plain number is pixels.
            Dropped polygons leave holes (sieve the raster first to absorb them into neighbours).
        simplify: topology-preserving simplification tolerance: ``"1m"``, ``"0.5px"`` or a number in CRS
            units; neighbouring polygons keep shared edges (no gaps, no overlaps). Holds all polygons.
        skip_classes: class ids that produce no polygons (background); nodata never does.
        class_names: class id -> name; default from the raster's ``CLASSES`` / ``CLASS_<id>`` tags.
        to_crs: reproject the output (any pyproj CRS input); GeoJSON is always EPSG:4326.
        block_size: block side in pixels; memory grows with ``workers * block_size**2``.
        workers: processes polygonising blocks, ~130 MB each (default: the CPUs available, at most 4);
            threads for rasters under 32 megapixels, with ``workers=1`` and in daemonic processes such as
            dask's workers (:mod:`geoseg.gis.vectorize.pool`). The polygons are the same either way. A script
            calling this at import time needs ``if __name__ == "__main__":`` (the workers import it).
        overwrite: replace an existing output.
        progress: called as ``progress(done_blocks, total_blocks)`` after each block.
        mmu: minimum mapping unit: first sieve the raster (:func:`geoseg.gis.sieve.sieve_raster`, GDAL's
            sieve of the whole raster, streamed, with this ``connectivity``) so that every region smaller
            than ``"0.5ha"``, ``"5000m2"`` or ``"12px"`` takes its largest neighbour's class, then polygonise
            the cleaned raster (a temporary file in a hidden folder beside ``dst``, removed at the end).
        confidence: a confidence map on the raster's grid (``<stem>.confidence.tif`` of ``geoseg predict``:
            uint8, 254 = 1, nodata 255): each polygon gets ``confidence_mean``, the mean confidence (0..1)
            of its pixels (``conf_mean`` in a shapefile).

    Returns:
        A :class:`VectorizeResult` (path, counts and areas per class, seconds).

    Raises:
        InputError: unreadable or unsuitable raster, bad option, or a shapefile past the 2 GB limit.
        WorkerError: a worker process died (out of memory, killed).
        OutputExistsError: ``dst`` exists and ``overwrite`` is false.
        UnknownNameError: unknown ``vector_format``.
    """
    t0 = time.perf_counter()
    path, fmt = format_for(dst, vector_format)
    check_writable(path, overwrite, elsewhere="another DST")
    with sieved_source(src, mmu, connectivity, path.parent, workers) as source:
        result = _vectorize(source, path, fmt, connectivity=connectivity, min_area=min_area, simplify=simplify,
                            skip_classes=skip_classes, class_names=class_names, to_crs=to_crs,
                            block_size=block_size, workers=workers, overwrite=overwrite, progress=progress,
                            confidence=confidence)
    result.seconds = time.perf_counter() - t0
    log.info("vectorised %s: %d polygons in %d blocks to %s (%s) in %.1f s", os.fspath(src), result.features,
             result.blocks, path, fmt.name, result.seconds)
    return result


def _vectorize(src: str, path: Path, fmt: formats.VectorFormat, *, connectivity: int, min_area: Any,
               simplify: Any, skip_classes: Iterable[int], class_names: Mapping[int, str] | None, to_crs: Any,
               block_size: int, workers: int | None, overwrite: bool, progress: Progress | None,
               confidence: str | os.PathLike[str] | None) -> VectorizeResult:
    plan = make_plan(src, connectivity=connectivity, min_area=min_area, simplify=simplify,
                      skip_classes=skip_classes, class_names=class_names, to_crs=to_crs, block_size=block_size,
                      force_4326=fmt.epsg4326, confidence=confidence)
    nworkers = _workers(workers)
    result = VectorizeResult(path=path, vector_format=fmt.name,
                             crs=plan.out_crs.to_string() if plan.out_crs is not None else None,
                             blocks=plan.rows * plan.cols)
    store = Store(path.parent)
    store.prepare()
    features = _iter_features(plan, nworkers, progress)
    # closed on the way out, so that a failing write (a shapefile's size limit) stops the workers at once
    with store.staged_file(path.name) as tmp, contextlib.closing(features):
        batches = rebatch(features, result.add)
        if fmt.driver is None:
            write_parquet(tmp, batches, plan)
        else:
            write_ogr(tmp, batches, plan, fmt)
        check_writable(path, overwrite, elsewhere="another DST")
        for f in sorted(tmp.parent.iterdir()):  # a shapefile is several files; the .shp goes last, on exit
            if f != tmp:
                store.publish(f, f.name)
    return result


def _iter_features(plan: Plan, workers: int, progress: Progress | None) -> Generator[Features, None, None]:
    """Output features in batches (in the output CRS)."""
    merger = Merger(plan)
    total = plan.rows * plan.cols
    held_geoms: list[np.ndarray] = []  # only with simplify: the whole coverage in pixel coordinates
    held_cls: list[np.ndarray] = []
    held_conf: list[np.ndarray | None] = []
    with contextlib.closing(iter_blocks(plan, workers)) as blocks:
        for done, blk in enumerate(blocks, start=1):
            merger.add(blk)
            closed, blk.closed = blk.closed, None  # written, then freed
            if plan.simplify_px is None:
                if len(closed):
                    yield closed
            else:
                held_geoms.append(closed[0])
                held_cls.append(closed[1])
                held_conf.append(closed[2])
            del closed
            if blk.c == plan.cols - 1:
                geoms, cls, conf = merger.complete(blk.r, blk.r == plan.rows - 1)
                if plan.simplify_px is None:
                    if len(geoms):
                        batch = finalize(plan, geoms, cls, conf)
                        del geoms  # the pixel-coordinate polygons: not held while the batch is written
                        yield batch
                        del batch
                else:
                    held_geoms.append(geoms)
                    held_cls.append(cls)
                    held_conf.append(conf)
                log.debug("block row %d done: %d open pieces", blk.r, merger.open_count)
            if progress is not None:
                progress(done, total)
    if plan.simplify_px is not None:
        yield from _simplified(plan, held_geoms, held_cls, held_conf)


def _simplified(plan: Plan, held_geoms: list[np.ndarray], held_cls: list[np.ndarray],
                held_conf: list[np.ndarray | None]) -> Iterator[Features]:
    geoms = np.concatenate(held_geoms) if held_geoms else np.empty(0, dtype=object)
    cls = np.concatenate(held_cls) if held_cls else np.empty(0, dtype=np.int64)
    conf = None
    if plan.confidence is not None:
        conf = np.concatenate([c for c in held_conf if c is not None]).reshape(-1, 2) if held_conf else \
            np.zeros((0, 2))
    if not len(geoms):
        return
    # Douglas-Peucker on the shared edges (a distance: .simplify); --min-area then applies to what is
    # written, the simplified polygons (in finalize)
    assert plan.simplify_px is not None
    simple = simplify_coverage(geoms, plan.simplify_px)
    for i in range(0, len(simple), formats.BATCH_FEATURES):
        j = i + formats.BATCH_FEATURES
        yield finalize(plan, simple[i:j], cls[i:j], None if conf is None else conf[i:j])


def _workers(workers: int | None) -> int:
    if workers is None:
        from geoseg.io.workers import default_workers

        return default_workers()  # the one rule, shared with predict
    if not isinstance(workers, int) or workers < 1:
        raise InputError(f"--workers must be a positive integer, got {workers!r}")
    return workers
