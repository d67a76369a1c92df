"""Vectorise a class raster into polygons, block by block, without seams, in bounded memory.

The last step of the pipeline (read -> chips -> model -> blend -> write -> **vectorise**). The raster is cut
into square blocks of ``block_size`` pixels that are polygonised in parallel (Dask's local threaded
scheduler). Inside a block, GDAL (``rasterio.features.shapes``, 4- or 8-neighbourhood) turns every connected
region of one class into one polygon *piece*, in global pixel coordinates (integers, so merging is exact);
which piece each pixel along the block's border belongs to is read off the pieces' own border edges.

Seams: a piece that touches an internal block edge is *open*; all others are *closed* and final, and are
measured and written at once. When a block arrives, the pixels on both sides of each of its seams with
already processed neighbours are compared: two open pieces of the same class join when their pixels are
4-neighbours across the seam (with 8-connectivity also diagonal neighbours, including across block corners).
Joined pieces are grouped by union-find; a group is final once no member can reach a block not yet seen
(blocks arrive row by row, so after each row of blocks every group that does not touch the next row is
complete) and is merged by a rectilinear ring stitch (:func:`_stitch`: shared seam edges cancel, the rest is
relinked into rings; no GEOS overlay). The result is the same set of polygons as one whole-raster ``shapes``
call: same count, same area per class, geometrically equal, and with 4-connectivity the very same vertices.

Memory is bounded by a few blocks in flight (``2 * workers``), the open pieces along the current row of
blocks, and one batch of features being written; never by the raster. Requesting ``simplify`` is the one
exception: topology-preserving simplification runs on the whole coverage at once, so the polygons (not the
raster) are then held in memory.

Coordinates: the output stays in the raster's CRS unless ``to_crs`` asks otherwise; GeoJSON is always
written in EPSG:4326 as RFC 7946 requires (logged). Areas and perimeters are in metres: planar for projected
CRSs (scaled by the CRS's linear unit), geodesic on the CRS's ellipsoid for geographic ones.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyproj
import rasterio
import rasterio.features
import shapely
from affine import Affine
from rasterio.windows import Window
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from geoseg.errors import InputError, unknown_name
from geoseg.raster import band_validity, check_writable, gdal_env, inspect_scene, open_scene
from geoseg.store import Store

log = logging.getLogger(__name__)

BLOCK_SIZE = 1024  # pixels per block side: 2 internal 512-tiles; measured lighter and faster than 2048
BATCH_FEATURES = 20_000  # features per write batch (one Arrow record batch / Parquet row group)
SHAPEFILE_LIMIT_BYTES = 2**31 - 1  # the .shp and .dbf formats address at most 2 GB
COLUMNS = ("class_id", "class_name", "area_m2", "perim_m")  # all fit the shapefile's 10 characters

Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------------------ formats


@dataclass(frozen=True)
class VectorFormat:
    """A named output format: the OGR driver (or ``None`` for GeoParquet) and its file extensions."""

    name: str
    driver: str | None
    extensions: tuple[str, ...]
    sidecars: tuple[str, ...] = ()  # files written beside the main one, moved into place with it
    epsg4326: bool = False  # the standard fixes the CRS (RFC 7946)
    size_limit: int | None = None
    layer_options: dict[str, str] = field(default_factory=dict)


FORMATS: dict[str, VectorFormat] = {
    "gpkg": VectorFormat("gpkg", "GPKG", (".gpkg",)),
    "shp": VectorFormat("shp", "ESRI Shapefile", (".shp",), (".shx", ".dbf", ".prj", ".cpg"),
                        size_limit=SHAPEFILE_LIMIT_BYTES),
    "geojson": VectorFormat("geojson", "GeoJSON", (".geojson", ".json"), epsg4326=True,
                            layer_options={"RFC7946": "YES"}),
    "parquet": VectorFormat("parquet", None, (".parquet", ".geoparquet")),
}
_ALIASES = {"geopackage": "gpkg", "shapefile": "shp", "esri shapefile": "shp", "geoparquet": "parquet",
            "json": "geojson"}


def get_format(name: str) -> VectorFormat:
    """The output format called ``name`` (case-insensitive; ``shapefile``, ``geoparquet``... also accepted).

    Raises:
        UnknownNameError: ``name`` is not a known format; the message lists the valid names.
    """
    key = name.strip().lower().lstrip(".")
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        raise unknown_name("vector format", name, list(FORMATS))
    return FORMATS[key]


def format_for(dst: str | os.PathLike[str], vector_format: str | None = None) -> tuple[Path, VectorFormat]:
    """The output path and format: ``vector_format`` if given, else from the extension (default GeoPackage).

    A path without extension gets the format's extension.

    Raises:
        InputError: the extension does not match ``vector_format``, or is unknown.
        UnknownNameError: ``vector_format`` is not a known format.
    """
    path = Path(dst)
    suffix = path.suffix.lower()
    if vector_format is not None:
        fmt = get_format(vector_format)
        if not suffix:
            return path.with_suffix(fmt.extensions[0]), fmt
        if suffix not in fmt.extensions:
            raise InputError(f"{path}: extension {suffix!r} does not match vector format {fmt.name!r}; "
                             f"use {fmt.extensions[0]} or drop --vector-format")
        return path, fmt
    if not suffix:
        return path.with_suffix(".gpkg"), FORMATS["gpkg"]
    for fmt in FORMATS.values():
        if suffix in fmt.extensions:
            return path, fmt
    valid = ", ".join(e for f in FORMATS.values() for e in f.extensions)
    raise InputError(f"{path}: unknown vector extension {suffix!r}; use one of {valid} or give --vector-format")


# ------------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Quantity:
    """A length or area with its unit: ``px`` (pixels), ``m`` / ``m2`` (metres), or ``crs`` (CRS units)."""

    value: float
    unit: str


_AREA_UNITS = {"px": ("px", 1.0), "pixel": ("px", 1.0), "pixels": ("px", 1.0), "m2": ("m2", 1.0),
               "m^2": ("m2", 1.0), "m²": ("m2", 1.0), "sqm": ("m2", 1.0), "ha": ("m2", 1e4),
               "km2": ("m2", 1e6), "km²": ("m2", 1e6)}
_LENGTH_UNITS = {"px": ("px", 1.0), "pixel": ("px", 1.0), "pixels": ("px", 1.0), "m": ("m", 1.0),
                 "km": ("m", 1e3), "crs": ("crs", 1.0), "": ("crs", 1.0)}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([^\s0-9].*?)?\s*$")


def parse_min_area(value: float | int | str | Quantity | None) -> Quantity | None:
    """Parse a minimum polygon area: ``"40px"``, ``"200m2"``, ``"0.5ha"``, ``"1km2"``.

    A plain number (or a string without unit) is in **pixels**, so it means the same in any CRS (EPSG:4326
    included); give ``m2`` for ground area.

    Raises:
        InputError: not a non-negative number with a known unit.
    """
    return _parse(value, _AREA_UNITS, "px", "min_area", "40px, 200m2, 0.5ha or 1km2")


def parse_simplify(value: float | int | str | Quantity | None) -> Quantity | None:
    """Parse a simplification tolerance: ``"1m"``, ``"0.5px"``, or a plain number in CRS units.

    Raises:
        InputError: not a non-negative number with a known unit.
    """
    return _parse(value, _LENGTH_UNITS, "crs", "simplify", "1.0 (CRS units), 1m or 0.5px")


def _parse(value: Any, units: dict[str, tuple[str, float]], default: str, what: str,
           examples: str) -> Quantity | None:
    if value is None or isinstance(value, Quantity):
        return value
    if isinstance(value, bool):
        raise InputError(f"{what} {value!r} is not a number; use e.g. {examples}")
    if isinstance(value, (int, float)):
        number, unit, scale = float(value), default, 1.0
    else:
        m = _NUMBER.match(str(value))
        key = (m.group(2) or "").strip().lower() if m else None
        if m is None or key not in units and key != "":
            raise InputError(f"{what} {value!r} is not understood; use e.g. {examples}")
        unit, scale = units[key] if key else (default, 1.0)
        number = float(m.group(1))
    if not math.isfinite(number) or number < 0:
        raise InputError(f"{what} {value!r} must be a non-negative number; use e.g. {examples}")
    return Quantity(number * scale, unit)


# ------------------------------------------------------------------------------------------- results


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

    def add(self, batch: gpd.GeoDataFrame) -> None:
        self.features += len(batch)
        if not len(batch):
            return
        grouped = batch.groupby("class_id")["area_m2"].agg(["count", "sum"])
        for cid, row in grouped.iterrows():
            k = int(cid)  # type: ignore[call-overload]
            self.class_counts[k] = self.class_counts.get(k, 0) + int(row["count"])
            self.class_areas_m2[k] = self.class_areas_m2.get(k, 0.0) + float(row["sum"])


# ---------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class _Plan:
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
    area_mode: str  # "planar", "geodesic" or "none"
    unit_m: float  # metres per CRS unit (planar)
    geod: pyproj.Geod | None

    @property
    def cols(self) -> int:
        return -(-self.width // self.block)

    @property
    def rows(self) -> int:
        return -(-self.height // self.block)

    def window(self, r: int, c: int) -> Window:
        c0, r0 = c * self.block, r * self.block
        return Window(c0, r0, min(self.block, self.width - c0), min(self.block, self.height - r0))


def _class_names_from_tags(tags: Mapping[str, str]) -> dict[int, str]:
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


def _make_plan(src: str | os.PathLike[str], *, connectivity: int, min_area: Any, simplify: Any,
               skip_classes: Iterable[int], class_names: Mapping[int, str] | None, to_crs: Any,
               block_size: int, force_4326: bool = False) -> _Plan:
    path = os.fspath(src)
    if connectivity not in (4, 8):
        raise InputError(f"connectivity must be 4 or 8, got {connectivity!r}")
    if not isinstance(block_size, int) or block_size < 4:
        raise InputError(f"block_size must be an integer of at least 4 pixels, got {block_size!r}")
    info = inspect_scene(path)
    if info.count != 1:
        raise InputError(f"{path}: has {info.count} bands; a class raster has one band of class ids "
                         "(give the class map that geoseg predict writes)")
    if np.dtype(info.dtype).kind not in "iu":
        raise InputError(f"{path}: band 1 is {info.dtype}; a class raster holds integer class ids "
                         "(convert it, e.g. gdal_translate -ot Byte, or give geoseg predict's class map)")
    try:
        skip = tuple(sorted({int(c) for c in skip_classes}))
    except (TypeError, ValueError):
        raise InputError(f"skip_classes must be integer class ids, got {skip_classes!r}") from None
    with gdal_env(), open_scene(path) as ds:
        tags = ds.tags()
    names = _class_names_from_tags(tags)
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

    q_area = parse_min_area(min_area)
    if q_area is not None and q_area.unit == "m2" and area_mode == "none":
        raise InputError(f"{path}: has no CRS, so min_area {min_area!r} in square metres cannot be measured; "
                         "give it in pixels (e.g. 40px) or assign a CRS")
    q_simp = parse_simplify(simplify)
    simplify_px: float | None = None
    if q_simp is not None and q_simp.value > 0:
        crs_px = math.sqrt(abs(transform.determinant)) or 1.0  # CRS units per pixel
        if q_simp.unit == "px":
            simplify_px = q_simp.value
        elif q_simp.unit == "m":
            if info.pixel_size_m is None:
                raise InputError(f"{path}: has no CRS, so simplify {simplify!r} in metres cannot be converted; "
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
            raise InputError(f"to_crs {to_crs!r} is not a CRS ({exc}); give e.g. EPSG:4326") from None
    if force_4326:
        if crs is None:
            raise InputError(f"{path}: has no CRS, and GeoJSON (RFC 7946) must be in EPSG:4326; "
                             "assign a CRS or write GeoPackage")
        target = pyproj.CRS.from_epsg(4326)
        if out_crs is not None and not out_crs.equals(target):
            log.info("GeoJSON (RFC 7946) is written in EPSG:4326: reprojecting from %s", out_crs.to_string())
        out_crs = target
    return _Plan(path, info.width, info.height, transform, crs, info.mask, block_size, connectivity, skip,
                 names, q_area, simplify_px, out_crs, area_mode, unit_m, geod)


# -------------------------------------------------------------------------------------- block work


@dataclass
class _Block:
    """One polygonised block: closed pieces ready to write, open pieces and the labels along its edges."""

    r: int
    c: int
    n: int  # labels 1..n
    closed: Any  # GeoDataFrame batch (or, with simplify, (geoms_px, classes))
    open_labels: np.ndarray  # local labels of the open pieces
    open_geoms: np.ndarray  # their geometries in pixel coordinates
    open_classes: np.ndarray
    open_bottom: np.ndarray  # bool: touches the seam with the next row of blocks
    edges: dict[str, tuple[np.ndarray, np.ndarray]]  # side -> (local labels, classes); 0 = no piece


_SHAPES_DTYPES = frozenset(np.dtype(t) for t in ("uint8", "uint16", "int16", "int32"))  # GDAL polygonize


def _pieces(data: np.ndarray, valid: np.ndarray, connectivity: int, col_off: int, row_off: int
            ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The connected regions of equal class in a block, polygonised by GDAL, in global pixel coordinates.

    Returns ``(geoms, classes, sides)``: piece ``i`` (1..n) is ``geoms[i]`` (valid) of class ``classes[i]``;
    ``sides`` maps ``top``/``bottom``/``left``/``right`` to the piece of each pixel along that block edge
    (0 = none), read off the pieces' own boundary edges on the block border, so no label image is needed.
    """
    rows, cols = data.shape
    codes, lut = data, None
    if data.dtype not in _SHAPES_DTYPES:  # e.g. uint32, int64: polygonise dense codes of the classes
        lut, inv = np.unique(data, return_inverse=True)
        codes = inv.reshape(data.shape).astype(np.int32)
    values: list[float] = []
    poly_rings: list[int] = []
    ring_lens: list[int] = []
    flat: list[tuple[float, float]] = []  # vertices as GDAL's tuples: ~110 B each, so flushed to numpy often
    chunks: list[np.ndarray] = []

    def flush() -> None:
        chunks.append(np.fromiter(itertools.chain.from_iterable(flat), dtype=np.float64, count=2 * len(flat)))
        flat.clear()

    # Doubled coordinates (halved exactly below): rasterio warns about an identity transform, and
    # warnings.catch_warnings is not thread-safe.
    doubled = Affine(2.0, 0.0, 2.0 * col_off, 0.0, 2.0, 2.0 * row_off)
    if valid.any():
        for geom, value in rasterio.features.shapes(codes, mask=valid, connectivity=connectivity,
                                                    transform=doubled):
            rings = geom["coordinates"]
            values.append(value)
            poly_rings.append(len(rings))
            for ring in rings:
                ring_lens.append(len(ring))
                flat.extend(ring)
            if len(flat) >= 1 << 16:
                flush()
    flush()
    n = len(values)
    geoms = np.empty(n + 1, dtype=object)
    classes = np.zeros(n + 1, dtype=np.int64)
    sides = {"top": np.zeros(cols, np.int32), "bottom": np.zeros(cols, np.int32),
             "left": np.zeros(rows, np.int32), "right": np.zeros(rows, np.int32)}
    if n == 0:
        return geoms, classes, sides
    vals = np.asarray(values, dtype=np.int64)
    classes[1:] = lut[vals] if lut is not None else vals
    # building all polygons from one coordinate array is ~4x faster than shapely.geometry.shape per feature
    xy = np.concatenate(chunks).reshape(-1, 2) * 0.5
    del chunks[:]
    ring_off = np.zeros(len(ring_lens) + 1, dtype=np.int64)
    np.cumsum(ring_lens, out=ring_off[1:])
    poly_off = np.zeros(len(poly_rings) + 1, dtype=np.int64)
    np.cumsum(poly_rings, out=poly_off[1:])
    polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, xy, (ring_off, poly_off))

    # pixels along the block border: each belongs to the piece with a boundary edge on its outer side
    ring_piece = np.repeat(np.arange(1, n + 1, dtype=np.int32), poly_rings)
    coord_piece = np.repeat(ring_piece, ring_lens)
    pxy = np.rint(xy).astype(np.int64)
    pxy[:, 0] -= col_off
    pxy[:, 1] -= row_off
    cont = np.ones(len(pxy) - 1, dtype=bool)
    cont[ring_off[1:-1] - 1] = False  # no edge from one ring's last point to the next ring's first
    a, b, pc = pxy[:-1][cont], pxy[1:][cont], coord_piece[:-1][cont]
    horiz = a[:, 1] == b[:, 1]
    for side, axis, at in (("top", 0, (1, 0)), ("bottom", 0, (1, rows)), ("left", 1, (0, 0)),
                           ("right", 1, (0, cols))):
        sel = (horiz if axis == 0 else ~horiz) & (a[:, at[0]] == at[1])
        lo = np.minimum(a[sel, axis], b[sel, axis])
        span = np.abs(a[sel, axis] - b[sel, axis])
        k = np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span)
        sides[side][np.repeat(lo, span) + k] = np.repeat(pc[sel], span)

    if connectivity == 8:
        # Diagonal joins come out as self-touching rings: make them (multi)polygons. GDAL's 4-connected
        # polygons are valid (holes touching the shell are separate rings), and checking costs a third
        # of the polygonisation, so they are taken as they are; the tests check validity.
        bad = ~shapely.is_valid(polys)
        if bad.any():
            polys[bad] = shapely.make_valid(polys[bad], method="structure", keep_collapsed=False)
    geoms[1:] = polys
    return geoms, classes, sides


