"""Pixel-coordinate pieces to output features: CRS coordinates, areas and perimeters in metres,
``min_area``, ``to_crs``; features as columns (:class:`Features`), and as a GeoDataFrame.

Only numpy, shapely and pyproj here: block worker processes import this module, and stay lean without
geopandas (imported by :func:`to_geodataframe` alone).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyproj
import shapely

from geoseg.gis.vectorize.plan import Plan

if TYPE_CHECKING:
    import geopandas as gpd


@dataclass
class Features:
    """Output polygons as columns, in the output CRS: what blocks hand over and what the writers take.

    Attributes:
        class_id: ``(n,)`` int32.
        area_m2: ``(n,)`` float64, square metres (NaN when the raster has no CRS).
        perim_m: ``(n,)`` float64, metres.
        wkb: ``(n,)`` object array of WKB ``bytes`` (what every writer stores; cheap to send between processes).
        confidence_mean: ``(n,)`` float64, the mean confidence (0..1) of each polygon's pixels; NaN without a
            confidence map.
    """

    class_id: np.ndarray
    area_m2: np.ndarray
    perim_m: np.ndarray
    wkb: np.ndarray
    confidence_mean: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.confidence_mean is None:
            self.confidence_mean = np.full(len(self.class_id), np.nan)

    def __len__(self) -> int:
        return len(self.class_id)

    @classmethod
    def empty(cls) -> Features:
        return cls(np.zeros(0, np.int32), np.zeros(0), np.zeros(0), np.empty(0, dtype=object))

    @classmethod
    def concat(cls, parts: Sequence[Features]) -> Features:
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls.empty()
        return cls(np.concatenate([p.class_id for p in parts]), np.concatenate([p.area_m2 for p in parts]),
                   np.concatenate([p.perim_m for p in parts]), np.concatenate([p.wkb for p in parts]),
                   np.concatenate([p.confidence_mean for p in parts]))  # type: ignore[misc]

    def names(self, plan: Plan) -> list[str | None]:
        """The ``class_name`` column: each class id's name in the plan, or ``None``."""
        return [plan.names.get(k) for k in self.class_id.tolist()]


def to_crs_coords(plan: Plan, geoms_px: np.ndarray) -> np.ndarray:
    t = plan.transform
    if t.is_identity:
        return geoms_px

    def affine(xy: np.ndarray) -> np.ndarray:
        col, row = xy[:, 0], xy[:, 1]
        # the order of GDAL's own geotransform, so that coordinates match a whole-raster polygonisation
        return np.column_stack((t.c + col * t.a + row * t.b, t.f + col * t.d + row * t.e))

    return shapely.transform(geoms_px, affine)


