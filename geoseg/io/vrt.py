"""GDAL VRT documents (XML text): a scene output assembled from strips, a mosaic of many class maps, and a
scene stacked from one raster per band.

Both are written with :mod:`xml.etree.ElementTree` in GDAL's documented VRT format
(https://gdal.org/drivers/raster/vrt.html); nothing here writes files. ``strips_vrt`` describes one
scene raster whose pixels live in part files; GDAL's COG driver turns it into the final output, the same
bytes as from one tiled GTiff of the whole scene. ``mosaic_vrts`` lays the class maps of a whole job on
one grid per CRS, so that a job opens in QGIS as one layer. ``stack_vrt`` stacks bands of several rasters
(a STAC Item's per-band COGs, at several resolutions) onto one grid, resampled on read, nothing copied.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.dtypes import dtype_rev, typename_fwd
from rasterio.windows import Window

from geoseg.errors import InputError
from geoseg.io.profiles import OutputSpec
from geoseg.io.raster import BLOCK, gdal_env, open_scene
from geoseg.io.store import gdal_path

log = logging.getLogger(__name__)

__all__ = ["RESAMPLING", "StackBand", "mosaic_vrts", "stack_vrt", "strips_vrt"]

# Tags of a class map that travel into its mosaic: ``CLASS_<id>`` names and the ``CLASSES`` JSON.
_CLASS_TAG_PREFIX = "CLASS"
_EPS = 1e-6  # pixels: grid arithmetic closer than this to an integer is that integer


# ---------------------------------------------------------------------------------------------- strips


def strips_vrt(width: int, height: int, crs: Any, transform: Affine, spec: OutputSpec,
               sources: Sequence[tuple[str, Window]]) -> str:
    """A VRT of a ``width`` x ``height`` scene raster assembled from part files ("strips").

    Each source is a GeoTIFF holding ``spec.count`` bands of ``spec.dtype`` that covers exactly its
    ``Window`` of the scene. A relative path is written relative to the VRT's folder (the VRT must be
    saved in the folder the paths are relative to); absolute and GDAL (``/vsis3/...``) paths are written
    as given, URLs (``s3://...``) as GDAL paths. Pixels that no source covers read as ``spec.nodata``; where sources overlap, the later
    one wins.

    The VRT carries the CRS, transform, nodata, band descriptions, colour table (band 1), scales (offset
    0), ``NBITS`` and tags of ``spec``, so that ``rasterio.shutil.copy(vrt, cog, **cog_options(spec, ...))``
    writes the same bytes as from one tiled GTiff holding the same pixels and metadata. Bands are
    ``Palette`` (with a colour table) or ``Gray`` then ``Undefined``: never RGB(A), which GTiff would
    infer for 3 or 4 bands of Byte (and which would make a fourth probability band an alpha mask).

    Args:
        width: width of the scene raster in pixels.
        height: its height in pixels.
        crs: its CRS (anything :meth:`rasterio.crs.CRS.from_user_input` takes), or None.
        transform: its affine transform.
        spec: the output profile (dtype, count, nodata, descriptions, colormap, scales, tags).
        sources: ``(path, window)`` pairs; windows are whole pixels inside the scene.

    Returns:
        The VRT document as XML text.

    Raises:
        InputError: a window is fractional, empty or outside the scene, or a colormap id does not fit
            the dtype.
    """
    root = _dataset_element(width, height, crs, transform)
    _metadata(root, spec.tags)
    rects = [(path, _window_rect(path, window, width, height)) for path, window in sources]
    for b in range(1, spec.count + 1):
        band = _band_element(root, b, spec.dtype, spec.nodata)
        # the COG's tile size: GDAL then reads the VRT (and the strips) in whole output tiles
        band.set("blockXSize", str(BLOCK))
        band.set("blockYSize", str(BLOCK))
        if b <= len(spec.descriptions) and spec.descriptions[b - 1]:
            ET.SubElement(band, "Description").text = spec.descriptions[b - 1]
        palette = b == 1 and bool(spec.colormap)
        ET.SubElement(band, "ColorInterp").text = "Palette" if palette else "Gray" if b == 1 else "Undefined"
        if palette and spec.colormap:
            _color_table(band, spec.colormap, spec.dtype)
        if spec.nbits:  # as GTiff reports it; the COG driver then rounds its overviews the same way
            _metadata(band, {"NBITS": str(spec.nbits)}, domain="IMAGE_STRUCTURE")
        if spec.scales:
            ET.SubElement(band, "Offset").text = "0"
            ET.SubElement(band, "Scale").text = repr(float(spec.scales[b - 1]))
        for path, (col, row, cols, rows) in rects:
            _source(band, "SimpleSource", path, b, (0, 0, cols, rows), (col, row, cols, rows))
    return _to_xml(root)


def _window_rect(path: str, window: Window, width: int, height: int) -> tuple[int, int, int, int]:
    """``(col_off, row_off, width, height)`` of a strip's window, checked against the scene."""
    values = (window.col_off, window.row_off, window.width, window.height)
    rect = tuple(int(round(v)) for v in values)
    if any(abs(v - r) > _EPS for v, r in zip(values, rect)):
        raise InputError(f"{path}: window {window} is not in whole pixels; strips cover whole pixels of the scene")
    col, row, cols, rows = rect
    if cols <= 0 or rows <= 0 or col < 0 or row < 0 or col + cols > width or row + rows > height:
        raise InputError(f"{path}: window {window} is empty or outside the {width}x{height} scene; "
                         "give strip windows inside the scene")
    return col, row, cols, rows


# ---------------------------------------------------------------------------------------------- mosaic


@dataclass(frozen=True)
class _MapHeader:
    """What a mosaic needs from one class map, read from its header."""

    path: str  # as given
    source: str  # as GDAL opens it (``s3://`` -> ``/vsis3/``)
    width: int
    height: int
    crs: CRS | None
    transform: Affine
    dtype: str
    nodata: float | None
    colormap: dict[int, tuple[int, int, int, int]] | None
    description: str | None
    class_tags: dict[str, str]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` of a north-up map."""
        t = self.transform
        return t.c, t.f + t.e * self.height, t.c + t.a * self.width, t.f


def mosaic_vrts(class_maps: Sequence[str], name: str) -> dict[str, str]:
    """VRT mosaics over many class-map COGs, one per CRS, so that a whole job opens as one layer.

    Maps are grouped by CRS. Each mosaic covers the union of its maps' extents at the finest resolution
    among them (per axis), draws the maps with nearest-neighbour resampling in the given order (later maps
    on top, their nodata pixels transparent), and takes its colour table, band description and ``CLASS*``
    tags from the first map of its group, its nodata from the first map that has one. Maps that are not north-up (rotated, sheared or
    flipped) are left out with a logged warning.

    The documents are meant to be saved in the folder holding the maps when all maps share one folder:
    their sources are then written as basenames relative to the VRT. Otherwise the sources are absolute
    paths (or GDAL paths such as ``/vsis3/bucket/out/a.classes.tif``, as given).

    Args:
        class_maps: paths of one-band class maps (local or GDAL paths).
        name: stem of the file names.

    Returns:
        ``{filename: xml}``: ``{name}.vrt`` when there is one CRS group, else ``{name}.{crs_key}.vrt`` per
        group, with ``crs_key`` ``epsg<code>``, ``crs<hash>`` for a CRS without an EPSG code, or ``nocrs``.
        Empty when no map can be mosaicked.

    Raises:
        InputError: a map cannot be opened or has more than one band.
    """
    headers = [_read_header(p) for p in class_maps]
    same_folder = len({_folder(h.source) for h in headers}) == 1
    groups: dict[str, list[_MapHeader]] = {}
    for h in headers:
        t = h.transform
        if t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
            log.warning("%s: left out of the mosaic %s: its transform is not north-up (%s); "
                        "warp it to a north-up grid to include it", h.path, name, tuple(t)[:6])
            continue
        groups.setdefault(_crs_key(h.crs), []).append(h)
    if len(groups) > 1:
        log.info("mosaic %s: the class maps are on %d CRSs (%s); writing one mosaic per CRS",
                 name, len(groups), ", ".join(groups))
    return {
        (f"{name}.vrt" if len(groups) == 1 else f"{name}.{key}.vrt"): _mosaic_xml(maps, same_folder)
        for key, maps in groups.items()
    }


def _read_header(path: str) -> _MapHeader:
    with gdal_env(), open_scene(path) as ds:
        if ds.count != 1:
            raise InputError(f"{path}: has {ds.count} bands, a class map has one; give the .classes.tif outputs")
        try:
            colormap: dict[int, tuple[int, int, int, int]] | None = ds.colormap(1)
        except ValueError:  # no colour table
            colormap = None
        tags = {k: v for k, v in ds.tags().items() if k.startswith(_CLASS_TAG_PREFIX)}
        return _MapHeader(path=path, source=gdal_path(path), width=ds.width, height=ds.height, crs=ds.crs, transform=ds.transform,
                          dtype=ds.dtypes[0], nodata=ds.nodata, colormap=colormap,
                          description=ds.descriptions[0], class_tags=tags)


def _crs_key(crs: CRS | None) -> str:
    """``epsg32633``; ``crs<8 hex>`` for a CRS without an EPSG code; ``nocrs``."""
    if not crs:
        return "nocrs"
    code = crs.to_epsg()
    if code is not None:
        return f"epsg{code}"
    return "crs" + hashlib.sha1(crs.to_wkt().encode()).hexdigest()[:8]


def _mosaic_xml(maps: Sequence[_MapHeader], relative: bool) -> str:
    """The VRT of one CRS group (all north-up)."""
    first = maps[0]
    xres = min(m.transform.a for m in maps)
    yres = min(-m.transform.e for m in maps)
    all_bounds = [m.bounds for m in maps]
    left, top = min(b[0] for b in all_bounds), max(b[3] for b in all_bounds)
    right, bottom = max(b[2] for b in all_bounds), min(b[1] for b in all_bounds)
    width, height = _pixels((right - left) / xres), _pixels((top - bottom) / yres)
    dtype = np.result_type(*[m.dtype for m in maps]).name
    nodata = next((m.nodata for m in maps if m.nodata is not None), None)

    root = _dataset_element(width, height, first.crs, Affine(xres, 0.0, left, 0.0, -yres, top))
    _metadata(root, first.class_tags)
    band = _band_element(root, 1, dtype, nodata)
    if first.description:
        ET.SubElement(band, "Description").text = first.description
    if first.colormap:
        ET.SubElement(band, "ColorInterp").text = "Palette"
        _color_table(band, _trim_colormap(first.colormap, first.class_tags), dtype)
    for m in maps:
        t = m.transform
        dst = ((t.c - left) / xres, (top - t.f) / yres, m.width * t.a / xres, m.height * -t.e / yres)
        path = posixpath.basename(m.source) if relative else _absolute(m.source)
        # ComplexSource, not SimpleSource, so that a map's nodata pixels leave the maps beneath visible
        kind = "SimpleSource" if m.nodata is None else "ComplexSource"
        src = _source(band, kind, path, 1, (0, 0, m.width, m.height), dst)
        if m.nodata is not None:
            ET.SubElement(src, "NODATA").text = _nodata_text(m.nodata)
    return _to_xml(root)


def _pixels(extent: float) -> int:
    """Whole pixels covering ``extent`` pixels (a hair over an integer is that integer)."""
    return max(1, math.ceil(extent - _EPS))


def _trim_colormap(colormap: Mapping[int, tuple[int, ...]], class_tags: Mapping[str, str]
                   ) -> dict[int, tuple[int, ...]]:
    """Drop the black padding a GTiff colour table carries past the last class (65536 entries for uint16)."""
    ids = [int(k[len("CLASS_"):]) for k in class_tags if k.startswith("CLASS_") and k[len("CLASS_"):].isdigit()]
    last = max([*ids, *(i for i, c in colormap.items() if tuple(c[:3]) != (0, 0, 0))], default=0)
    return {i: tuple(c) for i, c in colormap.items() if i <= last}


def _absolute(source: str) -> str:
    return source if source.startswith("/vsi") else os.path.abspath(source)


def _folder(source: str) -> str:
    return posixpath.dirname(_absolute(source))


# ---------------------------------------------------------------------------------------------- stack

# Resampling of a stacked band onto the stack's grid, as GDAL's VRT sources name them; nearest is
# gdalbuildvrt's default.
RESAMPLING = ("nearest", "bilinear", "cubic", "cubicspline", "lanczos", "average", "mode")


@dataclass(frozen=True)
class StackBand:
    """One band of a stack: band ``band`` of the raster ``path``, with what its header says."""

    path: str  # a local path, a URL (``s3://``, ``https://``) or a GDAL path
    band: int
    width: int
    height: int
    transform: Affine
    dtype: str
    nodata: float | None
    block: tuple[int, int]  # (rows, cols) of the raster's blocks
    description: str = ""


def check_resampling(name: str) -> str:
    """``name`` if it is a resampling a stack can use.

    Raises:
        InputError: naming the valid values.
    """
    if name not in RESAMPLING:
        raise InputError(f"--resampling {name}: valid values are {', '.join(RESAMPLING)}")
    return name


def stack_vrt(bands: Sequence[StackBand], crs: Any, resolution: float | None = None, resampling: str = "nearest",
              tags: Mapping[str, str] | None = None) -> str:
    """A VRT stacking ``bands`` in order on one north-up grid, as ``gdalbuildvrt -separate`` does.

    The grid covers the union of the bands' extents at the finest resolution among them (per axis), or at
    ``resolution`` (CRS units, both axes); its size is the extent over the resolution, rounded. Every band
    is drawn whole (``SrcRect`` the raster, ``DstRect`` its extent on the grid) with ``resampling``, so
    GDAL resamples it on read exactly as ``rasterio`` reads a raster into an ``out_shape``. Bands keep their
    nodata value (grid pixels no band covers read as it); the stack's data type is the common type of the bands'. Sources are written as absolute
    paths or GDAL ``/vsi`` paths, and their properties are given, so GDAL opens a source only when it reads
    from it.

    Args:
        bands: the bands in stack order, all in ``crs``.
        crs: the CRS of every band.
        resolution: pixel size of the grid; default the finest of the bands'.
        resampling: one of :data:`RESAMPLING`.
        tags: dataset metadata (``TIFFTAG_DATETIME``...).

    Returns:
        The VRT document as XML text.

    Raises:
        InputError: no band, a transform that is not north-up, a resolution that is not positive, or an
            unknown resampling.
    """
    check_resampling(resampling)
    if not bands:
        raise InputError("a stack needs at least one band")
    for b in bands:
        t = b.transform
        if t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
            raise InputError(f"{b.path}: its transform is not north-up ({tuple(t)[:6]}); a stack lays bands on "
                             "one north-up grid: warp it first (gdalwarp)")
    if resolution is not None and not (resolution > 0 and math.isfinite(resolution)):
        raise InputError(f"--resolution {resolution}: must be a positive pixel size in the CRS's units")
    xres = resolution or min(b.transform.a for b in bands)
    yres = resolution or min(-b.transform.e for b in bands)
    left = min(b.transform.c for b in bands)
    top = max(b.transform.f for b in bands)
    right = max(b.transform.c + b.transform.a * b.width for b in bands)
    bottom = min(b.transform.f + b.transform.e * b.height for b in bands)
    width = max(1, int(math.floor((right - left) / xres + 0.5)))  # gdalbuildvrt's rounding
    height = max(1, int(math.floor((top - bottom) / yres + 0.5)))
    dtype = np.result_type(*[b.dtype for b in bands]).name
    root = _dataset_element(width, height, crs, Affine(xres, 0.0, left, 0.0, -yres, top))
    _metadata(root, dict(tags or {}))
    for i, b in enumerate(bands, start=1):
        band = _band_element(root, i, dtype, b.nodata)
        if b.description:
            ET.SubElement(band, "Description").text = b.description
        ET.SubElement(band, "ColorInterp").text = "Gray" if i == 1 else "Undefined"
        t = b.transform
        dst = ((t.c - left) / xres, (top - t.f) / yres, b.width * t.a / xres, b.height * -t.e / yres)
        # a SimpleSource is read as rasterio reads a band into an out_shape (GDAL's resampled RasterIO,
        # which leaves the source's nodata pixels out of the kernels)
        _source(band, "SimpleSource", _absolute(gdal_path(b.path)), b.band, (0, 0, b.width, b.height), dst,
                properties=b, resampling=resampling)
    return _to_xml(root)


# ---------------------------------------------------------------------------------------------- XML


def _dataset_element(width: int, height: int, crs: Any, transform: Affine) -> ET.Element:
    root = ET.Element("VRTDataset", rasterXSize=str(int(width)), rasterYSize=str(int(height)))
    if crs:
        # without dataAxisToSRSAxisMapping GDAL reads the SRS in GIS (x, y) order, as rasterio writes it
        ET.SubElement(root, "SRS").text = CRS.from_user_input(crs).to_wkt()
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in transform.to_gdal())
    return root


def _metadata(parent: ET.Element, items: Mapping[str, str], domain: str = "") -> None:
    if items:
        md = ET.SubElement(parent, "Metadata", {"domain": domain} if domain else {})
        for key, value in items.items():
            ET.SubElement(md, "MDI", key=str(key)).text = str(value)


def _band_element(root: ET.Element, index: int, dtype: str, nodata: float | None) -> ET.Element:
    band = ET.SubElement(root, "VRTRasterBand", dataType=typename_fwd[dtype_rev[dtype]], band=str(index))
    if nodata is not None:
        ET.SubElement(band, "NoDataValue").text = _nodata_text(nodata)
    return band


def _nodata_text(nodata: float) -> str:
    value = float(nodata)
    if math.isnan(value):
        return "nan"
    return str(int(value)) if value.is_integer() else repr(value)


def _color_table(band: ET.Element, colormap: Mapping[int, Sequence[int]], dtype: str) -> None:
    """Entries 0..max id; ids not in ``colormap`` are transparent black."""
    top = int(np.iinfo(dtype).max) if np.dtype(dtype).kind in "ui" else -1
    bad = [i for i in colormap if not 0 <= int(i) <= top]
    if bad:
        raise InputError(f"colour table ids {bad} do not fit a {dtype} band; class ids must be 0..{top}")
    table = ET.SubElement(band, "ColorTable")
    for i in range(max(int(k) for k in colormap) + 1):
        rgba = tuple(colormap.get(i, (0, 0, 0, 0)))
        if len(rgba) == 3:
            rgba = (*rgba, 255)
        ET.SubElement(table, "Entry", {f"c{j + 1}": str(int(v)) for j, v in enumerate(rgba)})


def _source(band: ET.Element, kind: str, path: str, source_band: int,
            src: tuple[float, float, float, float], dst: tuple[float, float, float, float],
            properties: StackBand | None = None, resampling: str | None = None) -> ET.Element:
    element = ET.SubElement(band, kind, {"resampling": resampling} if resampling else {})
    filename, relative = _source_filename(path)
    ET.SubElement(element, "SourceFilename", relativeToVRT="1" if relative else "0").text = filename
    ET.SubElement(element, "SourceBand").text = str(source_band)
    if properties is not None:  # GDAL need not open the source to know its size
        p = properties
        ET.SubElement(element, "SourceProperties", RasterXSize=str(p.width), RasterYSize=str(p.height),
                      DataType=typename_fwd[dtype_rev[p.dtype]], BlockXSize=str(p.block[1]),
                      BlockYSize=str(p.block[0]))
    for tag, rect in (("SrcRect", src), ("DstRect", dst)):
        ET.SubElement(element, tag, {k: _coord(v) for k, v in zip(("xOff", "yOff", "xSize", "ySize"), rect)})
    return element


def _source_filename(path: str) -> tuple[str, bool]:
    """How GDAL should find ``path``: ``(filename, relative_to_vrt)``; URLs become GDAL ``/vsi`` paths."""
    source = gdal_path(path)
    return source, not (source.startswith("/vsi") or os.path.isabs(source))


def _coord(value: float) -> str:
    """A rectangle coordinate: an integer when it is one (up to float noise), else the exact float."""
    nearest = round(value)
    return str(int(nearest)) if abs(value - nearest) < _EPS else repr(float(value))


def _to_xml(root: ET.Element) -> str:
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"
