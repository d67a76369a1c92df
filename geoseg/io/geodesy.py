"""Ground sizes on any CRS: how far a CRS's units are from metres on the ground where a scene lies.

A projected CRS measures in its own units; on the ground a CRS unit is ``1 / k`` metres, where ``k`` is the
projection's scale factor there (PROJ's ``get_factors``). UTM keeps ``k`` within 0.04 % of 1 over its zones,
but Web Mercator (EPSG:3857) has ``k = 1 / cos(latitude)``: 1.26 at 37.7 N, so its square "metres" are 1.6
ground square metres there. geoseg measures ground sizes: a pixel size in ground metres
(:func:`ground_pixel_size`), and polygon areas and perimeters on the ellipsoid (geodesic, through the CRS's
own geographic CRS) wherever the CRS's areal scale at the scene departs from 1 by more than
``TOLERANCE``; within it, planar measures in the CRS's units agree with the geodesic ones to that tolerance
and are kept (they are exact sums of pixel areas, and faster).
"""

from __future__ import annotations

import functools
import math
from typing import Any

TOLERANCE = 1e-3  # 0.1 % of area


@functools.lru_cache(maxsize=64)
def _factors(crs_wkt: str, x: float, y: float) -> tuple[float, float] | None:
    """``(areal_scale, linear_scale)`` of a projected CRS at the CRS coordinates ``(x, y)``."""
    import pyproj

    try:
        crs = pyproj.CRS.from_wkt(crs_wkt)
        if not crs.is_projected:
            return None
        to_geo = pyproj.Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True)
        lon, lat = to_geo.transform(x, y)
        f = pyproj.Proj(crs).get_factors(lon, lat)
        areal = float(f.areal_scale)
        if not math.isfinite(areal) or areal <= 0:
            return None
        return areal, math.sqrt(float(f.meridional_scale) * float(f.parallel_scale))
    except Exception:  # a CRS PROJ cannot evaluate there: take its units as ground units
        return None


def areal_scale(crs: Any, bounds: tuple[float, float, float, float]) -> float | None:
    """How many CRS square units one ground square unit covers at the centre of ``bounds`` (1 for an
    equal-area projection, ``1 / cos^2(lat)`` for Mercator); ``None`` for geographic or unknown CRSs."""
    if crs is None:
        return None
    wkt = crs.to_wkt() if hasattr(crs, "to_wkt") else str(crs)
    left, bottom, right, top = bounds
    f = _factors(wkt, (left + right) / 2, (bottom + top) / 2)
    return None if f is None else f[0]


def distorts(crs: Any, bounds: tuple[float, float, float, float]) -> bool:
    """Whether planar areas in ``crs`` are off the ground's by more than ``TOLERANCE`` at ``bounds``."""
    a = areal_scale(crs, bounds)
    return a is not None and abs(a - 1) > TOLERANCE


def ground_pixel_size(crs: Any, transform: Any, bounds: tuple[float, float, float, float],
                      unit_m: float) -> float:
    """The side of a pixel on the ground, in metres, for a projected CRS whose unit is ``unit_m`` metres:
    the side in CRS units where the CRS keeps ground areas within ``TOLERANCE`` (as polygon areas do), else
    corrected by the CRS's scale at the scene's centre."""
    side = math.sqrt(abs(transform.a * transform.e - transform.b * transform.d)) * unit_m
    a = areal_scale(crs, bounds)
    return side / math.sqrt(a) if a is not None and abs(a - 1) > TOLERANCE else side


def ground_pixel_area(crs: Any, transform: Any, bounds: tuple[float, float, float, float]) -> float:
    """The ground area of one pixel at the centre of ``bounds``, in square metres, measured as polygon areas
    are: geodesic on the CRS's ellipsoid for a geographic CRS; for a projected one, the area in CRS square
    units (times the unit's metres squared), divided by the CRS's areal scale there where it departs from 1
    by more than ``TOLERANCE`` (Web Mercator)."""
    import pyproj

    a, b, d, e = transform.a, transform.b, transform.d, transform.e
    det = abs(a * e - b * d)
    if crs.is_geographic:
        cx, cy = (bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2
        corners = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
        lons = [cx + a * i + b * j for i, j in corners]
        lats = [cy + d * i + e * j for i, j in corners]
        geod = pyproj.CRS.from_user_input(crs).get_geod() or pyproj.Geod(ellps="WGS84")
        area, _ = geod.polygon_area_perimeter(lons, lats)
        return abs(float(area))
    try:
        unit_m = float(crs.linear_units_factor[1])
    except Exception:  # no linear units declared: take them as metres
        unit_m = 1.0
    area = det * unit_m**2
    scale = areal_scale(crs, bounds)
    return area / scale if scale is not None and abs(scale - 1) > TOLERANCE else area


__all__ = ["TOLERANCE", "areal_scale", "distorts", "ground_pixel_area", "ground_pixel_size"]