def measure(plan: Plan, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground area (m2) and perimeter (m) of geometries in the raster's CRS: planar in the CRS's units where
    they are ground units (:mod:`geoseg.io.geodesy`), else geodesic on the CRS's ellipsoid."""
    if plan.area_mode == "planar":
        return shapely.area(geoms) * plan.unit_m**2, shapely.length(geoms) * plan.unit_m
    if plan.area_mode == "geodesic-projected" and plan.geod is not None and len(geoms):
        src = pyproj.CRS.from_user_input(plan.crs)
        t = _transformer(src, src.geodetic_crs)
        coords = shapely.get_coordinates(geoms)
        lon, lat = t.transform(coords[:, 0], coords[:, 1])
        geoms = shapely.set_coordinates(geoms.copy(), np.column_stack((lon, lat)))
    if plan.area_mode.startswith("geodesic") and plan.geod is not None:
        area = np.empty(len(geoms))
        perim = np.empty(len(geoms))
        for i, g in enumerate(geoms):
            a, p = plan.geod.geometry_area_perimeter(g)
            area[i], perim[i] = abs(a), p
        return area, perim
    nan = np.full(len(geoms), np.nan)
    return nan, nan.copy()


def keep_mask(plan: Plan, geoms_px: np.ndarray, area_m2: np.ndarray) -> np.ndarray:
    q = plan.min_area
    if q is None or q.value <= 0:
        return np.ones(len(geoms_px), dtype=bool)
    if q.unit == "px":
        return np.asarray(shapely.area(geoms_px) >= q.value)
    return np.asarray(area_m2 >= q.value)


def confidence_mean(conf: np.ndarray) -> np.ndarray:
    """Mean confidence (0..1) from per-polygon ``(n, 2)`` [sum of confidence values, pixel count]; NaN where
    no pixel had a confidence. The sums are exact integers, so pieces add up the same in any order."""
    out = np.full(len(conf), np.nan)
    np.divide(conf[:, 0], conf[:, 1] * 254.0, out=out, where=conf[:, 1] > 0)
    return out


def finalize(plan: Plan, geoms_px: np.ndarray, classes: np.ndarray, conf: np.ndarray | None = None) -> Features:
    """Turn pixel-coordinate pieces into output features: CRS coordinates, attributes, min_area, to_crs.

    ``conf``: ``(n, 2)`` float64 [sum of confidence values, pixel count] per piece, or ``None``.
    """
    geoms = to_crs_coords(plan, geoms_px)
    area, perim = measure(plan, geoms)
    mean = confidence_mean(conf) if conf is not None else np.full(len(geoms), np.nan)
    keep = keep_mask(plan, geoms_px, area)
    if not keep.all():
        geoms, classes, area, perim, mean = geoms[keep], classes[keep], area[keep], perim[keep], mean[keep]
    if plan.connectivity == 8 and len(geoms):
        parts, idx = shapely.get_parts(geoms, return_index=True)
        geoms = shapely.multipolygons(parts, indices=idx)
    if plan.out_crs is not None and plan.crs is not None and not plan.out_crs.equals(plan.crs) and len(geoms):
        geoms = _reproject(plan, geoms)
    return Features(classes.astype(np.int32), area, perim, shapely.to_wkb(geoms), mean)


@functools.lru_cache(maxsize=8)
def _transformer(src: pyproj.CRS, dst: pyproj.CRS) -> pyproj.Transformer:
    return pyproj.Transformer.from_crs(src, dst, always_xy=True)


def _reproject(plan: Plan, geoms: np.ndarray) -> np.ndarray:
    """Geometries from the raster's CRS to the output CRS, as ``GeoSeries.to_crs`` does (x/y order, every
    vertex through one pyproj transformer); those made invalid are made valid."""
    assert plan.out_crs is not None
    transformer = _transformer(pyproj.CRS.from_user_input(plan.crs), plan.out_crs)
    coords = shapely.get_coordinates(geoms)
    x, y = transformer.transform(coords[:, 0], coords[:, 1])
    out = shapely.set_coordinates(geoms.copy(), np.column_stack((x, y)))
    bad = ~shapely.is_valid(out)
    if bad.any():
        out[bad] = shapely.make_valid(out[bad], method="structure", keep_collapsed=False)
    return np.asarray(out)


def to_geodataframe(plan: Plan, features: Features) -> gpd.GeoDataFrame:
    """Features as a GeoDataFrame (columns ``class_id``, ``class_name``, ``area_m2``, ``perim_m``, with a
    confidence map ``confidence_mean``, and ``geometry``) in the output CRS."""
    import geopandas as gpd

    columns = {"class_id": features.class_id, "class_name": features.names(plan),
               "area_m2": features.area_m2, "perim_m": features.perim_m}
    if plan.confidence is not None:
        columns["confidence_mean"] = features.confidence_mean
    return gpd.GeoDataFrame(
        columns,
        geometry=gpd.GeoSeries(shapely.from_wkb(features.wkb), crs=plan.out_crs), crs=plan.out_crs,
    )


def empty_frame(plan: Plan) -> gpd.GeoDataFrame:
    """An empty GeoDataFrame with the columns and CRS of :func:`to_geodataframe`."""
    import geopandas as gpd

    columns = {"class_id": np.zeros(0, np.int32), "class_name": np.zeros(0, object),
               "area_m2": np.zeros(0), "perim_m": np.zeros(0)}
    if plan.confidence is not None:
        columns["confidence_mean"] = np.zeros(0)
    return gpd.GeoDataFrame(
        columns,
        geometry=gpd.GeoSeries([], crs=plan.out_crs), crs=plan.out_crs,
    )
