"""A class map as strata: its classes with their names, exact pixel counts and ground areas, read in windows.

:func:`read_strata` reads the map once, window by window (memory bounded by a window, never the map), and
counts the pixels of every class id it holds; nodata and masked pixels are no stratum. Class names come from
the map's tags, as ``geoseg vectorize`` and ``geoseg info`` read them
(:func:`geoseg.gis.vectorize.plan.class_names_from_tags`); a class the tags do not name is ``class <id>``.

Areas are ground areas, measured as the README says areas are: a pixel of a projected CRS that keeps ground
areas (UTM, national grids) is its planar area in the CRS's units; on a geographic CRS, and on a projected one
whose areal scale at the map departs from 1 by more than :data:`geoseg.io.geodesy.TOLERANCE` (Web Mercator), a
pixel's area is geodesic, on the CRS's ellipsoid, row by row (pixels of one row of a north-up grid have one
area; the middle column's pixel stands for its row on a distorting projected CRS).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from geoseg.errors import InputError
from geoseg.gis.vectorize.plan import class_names_from_tags
from geoseg.io.geodesy import distorts
from geoseg.io.raster import gdal_env, inspect_class_map, open_scene

log = logging.getLogger(__name__)

WINDOW_PIXELS = 1 << 22  # about 4 Mpix per read: the memory of one window, whatever the map's size


@dataclass(frozen=True)
class MapStrata:
    """The classes of a class map (ascending ids: those it maps and those its tags name) with names, pixel
    counts and ground areas; the strata are the classes with pixels (:attr:`strata`)."""

    path: str
    width: int
    height: int
    crs: Any
    transform: Any
    nodata: float | None
    ids: tuple[int, ...]
    names: dict[int, str]
    pixels: dict[int, int]
    area_m2: dict[int, float] | None  # None: the map has no CRS, so no ground area
    area_method: str  # "planar", "geodesic" or "none"

    @property
    def strata(self) -> tuple[int, ...]:
        return tuple(i for i in self.ids if self.pixels[i] > 0)

    @property
    def total_pixels(self) -> int:
        return sum(self.pixels.values())

    @property
    def total_area_m2(self) -> float | None:
        return None if self.area_m2 is None else float(sum(self.area_m2.values()))

    def name(self, class_id: int) -> str:
        return self.names.get(class_id, f"class {class_id}")


def windows(ds: rasterio.DatasetReader) -> Iterator[Window]:
    """Windows covering the map in a fixed order (rows of windows, left to right), each aligned to the
    file's blocks and about :data:`WINDOW_PIXELS` large."""
    bh, bw = ds.block_shapes[0]
    cols = min(ds.width, max(bw, (2048 // bw) * bw))
    rows = max(bh, (max(1, WINDOW_PIXELS // cols) // bh) * bh)
    for r0 in range(0, ds.height, rows):
        for c0 in range(0, ds.width, cols):
            yield Window(c0, r0, min(cols, ds.width - c0), min(rows, ds.height - r0))


def read_classes(ds: rasterio.DatasetReader, window: Window) -> np.ma.MaskedArray:
    """Band 1 in ``window`` with nodata and masked pixels masked."""
    return ds.read(1, window=window, masked=True)


def values_at(path: str | os.PathLike[str], xs: np.ndarray, ys: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Band 1's value under each point, the points' coordinates in the raster's CRS.

    A point belongs to the pixel that holds it (a point on a pixel's left or top edge to that pixel). One
    pixel is read per point, so memory and time follow the number of points, never the raster's size.

    Returns:
        ``(values, inside, valid)``: the values (int64; 0 where not ``valid``), whether each point lies on
        the raster, and whether it lies on a pixel with a value (on the raster, not nodata or masked).

    Raises:
        InputError: the raster cannot be read.
    """
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    values = np.zeros(len(xs), dtype=np.int64)
    valid = np.zeros(len(xs), dtype=bool)
    with gdal_env(), open_scene(path) as ds:
        cols, rows = ~ds.transform * (xs, ys)
        cols, rows = np.floor(np.asarray(cols)), np.floor(np.asarray(rows))
        inside = np.isfinite(cols) & np.isfinite(rows)
        inside &= (cols >= 0) & (rows >= 0) & (cols < ds.width) & (rows < ds.height)
        for k in np.flatnonzero(inside):
            r, c = int(rows[k]), int(cols[k])
            a = ds.read(1, window=((r, r + 1), (c, c + 1)), masked=True)
            if not np.ma.getmaskarray(a)[0, 0]:
                values[k], valid[k] = int(a[0, 0]), True
    return values, inside, valid


def count_values(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of a 1-D integer array and how often each occurs (ascending): a bincount for
    8- and 16-bit unsigned ids, a sort otherwise."""
    if values.dtype.kind == "u" and values.dtype.itemsize <= 2:
        n = np.bincount(values)
        ids = np.flatnonzero(n)
        return ids, n[ids]
    return np.unique(values, return_counts=True)


def pixel_row_areas(crs: Any, transform: Any, width: int, height: int) -> tuple[str, np.ndarray | None]:
    """The ground area (m2) of a pixel in each row of the grid, and how it was measured (see the module's
    text): ``("planar", areas)``, ``("geodesic", areas)`` or ``("none", None)`` without a CRS."""
    if crs is None:
        return "none", None
    import pyproj

    bounds = rasterio.transform.array_bounds(height, width, transform)
    west, south, east, north = bounds
    if not crs.is_geographic and not distorts(crs, (west, south, east, north)):
        try:
            unit = float(crs.linear_units_factor[1])
        except Exception:  # no linear units declared: take them as metres
            unit = 1.0
        return "planar", np.full(height, abs(transform.determinant) * unit * unit)
    src = pyproj.CRS.from_user_input(crs)
    geod = src.get_geod() or pyproj.Geod(ellps="WGS84")
    col = width // 2
    rows = np.arange(height + 1, dtype=np.float64)
    # the corners of the middle column's pixel in every row, as longitude / latitude
    xs = np.concatenate([transform.c + c * transform.a + rows * transform.b for c in (col, col + 1)])
    ys = np.concatenate([transform.f + c * transform.d + rows * transform.e for c in (col, col + 1)])
    if not src.is_geographic:
        to_geo = pyproj.Transformer.from_crs(src, src.geodetic_crs, always_xy=True)
        xs, ys = to_geo.transform(xs, ys)
    lon = np.asarray(xs).reshape(2, height + 1)
    lat = np.asarray(ys).reshape(2, height + 1)
    areas = np.empty(height)
    for r in range(height):
        ring_lon = [lon[0, r], lon[1, r], lon[1, r + 1], lon[0, r + 1]]
        ring_lat = [lat[0, r], lat[1, r], lat[1, r + 1], lat[0, r + 1]]
        areas[r] = abs(geod.polygon_area_perimeter(ring_lon, ring_lat)[0])
    return "geodesic", areas


def read_strata(path: str | os.PathLike[str]) -> MapStrata:
    """Count the pixels (and sum the ground area) of every class of a class map, window by window.

    Raises:
        InputError: the file is not a one-band integer raster, or holds no mapped pixel.
    """
    p = os.fspath(path)
    info = inspect_class_map(p)
    method, row_areas = pixel_row_areas(info.crs, info.transform, info.width, info.height)
    counts: dict[int, int] = {}
    areas: dict[int, float] = {}
    with gdal_env(), open_scene(p) as ds:
        names = class_names_from_tags(ds.tags())
        for window in windows(ds):
            a = read_classes(ds, window)
            values = a.compressed()
            if not values.size:
                continue
            ids, n = count_values(values)
            for i, k in zip(ids.tolist(), n.tolist(), strict=True):
                counts[i] = counts.get(i, 0) + k
            if row_areas is not None:
                r0 = int(window.row_off)
                ra = row_areas[r0:r0 + int(window.height)]
                filled = a.filled(0) if np.ma.is_masked(a) else np.asarray(a)
                valid = ~np.ma.getmaskarray(a)
                for i in ids.tolist():
                    per_row = ((filled == i) & valid).sum(axis=1)
                    areas[i] = areas.get(i, 0.0) + float(per_row @ ra)
    if not counts:
        raise InputError(f"{p}: holds no mapped pixel (everything is nodata); give a class map with classes")
    ids_sorted = tuple(sorted(set(counts) | set(names)))
    log.info("%s: %d classes mapped, %d mapped pixels", p, len(counts), sum(counts.values()))
    return MapStrata(path=p, width=info.width, height=info.height, crs=info.crs, transform=info.transform,
                     nodata=info.nodata, ids=ids_sorted, names={i: names.get(i, f"class {i}") for i in ids_sorted},
                     pixels={i: counts.get(i, 0) for i in ids_sorted},
                     area_m2=None if row_areas is None else {i: areas.get(i, 0.0) for i in ids_sorted},
                     area_method=method)


def ha(m2: float | None) -> float | None:
    """Square metres as hectares."""
    return None if m2 is None or not math.isfinite(m2) else m2 / 1e4


__all__ = ["WINDOW_PIXELS", "MapStrata", "count_values", "pixel_row_areas", "read_classes", "read_strata",
           "values_at", "windows"]
