"""The plan of a vectorisation: the raster's facts and the checked options, fixed before the first read."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyproj
from affine import Affine
from rasterio.windows import Window

from geoseg.errors import InputError
from geoseg.gis.quantities import Quantity, check_connectivity, parse_min_area, parse_simplify
from geoseg.io.geodesy import areal_scale, distorts
from geoseg.io.raster import gdal_env, inspect_class_map, inspect_scene, open_scene

log = logging.getLogger(__name__)

BLOCK_SIZE = 1024  # pixels per block side: 2 internal 512-tiles; measured lighter and faster than 2048


@dataclass(frozen=True)
class Plan:
    """Everything the block workers need, fixed before the first read."""

    path: str
    width: int
    height: int
    transform: Affine
    crs: Any  # rasterio CRS or None
    mask_kind: str
    block: int
    connectivity: int
    skip: tuple[int, ...]
    names: dict[int, str]
    min_area: Quantity | None
    simplify_px: float | None
    out_crs: pyproj.CRS | None
    area_mode: str  # "planar", "geodesic" (geographic CRS), "geodesic-projected" (a distorting one) or "none"
    unit_m: float  # metres per CRS unit (planar)
    geod: pyproj.Geod | None
    confidence: str | None = None  # a confidence map on the same grid: polygons get confidence_mean

    @property
    def cols(self) -> int:
        return -(-self.width // self.block)

    @property
    def rows(self) -> int:
        return -(-self.height // self.block)

    def window(self, r: int, c: int) -> Window:
        c0, r0 = c * self.block, r * self.block
        return Window(c0, r0, min(self.block, self.width - c0), min(self.block, self.height - r0))


def class_names_from_tags(tags: Mapping[str, str]) -> dict[int, str]:
    """Class id -> name from a class raster's tags: the ``CLASSES`` JSON that geoseg writes, else (and for ids
    it leaves out) ``CLASS_<id>`` tags. The one reader of class names; ``{}`` for a raster with neither."""
    names: dict[int, str] = {}
    raw = tags.get("CLASSES")
    if raw:
        try:
            for entry in json.loads(raw):
                names[int(entry["id"])] = str(entry["name"])
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring unreadable CLASSES tag (%s); using CLASS_<id> tags", exc)
    for key, value in tags.items():
        m = re.fullmatch(r"CLASS_(\d+)", key)
        if m:
            names.setdefault(int(m.group(1)), value)
    return names


def make_plan(src: str | os.PathLike[str], *, connectivity: int, min_area: Any, simplify: Any,
              skip_classes: Iterable[int], class_names: Mapping[int, str] | None, to_crs: Any,
              block_size: int, force_4326: bool = False, confidence: str | os.PathLike[str] | None = None) -> Plan:
    path = os.fspath(src)
    check_connectivity(connectivity)
    if not isinstance(block_size, int) or block_size < 4:
        raise InputError(f"--block-size must be an integer of at least 4 pixels, got {block_size!r}")
    info = inspect_class_map(path)
    try:
        skip = tuple(sorted({int(c) for c in skip_classes}))
    except (TypeError, ValueError):
        raise InputError(f"--skip-class must be integer class ids, got {skip_classes!r}") from None
    with gdal_env(), open_scene(path) as ds:
        tags = ds.tags()
    names = class_names_from_tags(tags)
    if class_names is not None:
        names = {int(k): str(v) for k, v in class_names.items()}

    crs = info.crs
    transform = info.transform
    if crs is None:
        log.warning("%s has no CRS: polygons are in its pixel/transform coordinates and areas are NaN", path)
        area_mode, unit_m, geod = "none", 1.0, None
    elif crs.is_geographic:
        area_mode, unit_m = "geodesic", 1.0
        geod = pyproj.CRS.from_user_input(crs).get_geod() or pyproj.Geod(ellps="WGS84")
    else:
        area_mode, geod = "planar", None
        try:
            unit_m = float(crs.linear_units_factor[1])
        except Exception:  # no linear units declared: take them as metres
            unit_m = 1.0
        if distorts(crs, info.bounds):  # e.g. Web Mercator: CRS square units are not ground square metres
            area_mode = "geodesic-projected"
            geod = pyproj.CRS.from_user_input(crs).get_geod() or pyproj.Geod(ellps="WGS84")
            log.info("%s: %s distorts areas here (areal scale %.4f): areas and perimeters are geodesic", path,
                     crs.to_string(), areal_scale(crs, info.bounds))

    q_area = parse_min_area(min_area)
    if q_area is not None and q_area.unit == "m2" and area_mode == "none":
        raise InputError(f"{path}: has no CRS, so --min-area {min_area!r} in square metres cannot be measured; "
                         "give it in pixels (e.g. 40px) or assign a CRS")
    q_simp = parse_simplify(simplify)
    simplify_px: float | None = None
    if q_simp is not None and q_simp.value > 0:
        crs_px = math.sqrt(abs(transform.determinant)) or 1.0  # CRS units per pixel
        if q_simp.unit == "px":
            simplify_px = q_simp.value
        elif q_simp.unit == "m":
            if info.pixel_size_m is None:
                raise InputError(f"{path}: has no CRS, so --simplify {simplify!r} in metres cannot be converted; "
                                 "give it in pixels (e.g. 0.5px) or CRS units")
            simplify_px = q_simp.value / info.pixel_size_m
        else:
            simplify_px = q_simp.value / crs_px

    out_crs = pyproj.CRS.from_user_input(crs) if crs is not None else None
    if to_crs is not None:
        if crs is None:
            raise InputError(f"{path}: has no CRS, so it cannot be reprojected to {to_crs!r}; assign a CRS first")
        try:
            out_crs = pyproj.CRS.from_user_input(to_crs)
        except pyproj.exceptions.CRSError as exc:
            raise InputError(f"--to-crs {to_crs!r} is not a CRS ({exc}); give e.g. EPSG:4326") from None
    if force_4326:
        if crs is None:
            raise InputError(f"{path}: has no CRS, and GeoJSON (RFC 7946) must be in EPSG:4326; "
                             "assign a CRS or write GeoPackage")
        target = pyproj.CRS.from_epsg(4326)
        if out_crs is not None and not out_crs.equals(target):
            log.info("GeoJSON (RFC 7946) is written in EPSG:4326: reprojecting from %s", out_crs.to_string())
        out_crs = target
    conf = _check_confidence(path, info, confidence) if confidence is not None else None
    return Plan(path, info.width, info.height, transform, crs, info.mask, block_size, connectivity, skip,
                 names, q_area, simplify_px, out_crs, area_mode, unit_m, geod, conf)


def _check_confidence(path: str, info: Any, confidence: str | os.PathLike[str]) -> str:
    """The confidence map's path, once it is known to be one uint8 band (254 = 1, nodata 255) on the class
    raster's grid."""
    conf = os.fspath(confidence)
    other = inspect_scene(conf)
    if other.count != 1 or np.dtype(other.dtype) != np.uint8:
        raise InputError(f"{conf}: a confidence map is one uint8 band (round(p * 254), nodata 255), not "
                         f"{other.count} band(s) of {other.dtype}; give the <stem>.confidence.tif of geoseg predict")
    if (other.width, other.height) != (info.width, info.height) or \
            not other.transform.almost_equals(info.transform):
        raise InputError(f"{conf}: its grid ({other.width} x {other.height}) is not that of {path} "
                         f"({info.width} x {info.height}); give the confidence map made with this class map")
    return conf
