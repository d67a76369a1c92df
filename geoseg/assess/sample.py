"""Stratified random sampling of a class map of any size, for reference interpretation.

The strata are the map's classes. :func:`sample_points` reads the map twice, window by window in one fixed
order (:func:`geoseg.assess.strata.windows`; memory is one window, never the map): the first pass counts the
pixels of each class (:func:`geoseg.assess.strata.read_strata`); then, for each stratum in ascending class
order, a seeded :class:`numpy.random.Generator` draws the ranks of its sampled pixels, without replacement,
among its ``N_h`` pixels (numbered in the windows' order, and row by row inside a window); the second pass
finds the pixels of those ranks. Each point sits at its pixel's centre, on a pixel of its stratum; nodata and
masked pixels are never drawn. The same map, ``n``, allocation and seed give the same points.

The points file (GeoPackage by default; any format of :data:`geoseg.gis.vectorize.FORMATS`) has the columns
``point_id``, ``class_id`` and ``class_name`` (the map class, the stratum), ``stratum_px`` (the stratum's
pixel count: its weight in the estimators) and an empty text column ``reference`` for the interpreters'
class (an id or a name), which ``geoseg assess`` reads back.

With ``label_from`` (``geoseg sample --label-from RASTER``), the ``reference`` column is filled from a
reference class raster instead (a better map, or the demo's truth): each point takes the value of the pixel
under it, the point reprojected to the raster's CRS when that differs (:func:`label_points`). Points off the
raster or on its nodata keep an empty reference; one warning counts them.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.assess.estimate import allocate, parse_allocation, sample_size
from geoseg.assess.strata import MapStrata, count_values, read_classes, read_strata, values_at, windows
from geoseg.errors import InputError
from geoseg.gis.vectorize.formats import format_for
from geoseg.io.raster import SceneInfo, check_writable, gdal_env, inspect_scene, open_scene
from geoseg.io.store import Store

log = logging.getLogger(__name__)

DEFAULT_EXPECTED_ACCURACY = 0.9  # the conjectured user's accuracy of every class, unless told otherwise
POINT_COLUMNS = ("point_id", "class_id", "class_name", "stratum_px", "reference")


@dataclass
class Stratum:
    """One stratum of a sample: a map class, its pixels and area share, and the points drawn in it."""

    id: int
    name: str
    pixels: int
    weight: float
    points: int
    expected_accuracy: float


@dataclass
class SampleResult:
    """What :func:`sample_points` wrote: the points file, the design and the seed that repeats it."""

    path: Path
    vector_format: str
    n: int
    allocation: str
    seed: int
    strata: list[Stratum] = field(default_factory=list)
    suggested_n: int | None = None  # eq. 13, with target_se
    target_se: float | None = None
    label_from: str | None = None  # the reference class raster the reference column was filled from
    labelled: int = 0  # points whose reference it filled (the others lie off it or on its nodata)
    seconds: float = 0.0


def parse_expected_accuracy(value: float | str | Mapping[int, float] | None,
                            ids: tuple[int, ...]) -> dict[int, float]:
    """Conjectured user's accuracy per class id: one number for all, ``"1:0.7,2:0.6"`` (ids not named get
    :data:`DEFAULT_EXPECTED_ACCURACY`), or a mapping.

    Raises:
        InputError: malformed text or a value outside [0, 1].
    """
    out = dict.fromkeys(ids, DEFAULT_EXPECTED_ACCURACY)
    if value is None:
        return out
    if isinstance(value, Mapping):
        given = {int(k): float(v) for k, v in value.items()}
    elif isinstance(value, (int, float)) or re.fullmatch(r"\s*[0-9.]+\s*", str(value)):
        given = dict.fromkeys(ids, float(value))
    else:
        given = {}
        for part in str(value).split(","):
            key, sep, num = part.partition(":")
            try:
                if not sep:
                    raise ValueError(part)
                given[int(key)] = float(num)
            except ValueError:
                raise InputError(f"--expected-accuracy {value!r}: give one accuracy (0.9) or class:accuracy pairs "
                                 "(1:0.7,2:0.6)") from None
    bad = {k: v for k, v in given.items() if not 0 <= v <= 1}
    if bad:
        raise InputError(f"--expected-accuracy {value!r}: accuracies lie between 0 and 1")
    out.update({k: v for k, v in given.items() if k in out})
    return out


def design(strata: MapStrata, n: int | None, allocation: str = "proportional", *, target_se: float | None = None,
           expected_accuracy: float | str | Mapping[int, float] | None = None
           ) -> tuple[list[Stratum], int | None]:
    """Points per stratum: ``n`` (or, without it, eq. 13's size for ``target_se``) allocated as asked.

    Returns:
        The strata with their points, and eq. 13's suggested size (``None`` without ``target_se``).

    Raises:
        InputError: neither ``n`` nor ``target_se``; a bad allocation or accuracy.
    """
    ids = strata.strata
    pixels = np.array([strata.pixels[i] for i in ids], dtype=np.int64)
    expected = parse_expected_accuracy(expected_accuracy, ids)
    u = np.array([expected[i] for i in ids])
    suggested = sample_size(pixels, u, target_se) if target_se is not None else None
    if n is None:
        if suggested is None:
            raise InputError("give the sample size (-n N) or a target standard error of overall accuracy "
                             "(--target-se 0.01) to size it")
        n = min(suggested, int(pixels.sum()))
    per = allocate(n, pixels, allocation, u)
    total = pixels.sum()
    return [Stratum(i, strata.name(i), int(px), float(px / total), int(k), float(e))
            for i, px, k, e in zip(ids, pixels, per, u, strict=True)], suggested


def _draw_ranks(strata: list[Stratum], rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Sorted pixel ranks (0 .. pixels - 1) of the sampled pixels of each stratum, strata in ascending order."""
    return {s.id: np.sort(rng.choice(s.pixels, size=s.points, replace=False)) for s in strata if s.points}


def _locate(path: str, ranks: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``(class_ids, rows, cols)`` of the pixels of the given per-class ranks: one pass over the map in
    the order of :func:`~geoseg.assess.strata.windows`."""
    seen = dict.fromkeys(ranks, 0)
    nxt = dict.fromkeys(ranks, 0)  # index of the next rank to find, per class
    cls: list[np.ndarray] = []
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    with gdal_env(), open_scene(path) as ds:
        for window in windows(ds):
            if all(nxt[c] == len(r) for c, r in ranks.items()):
                break
            a = read_classes(ds, window)
            valid = ~np.ma.getmaskarray(a)
            data = np.asarray(a.data)
            ids, n = count_values(data[valid])
            in_window = dict(zip(ids.tolist(), n.tolist(), strict=True))
            for c, r in ranks.items():
                k = in_window.get(c, 0)
                if nxt[c] == len(r) or not k:
                    continue
                stop = int(np.searchsorted(r, seen[c] + k))
                if stop > nxt[c]:
                    flat = np.flatnonzero((data == c) & valid)[r[nxt[c]:stop] - seen[c]]
                    rr, cc = np.divmod(flat, int(window.width))
                    cls.append(np.full(len(flat), c, dtype=np.int64))
                    rows.append(rr + int(window.row_off))
                    cols.append(cc + int(window.col_off))
                    nxt[c] = stop
                seen[c] += k
    missing = {c: len(r) - nxt[c] for c, r in ranks.items() if nxt[c] != len(r)}
    if missing:  # the map changed between the two passes
        raise InputError(f"{path}: {sum(missing.values())} sampled pixels were not found again (did the file change "
                         "while it was read?); run the command again")
    if not cls:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(cls), np.concatenate(rows), np.concatenate(cols)


def check_reference_raster(path: str | os.PathLike[str]) -> SceneInfo:
    """Check that ``path`` is a reference class raster :func:`label_points` can read: one band of integers.

    Raises:
        InputError: unreadable, several bands, or not integers (named as ``--label-from``).
    """
    p = os.fspath(path)
    try:
        info = inspect_scene(p)
    except InputError as exc:
        raise InputError(f"--label-from {exc}") from None
    if info.count != 1:
        raise InputError(f"--label-from {p}: has {info.count} bands; give a one-band raster of reference class "
                         "ids (e.g. gdal_translate -b 1 to keep one band)")
    if np.dtype(info.dtype).kind not in "iu":
        raise InputError(f"--label-from {p}: band 1 is {info.dtype}; give a raster of integer reference class "
                         "ids (convert it, e.g. gdal_translate -ot Byte)")
    return info


def label_points(raster: str | os.PathLike[str], xs: np.ndarray, ys: np.ndarray, crs: Any) -> list[str | None]:
    """Reference classes for points from a reference class raster: the value of the pixel under each point.

    Args:
        raster: a one-band integer raster of reference class ids (:func:`check_reference_raster`).
        xs: the points' x coordinates, shape ``(n,)``, in ``crs``.
        ys: their y coordinates, shape ``(n,)``.
        crs: the points' CRS; the points are reprojected to the raster's CRS when it differs. ``None`` (or a
            raster without a CRS): the coordinates are taken to be in the raster's CRS.

    Returns:
        Each point's class id as text (the ``reference`` column is text, so that interpreters may also type
        names), ``None`` for a point off the raster or on its nodata; one warning counts those.

    Raises:
        InputError: the raster is not a one-band integer raster, or cannot be read.
    """
    p = os.fspath(raster)
    info = check_reference_raster(p)
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if crs is not None and info.crs is not None and info.crs != crs:
        from rasterio.warp import transform

        log.info("%s: the points are reprojected to the raster's CRS (%s)", p, info.crs.to_string())
        tx, ty = transform(crs, info.crs, xs.tolist(), ys.tolist())
        xs, ys = np.asarray(tx, dtype=np.float64), np.asarray(ty, dtype=np.float64)
    elif (crs is None) != (info.crs is None):
        log.warning("%s: %s has no CRS; the points' coordinates are taken to be in the raster's", p,
                    "the map" if crs is None else "the raster")
    values, inside, valid = values_at(p, xs, ys)
    off, nodata = int((~inside).sum()), int((inside & ~valid).sum())
    if off or nodata:
        log.warning("%s: %d of %d points lie off the raster (%d) or on its nodata (%d); their reference is left "
                    "empty", p, off + nodata, len(xs), off, nodata)
    return [str(int(v)) if ok else None for v, ok in zip(values.tolist(), valid.tolist(), strict=True)]


def _pixel_centres(strata: MapStrata, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The map coordinates of the centres of the given pixels."""
    t = strata.transform
    xs = t.c + (cols + 0.5) * t.a + (rows + 0.5) * t.b
    ys = t.f + (cols + 0.5) * t.d + (rows + 0.5) * t.e
    return xs, ys


def _write_points(path: Path, fmt: Any, strata: MapStrata, design_: list[Stratum], cls: np.ndarray,
                  rows: np.ndarray, cols: np.ndarray, overwrite: bool,
                  reference: list[str | None] | None = None) -> None:
    import geopandas as gpd
    import pandas as pd

    xs, ys = _pixel_centres(strata, rows, cols)
    pixels = {s.id: s.pixels for s in design_}
    frame = gpd.GeoDataFrame({
        "point_id": np.arange(1, len(cls) + 1, dtype=np.int64),
        "class_id": cls.astype(np.int64),
        "class_name": [strata.name(int(c)) for c in cls],
        "stratum_px": np.array([pixels[int(c)] for c in cls], dtype=np.int64),
        "reference": pd.Series([None] * len(cls) if reference is None else reference, dtype=object),
    }, geometry=gpd.points_from_xy(xs, ys), crs=strata.crs)
    if fmt.epsg4326 and strata.crs is not None:
        log.info("%s: GeoJSON (RFC 7946) is written in EPSG:4326; the points are reprojected", path)
        frame = frame.to_crs("EPSG:4326")
    store = Store(path.parent)
    store.prepare()
    with store.staged_file(path.name) as tmp:
        if fmt.driver is None:
            frame.to_parquet(tmp)
        else:
            frame.to_file(tmp, driver=fmt.driver, layer=path.stem, engine="pyogrio",
                          layer_options=dict(fmt.layer_options) or None,
                          dataset_options=dict(fmt.dataset_options) or None)
        check_writable(path, overwrite, elsewhere="another --output")
        for f in sorted(tmp.parent.iterdir()):  # a shapefile's sidecars first; the main file on exit
            if f != tmp:
                store.publish(f, f.name)


def sample_points(classmap: str | os.PathLike[str], output: str | os.PathLike[str], n: int | None = None, *,
                  allocation: str = "proportional", seed: int | None = None, target_se: float | None = None,
                  expected_accuracy: float | str | Mapping[int, float] | None = None,
                  label_from: str | os.PathLike[str] | None = None, vector_format: str | None = None,
                  overwrite: bool = False) -> SampleResult:
    """Draw a stratified random sample of points from a class map and write it for interpretation.

    Args:
        classmap: a one-band integer class map (``geoseg predict``'s, or any).
        output: the points file; its extension picks the format (``.gpkg``, ``.shp``, ``.geojson``,
            ``.parquet``) unless ``vector_format`` is given.
        n: the sample size; without it, eq. 13's size for ``target_se``.
        allocation: ``proportional``, ``equal``, ``neyman`` or ``min:N`` (see :mod:`geoseg.assess.estimate`).
        seed: the random seed; ``None`` draws one (logged and returned, so the sample can be repeated).
        target_se: a target standard error of overall accuracy: eq. 13 suggests the sample size for it.
        expected_accuracy: conjectured user's accuracies for eq. 13 and ``neyman`` (one number, or per class
            id); default :data:`DEFAULT_EXPECTED_ACCURACY`.
        label_from: a one-band integer raster of reference classes: fills each point's ``reference`` with the
            class id under it (:func:`label_points`); without it, ``reference`` is left empty.
        vector_format: a name in :data:`geoseg.gis.vectorize.FORMATS`.
        overwrite: replace an existing points file.

    Returns:
        A :class:`SampleResult`.

    Raises:
        InputError: not a class map, no mapped pixel, a bad option, more points than pixels, or a
            ``label_from`` that is not a one-band integer raster. Nothing is written then.
        OutputExistsError: ``output`` exists and ``overwrite`` is false.
    """
    t0 = time.perf_counter()
    path, fmt = format_for(output, vector_format)
    check_writable(path, overwrite, elsewhere="another --output")
    parse_allocation(allocation)  # the options are checked before the map is read
    if n is not None and n < 1:
        raise InputError(f"-n {n}: give a positive number of sample points")
    if target_se is not None:
        sample_size([1], [DEFAULT_EXPECTED_ACCURACY], target_se)
    parse_expected_accuracy(expected_accuracy, ())
    if label_from is not None:
        check_reference_raster(label_from)
    strata = read_strata(classmap)
    plan, suggested = design(strata, n, allocation, target_se=target_se, expected_accuracy=expected_accuracy)
    if suggested is not None:
        log.info("eq. 13: %d points give overall accuracy a standard error of %g", suggested, target_se)
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1)[0] % (2**31))
        log.info("no --seed given: drew seed %d (pass --seed %d to draw the same points again)", seed, seed)
    ranks = _draw_ranks(plan, np.random.default_rng(seed))
    cls, rows, cols = _locate(strata.path, ranks)
    order = np.lexsort((cols, rows, cls))  # by stratum, then row, then column
    cls, rows, cols = cls[order], rows[order], cols[order]
    reference = None
    if label_from is not None:
        reference = label_points(label_from, *_pixel_centres(strata, rows, cols), strata.crs)
    _write_points(path, fmt, strata, plan, cls, rows, cols, overwrite, reference)
    total = int(sum(s.points for s in plan))
    result = SampleResult(path=path, vector_format=fmt.name, n=total, allocation=allocation, seed=int(seed),
                          strata=plan, suggested_n=suggested, target_se=target_se,
                          label_from=None if label_from is None else os.fspath(label_from),
                          labelled=0 if reference is None else sum(r is not None for r in reference),
                          seconds=time.perf_counter() - t0)
    log.info("sampled %d points in %d strata of %s to %s in %.1f s", total, len(plan), strata.path, path,
             result.seconds)
    return result


__all__ = ["DEFAULT_EXPECTED_ACCURACY", "POINT_COLUMNS", "SampleResult", "Stratum", "check_reference_raster",
           "design", "label_points", "parse_expected_accuracy", "sample_points"]