def _process_block(plan: _Plan, r: int, c: int) -> _Block:
    win = plan.window(r, c)
    with gdal_env(), open_scene(plan.path) as ds:
        data = ds.read(1, window=win)
        valid = band_validity(data[None], ds, [1], win, plan.mask_kind)[0]
    if plan.skip:
        valid &= ~np.isin(data, plan.skip)
    geoms, classes, sides = _pieces(data, valid, plan.connectivity, int(win.col_off), int(win.row_off))
    del data, valid
    n = len(classes) - 1
    edges = {k: (v, classes[v]) for k, v in sides.items()}
    open_mask = np.zeros(n + 1, dtype=bool)
    bottom = np.zeros(n + 1, dtype=bool)
    if r > 0:
        open_mask[edges["top"][0]] = True
    if r < plan.rows - 1:
        bottom[edges["bottom"][0]] = True
        open_mask |= bottom
    if c > 0:
        open_mask[edges["left"][0]] = True
    if c < plan.cols - 1:
        open_mask[edges["right"][0]] = True
    open_mask[0] = False
    open_labels = np.flatnonzero(open_mask)
    closed_labels = np.flatnonzero(~open_mask)[1:]  # [1:]: label 0 is "no piece"
    closed: Any
    if plan.simplify_px is not None:
        closed = (geoms[closed_labels], classes[closed_labels])
    else:
        closed = _finalize(plan, geoms[closed_labels], classes[closed_labels])
    return _Block(r, c, n, closed, open_labels, geoms[open_labels], classes[open_labels], bottom[open_labels],
                  edges)


# ------------------------------------------------------------------------------------------ measure


def _to_crs_coords(plan: _Plan, geoms_px: np.ndarray) -> np.ndarray:
    t = plan.transform
    if t.is_identity:
        return geoms_px

    def affine(xy: np.ndarray) -> np.ndarray:
        col, row = xy[:, 0], xy[:, 1]
        # the order of GDAL's own geotransform, so that coordinates match a whole-raster polygonisation
        return np.column_stack((t.c + col * t.a + row * t.b, t.f + col * t.d + row * t.e))

    return shapely.transform(geoms_px, affine)


def _measure(plan: _Plan, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Area (m2) and perimeter (m) of geometries in the raster's CRS."""
    if plan.area_mode == "planar":
        return shapely.area(geoms) * plan.unit_m**2, shapely.length(geoms) * plan.unit_m
    if plan.area_mode == "geodesic" and plan.geod is not None:
        area = np.empty(len(geoms))
        perim = np.empty(len(geoms))
        for i, g in enumerate(geoms):
            a, p = plan.geod.geometry_area_perimeter(g)
            area[i], perim[i] = abs(a), p
        return area, perim
    nan = np.full(len(geoms), np.nan)
    return nan, nan.copy()


def _keep(plan: _Plan, geoms_px: np.ndarray, area_m2: np.ndarray) -> np.ndarray:
    q = plan.min_area
    if q is None or q.value <= 0:
        return np.ones(len(geoms_px), dtype=bool)
    if q.unit == "px":
        return np.asarray(shapely.area(geoms_px) >= q.value)
    return np.asarray(area_m2 >= q.value)


def _finalize(plan: _Plan, geoms_px: np.ndarray, classes: np.ndarray, *, filter_area: bool = True
              ) -> gpd.GeoDataFrame:
    """Turn pixel-coordinate pieces into output features: CRS coordinates, attributes, min_area, to_crs."""
    geoms = _to_crs_coords(plan, geoms_px)
    area, perim = _measure(plan, geoms)
    if filter_area:
        keep = _keep(plan, geoms_px, area)
        if not keep.all():
            geoms, classes, area, perim = geoms[keep], classes[keep], area[keep], perim[keep]
    if plan.connectivity == 8 and len(geoms):
        parts, idx = shapely.get_parts(geoms, return_index=True)
        geoms = shapely.multipolygons(parts, indices=idx)
    gdf = gpd.GeoDataFrame(
        {"class_id": classes.astype(np.int32),
         "class_name": [plan.names.get(int(k)) for k in classes],
         "area_m2": area, "perim_m": perim},
        geometry=gpd.GeoSeries(geoms, crs=plan.crs), crs=plan.crs,
    )
    if plan.out_crs is not None and plan.crs is not None and not plan.out_crs.equals(plan.crs) and len(gdf):
        gdf = gdf.to_crs(plan.out_crs)
        bad = ~gdf.geometry.is_valid.to_numpy()
        if bad.any():
            fixed = shapely.make_valid(gdf.geometry.values[bad], method="structure", keep_collapsed=False)
            gdf.loc[bad, "geometry"] = fixed
    return gdf


# ------------------------------------------------------------------------------------------- merging


class _Merger:
    """Union-find over open pieces; emits a group's merged polygon when no unseen block can extend it."""

    def __init__(self, plan: _Plan):
        self.plan = plan
        self.parent: dict[int, int] = {}
        self.geom: dict[int, Any] = {}
        self.cls: dict[int, int] = {}
        self.row: dict[int, int] = {}
        self.bottom: dict[int, bool] = {}
        self.base = 0
        self.edges: dict[tuple[int, int], dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def _find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def _join(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in {(int(p), int(q)) for p, q in zip(a, b, strict=True)}:
            rx, ry = self._find(x), self._find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def _match(self, la: np.ndarray, ca: np.ndarray, lb: np.ndarray, cb: np.ndarray) -> None:
        """Join pieces facing each other across a seam (arrays run along it, side a vs side b)."""
        pairs = [(slice(None), slice(None))]
        if self.plan.connectivity == 8 and len(la) > 1:
            pairs += [(slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))]
        for sa, sb in pairs:
            xa, xb, ka, kb = la[sa], lb[sb], ca[sa], cb[sb]
            hit = (xa > 0) & (xb > 0) & (ka == kb)
            if hit.any():
                self._join(xa[hit], xb[hit])

    def add(self, blk: _Block) -> None:
        base = self.base
        self.base += blk.n
        gids = blk.open_labels + base
        for g, geom, k, bot in zip(gids.tolist(), blk.open_geoms, blk.open_classes.tolist(),
                                   blk.open_bottom.tolist(), strict=True):
            self.parent[g] = g
            self.geom[g] = geom
            self.cls[g] = k
            self.row[g] = blk.r
            self.bottom[g] = bot
        edges = {k: (np.where(lab > 0, lab + base, 0), cls) for k, (lab, cls) in blk.edges.items()}
        r, c = blk.r, blk.c
        left = self.edges.get((r, c - 1))
        if left is not None:
            self._match(*left["right"], *edges["left"])
        up = self.edges.get((r - 1, c))
        if up is not None:
            self._match(*up["bottom"], *edges["top"])
        if self.plan.connectivity == 8:
            ul = self.edges.get((r - 1, c - 1))  # diagonal across the corner of four blocks
            if ul is not None:
                self._match(ul["bottom"][0][-1:], ul["bottom"][1][-1:], edges["top"][0][:1], edges["top"][1][:1])
            ur = self.edges.get((r - 1, c + 1))
            if ur is not None:
                self._match(ur["bottom"][0][:1], ur["bottom"][1][:1], edges["top"][0][-1:], edges["top"][1][-1:])
        self.edges[(r, c)] = edges
        if c == self.plan.cols - 1:  # the previous row of blocks is no longer a neighbour of anything
            for cc in range(self.plan.cols):
                self.edges.pop((r - 1, cc), None)

    def complete(self, r: int, last: bool) -> tuple[np.ndarray, np.ndarray]:
        """After row ``r`` of blocks: merge and drop every group that cannot grow; ``(geoms_px, classes)``."""
        groups: dict[int, list[int]] = {}
        for g in self.parent:
            groups.setdefault(self._find(g), []).append(g)
        done: list[list[Any]] = []
        done_cls: list[int] = []
        for root, members in groups.items():
            if not last and any(self.row[m] == r and self.bottom[m] for m in members):
                continue
            done.append([self.geom[m] for m in members])
            done_cls.append(self.cls[root])
            for m in members:
                del self.parent[m], self.geom[m], self.cls[m], self.row[m], self.bottom[m]
        geoms = np.empty(len(done), dtype=object)
        multi = [i for i, parts in enumerate(done) if len(parts) > 1]
        for i, parts in enumerate(done):
            if len(parts) == 1:
                geoms[i] = parts[0]
        if multi:
            p = self.plan
            geoms[multi] = _stitch([done[i] for i in multi], p.connectivity, p.block, p.width, p.height)
        return geoms, np.asarray(done_cls, dtype=np.int64)

    @property
    def open_count(self) -> int:
        return len(self.parent)


# ----------------------------------------------------------------------------------- seam stitching


def _ring_order(succ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rings of a successor permutation: ``(order, starts)``; ``order`` lists edges ring by ring, in ring
    order, each ring from its smallest edge index; ``starts`` are the rings' offsets into it (plus the end)."""
    n = len(succ)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    _, label = connected_components(
        csr_matrix((np.ones(n, dtype=np.int8), (np.arange(n), succ)), shape=(n, n)), directed=True,
        connection="weak")
    by_label = np.argsort(label, kind="stable")  # rings, each with its smallest edge first
    first = np.flatnonzero(np.r_[True, label[by_label[1:]] != label[by_label[:-1]]])
    head = np.empty(first.size, dtype=np.int64)
    head[label[by_label[first]]] = by_label[first]
    # list ranking by pointer doubling: distance of each edge to the last edge of its ring
    idx = np.arange(n)
    tail = succ == head[label]
    nxt = np.where(tail, idx, succ)
    dist = (~tail).astype(np.int64)
    while True:
        nn = nxt[nxt]
        if np.array_equal(nn, nxt):
            break
        dist += dist[nxt]
        nxt = nn
    size = np.bincount(label)
    order = np.lexsort((size[label] - 1 - dist, label))
    starts = np.zeros(size.size + 1, dtype=np.int64)
    np.cumsum(size, out=starts[1:])
    return order, starts


def _stitch(groups: Sequence[Sequence[Any]], connectivity: int, block: int, width: int, height: int
            ) -> np.ndarray:
    """Merge each group of pieces (same class, touching across block seams) into one polygon, exactly.

    Pixel-aligned rings in integer coordinates, oriented with the group's pixels on the left. Rings without
    an edge on an internal seam are kept as they are. The others are cut into *chains* (runs of edges off
    the seams, kept whole, also broken where the group's rings meet at a corner) and seam edges; seam edges
    are split into unit edges and each unit edge present in both directions (shared by two pieces) is
    cancelled; chains and the remaining unit edges are relinked end to start into rings (numpy: sort,
    searchsorted, connected components, list ranking). Where two pixels of the group touch only at a
    corner (a "pinch"), a ring turns around the pixel outside the group, which keeps the rings of
    4-connected regions simple (each bounds one face of the complement); when that makes a ring visit the
    corner twice (only possible with 8-connectivity) it turns around the group's pixels instead. Collinear
    vertices are dropped, so with 4-connectivity a stitched ring has exactly the vertices of GDAL's
    whole-raster ring. Rings of positive signed area are shells, the others holes, each given to the
    smallest shell of its group that contains it; 8-connected results are checked and made valid like the
    pieces. No GEOS overlay is involved.
    """
    out = np.empty(len(groups), dtype=object)
    if not groups:
        return out
    kx, ky = width + 1, height + 1
    per_chunk = max(1, (2**62) // (kx * ky))  # vertex keys (group, x, y) must fit an int64
    for lo in range(0, len(groups), per_chunk):
        out[lo:lo + per_chunk] = _stitch_chunk(groups[lo:lo + per_chunk], connectivity, block, width, height)
    return out


def _stitch_chunk(groups: Sequence[Sequence[Any]], connectivity: int, block: int, width: int, height: int
                  ) -> np.ndarray:
    kx, ky = width + 1, height + 1
    ngroups = len(groups)
    geoms = np.fromiter(itertools.chain.from_iterable(groups), dtype=object, count=sum(map(len, groups)))
    gid = np.repeat(np.arange(ngroups), [len(g) for g in groups])
    parts, pidx = shapely.get_parts(geoms, return_index=True)
    rings, ridx = shapely.get_rings(parts, return_index=True)
    nr = len(rings)
    exterior = np.r_[True, ridx[1:] != ridx[:-1]]
    ring_group = gid[pidx[ridx]]
    del geoms, gid, parts, pidx, ridx
    xyf, cidx = shapely.get_coordinates(rings, return_index=True)
    del rings
    xy = np.rint(xyf).astype(np.int32)  # pixel corners; products below are taken in int64
    del xyf
    n = len(xy)
    rs = np.zeros(nr + 1, dtype=np.int64)
    np.cumsum(np.bincount(cidx, minlength=nr), out=rs[1:])
    last = rs[1:] - 1  # each ring's closing coordinate: no edge starts there

    # orient: shells positive (counter-clockwise in x/y), holes negative: the group's pixels on the left
    cross = np.zeros(n, dtype=np.int64)
    x64, y64 = xy[:, 0].astype(np.int64), xy[:, 1].astype(np.int64)
    cross[:-1] = x64[:-1] * y64[1:] - x64[1:] * y64[:-1]
    del x64, y64
    cross[last] = 0
    area2 = np.bincount(cidx, weights=cross, minlength=nr)
    del cross
    flip = (area2 > 0) != exterior
    area2[flip] *= -1
    if flip.any():
        perm = np.arange(n)
        sel = flip[cidx]
        perm[sel] = (rs[cidx[sel]] + rs[cidx[sel] + 1] - 1) - perm[sel]
        xy = xy[perm]
        del perm, sel

    def seam_edges(xy: np.ndarray) -> np.ndarray:
        a, b = xy[:-1], xy[1:]
        horiz = a[:, 1] == b[:, 1]
        on = np.where(horiz, (a[:, 1] % block == 0) & (a[:, 1] > 0) & (a[:, 1] < height),
                      (a[:, 0] % block == 0) & (a[:, 0] > 0) & (a[:, 0] < width))
        on &= (a != b).any(axis=1)
        out = np.zeros(n, dtype=bool)
        out[:-1] = on
        out[last] = False
        return out

    # Only rings with an edge on a seam change; other rings, and a cut ring's runs of edges off the seams
    # ("chains"), are kept as they are. Each cut ring is rotated to start with a seam edge: no chain wraps.
    on_seam = seam_edges(xy)
    cut = np.bincount(cidx[on_seam], minlength=nr) > 0
    first_seam = np.full(nr, -1, dtype=np.int64)
    sidx = np.flatnonzero(on_seam)
    first_seam[cidx[sidx[::-1]]] = sidx[::-1]
    rot = cut & (first_seam != rs[:-1])
    if rot.any():
        perm = np.arange(n)
        sel = rot[cidx]
        sel[last] = False  # the closing coordinate is set from the ring's new first one below
        r_ = cidx[sel]
        length = rs[r_ + 1] - 1 - rs[r_]
        perm[sel] = rs[r_] + (perm[sel] - rs[r_] + first_seam[r_] - rs[r_]) % length
        rl = np.flatnonzero(rot)
        perm[last[rl]] = perm[rs[rl]]
        xy = xy[perm]
        on_seam = seam_edges(xy)
        del perm, sel, r_, length, rl
    del first_seam, sidx

    in_cut = cut[cidx]
    in_cut[last] = False
    chain_e = in_cut & ~on_seam  # edges of cut rings off the seams
    # A chain also breaks where its group's rings meet at a corner off the seams (two pieces of a region
    # in one block touching diagonally, or the parts of an 8-connected piece): relinking decides there too.
    ci = np.flatnonzero(in_cut)
    vkey = (ring_group[cidx[ci]] * kx + xy[ci, 0]) * ky + xy[ci, 1]
    o = np.argsort(vkey, kind="stable")
    sk = vkey[o]
    same = sk[1:] == sk[:-1]
    meet = np.zeros(n, dtype=bool)
    meet[ci[o[1:][same]]] = True
    meet[ci[o[:-1][same]]] = True
    meet[last] = meet[rs[:-1]]
    del in_cut, ci, vkey, o, sk, same
    cs = np.flatnonzero(chain_e & (np.r_[True, ~chain_e[:-1]] | meet))
    ce = np.flatnonzero(chain_e & (np.r_[~chain_e[1:], True] | np.r_[meet[1:], True])) + 1
    del chain_e, meet  # chain vertices cs..ce-1, ends at ce

    # seam edges: split into unit edges; a unit edge present in both directions is shared: cancel both
    se = np.flatnonzero(on_seam)
    sa, sb, sg = xy[se], xy[se + 1], ring_group[cidx[se]]
    step = np.sign(sb - sa)
    slen = np.abs(sb - sa).sum(axis=1)
    rep = np.repeat(np.arange(len(se)), slen)
    k = np.arange(len(rep)) - np.repeat(np.cumsum(slen) - slen, slen)
    ua = sa[rep] + step[rep] * k[:, None]
    ustep = step[rep]
    ug = sg[rep]
    del se, sa, sb, sg, step, slen, rep, k
    ka = (ug * kx + ua[:, 0]) * ky + ua[:, 1]
    kb = (ug * kx + ua[:, 0] + ustep[:, 0]) * ky + ua[:, 1] + ustep[:, 1]
    lo, hi = np.minimum(ka, kb), np.maximum(ka, kb)
    o = np.lexsort((hi, lo))
    dup = (lo[o][1:] == lo[o][:-1]) & (hi[o][1:] == hi[o][:-1])
    live = np.ones(len(o), dtype=bool)
    live[o[1:][dup]] = False
    live[o[:-1][dup]] = False
    del lo, hi, o, dup

    # items to link: the chains, then the surviving unit edges (whose start vertex is appended to xy)
    nlive = int(live.sum())
    cg = ring_group[cidx[cs]]
    item_g = np.concatenate([cg, ug[live]])
    item_ks = np.concatenate([(cg * kx + xy[cs, 0]) * ky + xy[cs, 1], ka[live]])
    item_ke = np.concatenate([(cg * kx + xy[ce, 0]) * ky + xy[ce, 1], kb[live]])
    din = np.concatenate([np.sign(xy[cs + 1] - xy[cs]), ustep[live]])
    dout = np.concatenate([np.sign(xy[ce] - xy[ce - 1]), ustep[live]])
    src_lo = np.concatenate([cs, n + np.arange(nlive)])
    src_len = np.concatenate([ce - cs, np.ones(nlive, dtype=np.int64)])
    xy = np.concatenate([xy, ua[live].astype(np.int32)])
    del ka, kb, ua, ustep, ug, cs, ce, cg, live

    # relink: an item's successor starts where it ends; at a pinch take the right turn (around the pixel
    # outside the group); a ring that then passes a pinch twice turns around the group's pixels there
    m = len(item_ks)
    by_start = np.argsort(item_ks, kind="stable")
    sks = item_ks[by_start]
    pos = np.searchsorted(sks, item_ke, side="left")
    count = np.searchsorted(sks, item_ke, side="right") - pos
    if not ((count == 1) | (count == 2)).all():
        raise AssertionError("seam stitch: open ring")  # cannot happen for pieces of a pixel partition
    succ = by_start[np.minimum(pos, max(m - 1, 0))]
    pinch = np.flatnonzero(count == 2)
    if len(pinch):
        c0, c1 = by_start[pos[pinch]], by_start[pos[pinch] + 1]
        use0 = (din[c0, 0] == dout[pinch, 1]) & (din[c0, 1] == -dout[pinch, 0])
        succ[pinch] = np.where(use0, c0, c1)
    del by_start, sks, pos, count, din, dout
    order, starts = _ring_order(succ)
    if len(pinch):
        label = np.empty(m, dtype=np.int64)
        label[order] = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
        p = pinch[np.argsort(item_ke[pinch], kind="stable")]
        i1, i2 = p[0::2], p[1::2]
        swap = label[i1] == label[i2]
        if swap.any():
            i1, i2 = i1[swap], i2[swap]
            succ[i1], succ[i2] = succ[i2], succ[i1].copy()
            order, starts = _ring_order(succ)

    # new rings: the items' coordinate ranges in ring order, collinear vertices dropped
    nnew = len(starts) - 1
    lens = src_len[order]
    tot = int(lens.sum())
    src = np.repeat(src_lo[order], lens) + (np.arange(tot) - np.repeat(np.cumsum(lens) - lens, lens))
    vring = np.repeat(np.repeat(np.arange(nnew), np.diff(starts)), lens)
    vstart = np.zeros(nnew + 1, dtype=np.int64)
    np.cumsum(np.bincount(vring, minlength=nnew), out=vstart[1:])
    nxt = np.arange(1, tot + 1)
    nxt[vstart[1:] - 1] = vstart[:-1]
    dv = np.sign(xy[src[nxt]] - xy[src])
    prv = np.arange(-1, tot - 1)
    prv[vstart[:-1]] = vstart[1:] - 1
    keep = (dv != dv[prv]).any(axis=1)
    src, vring = src[keep], vring[keep]
    del dv, nxt, prv, keep, lens
    new_len = np.bincount(vring, minlength=nnew)
    new_start = np.zeros(nnew + 1, dtype=np.int64)
    np.cumsum(new_len, out=new_start[1:])
    nx2 = np.arange(1, len(src) + 1)
    nx2[new_start[1:] - 1] = new_start[:-1]
    p0, p1 = xy[src].astype(np.int64), xy[src[nx2]].astype(np.int64)
    new_area2 = np.bincount(vring, weights=p0[:, 0] * p1[:, 1] - p1[:, 0] * p0[:, 1], minlength=nnew)
    del p0, p1, nx2, vring
    new_group = item_g[order[starts[:-1]]]

    # all rings: the untouched ones (closed coordinate ranges of xy), then the new ones (closed here)
    keep_r = np.flatnonzero(~cut)
    ring_len = np.concatenate([rs[keep_r + 1] - rs[keep_r], new_len + 1])  # closed
    ring_src = np.concatenate([rs[keep_r], np.zeros(nnew, dtype=np.int64)])
    rarea = np.concatenate([area2[keep_r], new_area2])
    rgroup = np.concatenate([ring_group[keep_r], new_group])
    nring = len(ring_len)
    is_new = np.r_[np.zeros(len(keep_r), dtype=bool), np.ones(nnew, dtype=bool)]
    shell = rarea > 0

    # holes to shells: a group with one shell takes all its holes; otherwise the smallest containing shell
    nshell = np.bincount(rgroup[shell], minlength=ngroups)
    owner = np.full(nring, -1, dtype=np.int64)
    sh = np.flatnonzero(shell)
    owner[sh] = sh
    first_shell = np.full(ngroups, -1, dtype=np.int64)
    first_shell[rgroup[sh]] = sh
    single = ~shell & (nshell[rgroup] == 1)
    owner[single] = first_shell[rgroup[single]]

    def ring_coords(r: int) -> np.ndarray:
        if is_new[r]:
            j = r - len(keep_r)
            return xy[src[new_start[j]:new_start[j + 1]]]
        return xy[ring_src[r]:ring_src[r] + ring_len[r] - 1]

    multi = np.flatnonzero(~shell & (nshell[rgroup] > 1))
    if len(multi):
        cand: dict[int, list[tuple[float, int, Any]]] = {}
        for s in sh[nshell[rgroup[sh]] > 1].tolist():
            poly = shapely.polygons(ring_coords(s))
            cand.setdefault(int(rgroup[s]), []).append((poly.area, s, poly))
        for h in multi.tolist():
            c = ring_coords(h)
            d = np.sign(c[1] - c[0])
            # the centre of the pixel right of the hole's first edge: outside the group, inside the hole
            x, y = c[0, 0] + 0.5 * (d[0] + d[1]), c[0, 1] + 0.5 * (d[1] - d[0])
            inside = [(area, s) for area, s, poly in cand[int(rgroup[h])] if shapely.contains_xy(poly, x, y)]
            owner[h] = min(inside)[1]

    # polygons: each shell followed by its holes; a group with several shells becomes a multipolygon
    seq = np.lexsort((~shell, owner))
    lens = ring_len[seq]
    tot = int(lens.sum())
    within = np.arange(tot) - np.repeat(np.cumsum(lens) - lens, lens)
    rep = np.repeat(seq, lens)
    gather = np.empty(tot, dtype=np.int64)
    old = ~is_new[rep]
    gather[old] = ring_src[rep[old]] + within[old]
    nw = ~old
    j = rep[nw] - len(keep_r)
    w = within[nw]
    closing = w == new_len[j]
    gather[nw] = src[new_start[j] + np.where(closing, 0, w)]
    coords = xy[gather].astype(np.float64)
    del gather, rep, within, old, nw, j, w, closing
    ring_off = np.zeros(nring + 1, dtype=np.int64)
    np.cumsum(lens, out=ring_off[1:])
    seq_shell = shell[seq]
    poly_off = np.r_[np.flatnonzero(seq_shell), nring].astype(np.int64)
    polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, (ring_off, poly_off))
    poly_group = rgroup[seq[seq_shell]]
    out = np.empty(ngroups, dtype=object)
    one = nshell[poly_group] == 1
    out[poly_group[one]] = polys[one]
    if not one.all():
        many = np.flatnonzero(~one)
        many = many[np.argsort(poly_group[many], kind="stable")]
        mg, inv = np.unique(poly_group[many], return_inverse=True)
        out[mg] = shapely.multipolygons(polys[many], indices=inv)
    if connectivity == 8:
        bad = ~shapely.is_valid(out)
        if bad.any():
            out[bad] = shapely.make_valid(out[bad], method="structure", keep_collapsed=False)
    return out


# -------------------------------------------------------------------------------------------- driver


def _blocks(plan: _Plan, workers: int) -> Iterator[_Block]:
    """Polygonised blocks in row-major order, ``2 * workers`` computing ahead of the caller's merge.

    A sliding window on a plain thread pool: a slow block holds back only its own hand-over, never a whole
    wave of others (GDAL and shapely release the GIL, so the threads run in parallel).
    """
    order = iter([(r, c) for r in range(plan.rows) for c in range(plan.cols)])
    ahead = max(1, 2 * workers)
    with ThreadPoolExecutor(workers, thread_name_prefix="geoseg-vectorize") as ex:
        window: deque[Future[_Block]] = deque(
            ex.submit(_process_block, plan, r, c) for r, c in itertools.islice(order, ahead))
        while window:
            blk = window.popleft().result()
            nxt = next(order, None)
            if nxt is not None:
                window.append(ex.submit(_process_block, plan, *nxt))
            yield blk  # the caller's reference is the only one left


def _iter_features(plan: _Plan, workers: int, progress: Progress | None) -> Iterator[gpd.GeoDataFrame]:
    """Output features in batches (GeoDataFrames in the output CRS)."""
    merger = _Merger(plan)
    total = plan.rows * plan.cols
    held_geoms: list[np.ndarray] = []  # only with simplify: the whole coverage in pixel coordinates
    held_cls: list[np.ndarray] = []
    for done, blk in enumerate(_blocks(plan, workers), start=1):
        merger.add(blk)
        closed, blk.closed = blk.closed, None  # written, then freed
        if plan.simplify_px is None:
            if len(closed):
                yield closed
        else:
            held_geoms.append(closed[0])
            held_cls.append(closed[1])
        del closed
        if blk.c == plan.cols - 1:
            geoms, cls = merger.complete(blk.r, blk.r == plan.rows - 1)
            if plan.simplify_px is None:
                if len(geoms):
                    batch = _finalize(plan, geoms, cls)
                    del geoms  # the pixel-coordinate polygons: not held while the batch is written
                    yield batch
                    del batch
            else:
                held_geoms.append(geoms)
                held_cls.append(cls)
            log.debug("block row %d done: %d open pieces", blk.r, merger.open_count)
        if progress is not None:
            progress(done, total)
    if plan.simplify_px is not None:
        yield from _simplified(plan, held_geoms, held_cls)


def _simplified(plan: _Plan, held_geoms: list[np.ndarray], held_cls: list[np.ndarray]
                ) -> Iterator[gpd.GeoDataFrame]:
    geoms = np.concatenate(held_geoms) if held_geoms else np.empty(0, dtype=object)
    cls = np.concatenate(held_cls) if held_cls else np.empty(0, dtype=np.int64)
    if not len(geoms):
        return
    keep = _keep(plan, geoms, _measure(plan, _to_crs_coords(plan, geoms))[0])
    geoms, cls = geoms[keep], cls[keep]
    # Every vertex is a pixel corner; splitting edges at every corner gives neighbours identical vertices
    # on shared edges (GDAL drops collinear ones), which coverage simplification needs to leave no gaps.
    dense = shapely.segmentize(geoms, 1.0)
    assert plan.simplify_px is not None
    simple = shapely.coverage_simplify(dense, plan.simplify_px)
    for i in range(0, len(simple), BATCH_FEATURES):
        yield _finalize(plan, simple[i:i + BATCH_FEATURES], cls[i:i + BATCH_FEATURES], filter_area=False)


def _workers(workers: int | None) -> int:
    if workers is None:
        from geoseg.units import default_workers

        return default_workers()  # the one rule, shared with predict
    if not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be a positive integer, got {workers!r}")
    return workers


# ------------------------------------------------------------------------------------------- public


def polygonize(src: str | os.PathLike[str], *, connectivity: int = 4,
               min_area: float | str | None = None, simplify: float | str | None = None,
               skip_classes: Iterable[int] = (), class_names: Mapping[int, str] | None = None,
               to_crs: Any = None, block_size: int = BLOCK_SIZE, workers: int | None = None,
               progress: Progress | None = None) -> gpd.GeoDataFrame:
    """Polygons of a class raster as a GeoDataFrame, without writing a file.

    Same polygons and options as :func:`vectorize_raster` (which streams them to a file instead); the
    result is held in memory, so prefer :func:`vectorize_raster` for large rasters.

    Returns:
        GeoDataFrame with columns ``class_id`` (int32), ``class_name`` (str or None), ``area_m2``,
        ``perim_m`` and ``geometry`` (Polygon; MultiPolygon with 8-connectivity), in the raster's CRS or
        ``to_crs``.

    Raises:
        InputError: unreadable raster, not a one-band integer raster, or a bad option.
    """
    plan = _make_plan(src, connectivity=connectivity, min_area=min_area, simplify=simplify,
                      skip_classes=skip_classes, class_names=class_names, to_crs=to_crs, block_size=block_size)
    batches = list(_iter_features(plan, _workers(workers), progress))
    if not batches:
        return _empty(plan)
    return gpd.GeoDataFrame(_concat(batches), crs=plan.out_crs)


def _empty(plan: _Plan) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        {"class_id": np.zeros(0, np.int32), "class_name": np.zeros(0, object),
         "area_m2": np.zeros(0), "perim_m": np.zeros(0)},
        geometry=gpd.GeoSeries([], crs=plan.out_crs), crs=plan.out_crs,
    )


def _concat(batches: Sequence[gpd.GeoDataFrame]) -> gpd.GeoDataFrame:
    import pandas as pd

    return pd.concat(batches, ignore_index=True)  # type: ignore[return-value]


def vectorize_raster(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                     vector_format: str | None = None, connectivity: int = 4,
                     min_area: float | str | None = None, simplify: float | str | None = None,
                     skip_classes: Iterable[int] = (), class_names: Mapping[int, str] | None = None,
                     to_crs: Any = None, block_size: int = BLOCK_SIZE, workers: int | None = None,
                     overwrite: bool = False, progress: Progress | None = None) -> VectorizeResult:
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
        workers: threads polygonising blocks (default: the CPUs available).
        overwrite: replace an existing output.
        progress: called as ``progress(done_blocks, total_blocks)`` after each block.

    Returns:
        A :class:`VectorizeResult` (path, counts and areas per class, seconds).

    Raises:
        InputError: unreadable or unsuitable raster, bad option, or a shapefile past the 2 GB limit.
        OutputExistsError: ``dst`` exists and ``overwrite`` is false.
        UnknownNameError: unknown ``vector_format``.
    """
    t0 = time.perf_counter()
    path, fmt = format_for(dst, vector_format)
    check_writable(path, overwrite)
    plan = _make_plan(src, connectivity=connectivity, min_area=min_area, simplify=simplify,
                      skip_classes=skip_classes, class_names=class_names, to_crs=to_crs, block_size=block_size,
                      force_4326=fmt.epsg4326)
    nworkers = _workers(workers)
    result = VectorizeResult(path=path, vector_format=fmt.name,
                             crs=plan.out_crs.to_string() if plan.out_crs is not None else None,
                             blocks=plan.rows * plan.cols)
    store = Store(path.parent)
    store.prepare()
    with store.staged_file(path.name) as tmp:
        batches = _rebatch(_iter_features(plan, nworkers, progress), result)
        if fmt.driver is None:
            _write_parquet(tmp, batches, plan)
        else:
            _write_ogr(tmp, batches, plan, fmt)
        check_writable(path, overwrite)
        for f in sorted(tmp.parent.iterdir()):  # a shapefile is several files; the .shp goes last, on exit
            if f != tmp:
                store.publish(f, f.name)
    result.seconds = time.perf_counter() - t0
    log.info("vectorised %s: %d polygons in %d blocks to %s (%s) in %.1f s", plan.path, result.features,
             result.blocks, path, fmt.name, result.seconds)
    return result


def _rebatch(batches: Iterator[gpd.GeoDataFrame], result: VectorizeResult) -> Iterator[gpd.GeoDataFrame]:
    """Coalesce small batches into about :data:`BATCH_FEATURES` features, counting them into ``result``."""
    pending: list[gpd.GeoDataFrame] = []
    size = 0
    for b in batches:
        pending.append(b)
        size += len(b)
        if size >= BATCH_FEATURES:
            out = _concat(pending)
            pending, size = [], 0
            result.add(out)
            yield out
            del out
    if pending:
        out = _concat(pending)
        result.add(out)
        yield out


# -------------------------------------------------------------------------------------------- writers


def _arrow_schema(plan: _Plan, extra_metadata: dict[bytes, bytes] | None = None) -> Any:
    import pyarrow as pa

    geom = pa.field("geometry", pa.binary(), metadata={b"ARROW:extension:name": b"geoarrow.wkb"})
    return pa.schema([("class_id", pa.int32()), ("class_name", pa.string()), ("area_m2", pa.float64()),
                      ("perim_m", pa.float64()), geom], metadata=extra_metadata)


def _record_batch(gdf: gpd.GeoDataFrame, schema: Any) -> Any:
    import pyarrow as pa

    return pa.record_batch([
        pa.array(gdf["class_id"].to_numpy(np.int32)),
        pa.array([n if isinstance(n, str) else None for n in gdf["class_name"]], type=pa.string()),
        pa.array(gdf["area_m2"].to_numpy(np.float64)),
        pa.array(gdf["perim_m"].to_numpy(np.float64)),
        pa.array(shapely.to_wkb(gdf.geometry.values), type=pa.binary()),
    ], schema=schema)


def _geometry_type(plan: _Plan) -> str:
    return "MultiPolygon" if plan.connectivity == 8 else "Polygon"


def _shp_bytes(gdf: gpd.GeoDataFrame) -> int:
    """Bytes a batch adds to the larger of .shp (headers, part indexes, 16 bytes a point) and .dbf."""
    geoms = gdf.geometry.values
    points = int(shapely.get_num_coordinates(geoms).sum())
    rings = shapely.get_num_interior_rings(shapely.get_parts(geoms)).sum() + len(shapely.get_parts(geoms))
    shp = 52 * len(gdf) + 4 * int(rings) + 16 * points
    dbf = len(gdf) * (1 + 11 + 80 + 24 + 24)
    return max(shp, dbf)


def _write_ogr(tmp: Path, batches: Iterator[gpd.GeoDataFrame], plan: _Plan, fmt: VectorFormat) -> None:
    import pyarrow as pa
    import pyogrio

    schema = _arrow_schema(plan)
    failure: list[BaseException] = []

    def record_batches() -> Iterator[Any]:
        written = 0
        try:
            for gdf in batches:
                if fmt.size_limit is not None:
                    written += _shp_bytes(gdf)
                    if written > fmt.size_limit:
                        raise InputError(f"{tmp.name}: a shapefile past the format's 2 GB limit would be written; "
                                         "write GeoPackage instead (.gpkg, --vector-format gpkg)")
                yield _record_batch(gdf, schema)
        except BaseException as exc:  # pyogrio reports a failing stream as a bare RuntimeError
            failure.append(exc)
            raise

    reader = pa.RecordBatchReader.from_batches(schema, record_batches())
    crs = plan.out_crs.to_wkt() if plan.out_crs is not None else None
    try:
        with gdal_env():
            pyogrio.write_arrow(reader, os.fspath(tmp), driver=fmt.driver, layer=tmp.stem,
                                geometry_name="geometry", geometry_type=_geometry_type(plan), crs=crs,
                                encoding="UTF-8" if fmt.name == "shp" else None,
                                layer_options=fmt.layer_options or None)
    except Exception:
        if failure:
            raise failure[0] from None
        raise


def _write_parquet(tmp: Path, batches: Iterator[gpd.GeoDataFrame], plan: _Plan) -> None:
    import pyarrow.parquet as pq

    column: dict[str, Any] = {"encoding": "WKB",
                              "geometry_types": ["MultiPolygon"] if plan.connectivity == 8 else ["Polygon"]}
    column["crs"] = plan.out_crs.to_json_dict() if plan.out_crs is not None else None
    geo = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}
    schema = _arrow_schema(plan, {b"geo": json.dumps(geo).encode()})
    schema = schema.set(4, schema.field(4).remove_metadata())  # GeoParquet marks WKB in "geo", not the field
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for gdf in batches:
            writer.write_batch(_record_batch(gdf, schema))
