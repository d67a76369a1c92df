"""Raster I/O: open and describe scenes, read chips with their validity masks, output profiles.

Scenes are opened by path or URL (``s3://``, ``https://``, ``/vsi...``: GDAL's virtual file systems read
them by range requests). The outputs' named profiles (:class:`OutputSpec`) and COG options live here;
:mod:`geoseg.predict.finish` builds the outputs and :mod:`geoseg.io.store` publishes them.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import ColorInterp, MaskFlags
from rasterio.errors import RasterBlockError, RasterioIOError
from rasterio.windows import Window

from geoseg.errors import InputError, OutputExistsError

log = logging.getLogger(__name__)

BLOCK = 512  # internal tile size of every output, and the row granularity of writes
# a stacked scene's metadata (geoseg.io.stac_scenes): the STAC Item it was stacked from, and its datetime
SOURCE_ITEM_TAG = "GEOSEG_SOURCE_ITEM"
SOURCE_DATETIME_TAG = "GEOSEG_SOURCE_DATETIME"

GDAL_OPTIONS: dict[str, Any] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no directory listing per open (remote scenes)
    "GDAL_CACHEMAX": 96,  # MB; bounded whatever the scene size
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.vrt,.jp2,.JP2",  # .jp2: STAC assets
}


def gdal_env(**options: Any) -> rasterio.Env:
    """A :class:`rasterio.Env` with geoseg's GDAL settings, overridden by ``options``.

    Object-storage endpoints set the AWS way (``AWS_ENDPOINT_URL``) are passed on to GDAL too.
    """
    set_remote_options()
    return rasterio.Env(**{**GDAL_OPTIONS, **options})


def set_remote_options() -> None:
    """Tell GDAL, process-wide, the object-storage endpoint set the AWS way (``AWS_ENDPOINT_URL``).

    Process-wide on purpose: a :class:`rasterio.Env` leaving one thread clears its options for every
    thread, while chips of a remote scene are read on many threads.
    """
    from rasterio.env import set_gdal_config

    from geoseg.io.remote import gdal_remote_options

    for key, value in gdal_remote_options().items():
        set_gdal_config(key, value)


@dataclass(frozen=True)
class SceneInfo:
    """What geoseg needs to know about a scene, read from its header only."""

    path: str
    width: int
    height: int
    count: int
    dtype: str
    crs: Any
    transform: Any
    nodata: float | None
    mask: str  # "none", "nodata", "alpha" or "internal"
    alpha_band: int | None
    block_shapes: tuple[tuple[int, int], ...]
    driver: str
    bounds: tuple[float, float, float, float]
    descriptions: tuple[str | None, ...]
    pixel_size_m: float | None = None
    compression: str | None = None
    overviews: tuple[int, ...] = ()
    acquired: str | None = None  # the header's TIFFTAG_DATETIME ("YYYY:MM:DD HH:MM:SS"), when it has one
    source_item: str | None = None  # a stacked scene's STAC Item (geoseg.io.stac_scenes): its location
    source_datetime: str | None = None  # ... and its datetime, as the Item gives it

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def area_km2(self) -> float | None:
        return None if self.pixel_size_m is None else self.pixels * self.pixel_size_m**2 / 1e6

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "driver": self.driver, "width": self.width, "height": self.height,
            "count": self.count, "dtype": self.dtype,
            "crs": self.crs.to_string() if self.crs else None,
            "transform": list(self.transform)[:6] if self.transform else None,
            "bounds": list(self.bounds), "nodata": self.nodata, "mask": self.mask,
            "alpha_band": self.alpha_band, "block_shapes": [list(b) for b in self.block_shapes],
            "pixel_size_m": self.pixel_size_m, "area_km2": self.area_km2,
            "compression": self.compression, "overviews": list(self.overviews),
            "descriptions": list(self.descriptions),
        }


def _check_geographic_bounds(path: str, ds: rasterio.DatasetReader) -> None:
    """Refuse a geographic CRS whose coordinates are not degrees (a projected grid labelled EPSG:4326)."""
    if ds.crs is None or not ds.crs.is_geographic:
        return
    left, bottom, right, top = ds.bounds
    if min(bottom, top) < -90.001 or max(bottom, top) > 90.001 or min(left, right) < -540 or max(left, right) > 540:
        raise InputError(f"{path}: its bounds ({left:g}, {bottom:g}, {right:g}, {top:g}) are not degrees of its "
                         f"geographic CRS {ds.crs.to_string()}; fix the georeferencing (gdal_edit.py -a_srs with "
                         "the CRS its coordinates are in)")


def _pixel_size_m(ds: rasterio.DatasetReader) -> float | None:
    if ds.crs is None:
        return None
    xres, yres = abs(ds.transform.a), abs(ds.transform.e)
    if ds.crs.is_geographic:
        lat = math.radians((ds.bounds.top + ds.bounds.bottom) / 2)
        return math.sqrt(xres * 111_320 * math.cos(lat) * yres * 110_574)
    try:
        factor = ds.crs.linear_units_factor[1]
    except Exception:  # CRS without linear units: take the units as metres
        factor = 1.0
    from geoseg.io.geodesy import ground_pixel_size

    return ground_pixel_size(ds.crs, ds.transform, tuple(ds.bounds), factor)  # Web Mercator's are not metres


def _mask_kind(ds: rasterio.DatasetReader) -> tuple[str, int | None]:
    alpha = next((i + 1 for i, ci in enumerate(ds.colorinterp) if ci == ColorInterp.alpha), None)
    if alpha is not None:
        return "alpha", alpha
    flags = ds.mask_flag_enums
    if any(MaskFlags.per_dataset in f for f in flags):
        return "internal", None
    if any(MaskFlags.nodata in f for f in flags):
        return "nodata", None
    return "none", None


def scene_stem(path: str) -> str:
    """The output stem of a scene path or URL: its file name without the raster suffix or a query."""
    name = re.split(r"[/\\]", path.split("?")[0].rstrip("/"))[-1]
    for suffix in (".tiff", ".tif", ".vrt", ".img", ".jp2"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0] if "." in name else name


def open_scene(path: str | os.PathLike[str]) -> rasterio.DatasetReader:
    """Open a scene for reading, with a one-line error naming the file when GDAL cannot."""
    from geoseg.io.remote import gdal_path

    p = os.fspath(path)
    if "://" not in p and os.path.isdir(p) and not p.lower().endswith((".zarr", ".gdb")):
        raise InputError(f"{p}: is a folder; give raster files, or a quoted glob such as '{p.rstrip('/')}/*.tif'")
    set_remote_options()
    try:
        # GDAL's own /vsis3/, /vsicurl/... paths: credentials and endpoint come from the GDAL/AWS environment
        return rasterio.open(gdal_path(p))
    except RasterioIOError as exc:
        if "://" not in p and not os.path.exists(p):
            raise InputError(f"{p}: no such file; check the path (globs must match at least one file)") from None
        raise InputError(f"{p}: cannot be read as a raster ({exc}); give a GeoTIFF or another GDAL raster") from None


def inspect_scene(path: str | os.PathLike[str]) -> SceneInfo:
    """Describe a scene from its header (no pixel reads).

    Raises:
        InputError: the file cannot be opened as a raster.
    """
    with gdal_env(), open_scene(path) as ds:
        if ds.transform.is_identity and ds.gcps[0]:
            raise InputError(f"{os.fspath(path)}: is georeferenced by ground control points only, so no output "
                             "grid can match it; warp it onto a grid first (gdalwarp -r bilinear SRC DST) and "
                             "use that")
        _check_geographic_bounds(os.fspath(path), ds)
        mask, alpha = _mask_kind(ds)
        tags = ds.tags()
        return SceneInfo(
            path=os.fspath(path), width=ds.width, height=ds.height, count=ds.count, dtype=ds.dtypes[0],
            crs=ds.crs, transform=ds.transform, nodata=ds.nodata, mask=mask, alpha_band=alpha,
            block_shapes=tuple(tuple(b) for b in ds.block_shapes), driver=ds.driver,
            bounds=tuple(ds.bounds), descriptions=tuple(ds.descriptions), pixel_size_m=_pixel_size_m(ds),
            compression=ds.compression.value if ds.compression else None,
            overviews=tuple(ds.overviews(1)) if ds.count else (),
            acquired=tags.get("TIFFTAG_DATETIME") or None, source_item=tags.get(SOURCE_ITEM_TAG) or None,
            source_datetime=tags.get(SOURCE_DATETIME_TAG) or None,
        )


def inspect_class_map(path: str | os.PathLike[str]) -> SceneInfo:
    """:func:`inspect_scene` of a class raster, after checking it is one band of integer class ids.

    Raises:
        InputError: unreadable, several bands, or not integers.
    """
    info = inspect_scene(path)
    if info.count != 1:
        raise InputError(f"{os.fspath(path)}: has {info.count} bands; a class map has one band of class ids "
                         "(give the class map that geoseg predict writes)")
    if np.dtype(info.dtype).kind not in "iu":
        raise InputError(f"{os.fspath(path)}: band 1 is {info.dtype}; a class map holds integer class ids "
                         "(convert it, e.g. gdal_translate -ot Byte, or give geoseg predict's class map)")
    return info


def band_validity(data: np.ndarray, ds: rasterio.DatasetReader, indexes: Sequence[int], window: Window,
                  kind: str) -> np.ndarray:
    """Per-band validity ``(bands, rows, cols)`` of ``data`` read from ``window`` of ``ds``.

    A value is valid when the raster's mask (nodata value, alpha band or internal mask) says so and it is
    finite.
    """
    valid = np.isfinite(data) if data.dtype.kind == "f" else np.ones(data.shape, dtype=bool)
    if kind == "nodata" and ds.nodata is not None:
        nd = ds.nodata
        if isinstance(nd, float) and math.isnan(nd):
            pass  # already excluded as non-finite
        else:
            valid &= data != np.asarray(nd).astype(data.dtype)
    elif kind in ("alpha", "internal"):
        m = ds.read_masks(indexes[0], window=window) > 0
        valid &= m[None]
    return valid


def _overlap(a: Window, b: Window) -> int:
    """Pixels two windows share."""
    rows = min(a.row_off + a.height, b.row_off + b.height) - max(a.row_off, b.row_off)
    cols = min(a.col_off + a.width, b.col_off + b.width) - max(a.col_off, b.col_off)
    return int(max(0, rows) * max(0, cols))


class _Blocks:
    """The internal blocks of one band of a GeoTIFF, for two questions a chip read asks.

    ``absent``: which blocks a sparse GeoTIFF leaves out (GDAL's ``SPARSE_OK``: a block never written holds
    no data). They read as nodata: no pixel of them is read or sent to the model, so a scene declared
    100k x 100k with a few written blocks costs what its blocks cost. ``damaged``: after a failed read, the
    first block of the window GDAL cannot decode, so the error names it.
    """

    def __init__(self, ds: rasterio.DatasetReader, band: int):
        self.ds, self.band = ds, band
        self.rows, self.cols = ds.block_shapes[band - 1]
        # strips of a few rows would mean hundreds of lookups per chip; only tiled (or tall-strip) TIFFs
        self.on = ds.driver in ("GTiff", "COG") and self.rows >= 16

    def _grid(self, window: Window) -> list[tuple[int, int, Window]]:
        r0, c0 = int(window.row_off), int(window.col_off)
        r1, c1 = r0 + int(window.height), c0 + int(window.width)
        out = []
        for i in range(r0 // self.rows, (max(r1, r0 + 1) - 1) // self.rows + 1):
            for j in range(c0 // self.cols, (max(c1, c0 + 1) - 1) // self.cols + 1):
                out.append((i, j, Window(j * self.cols, i * self.rows, self.cols, self.rows)))
        return out

    def absent(self, window: Window) -> list[Window]:
        """The blocks of ``window`` the file does not hold (empty unless the GeoTIFF is sparse)."""
        if not self.on:
            return []
        out = []
        for i, j, w in self._grid(window):
            try:
                self.ds.block_size(self.band, i, j)
            except RasterBlockError:
                out.append(w)
        return out

    def damaged(self, window: Window) -> Window | None:
        for _, _, w in self._grid(window):
            w = w.intersection(Window(0, 0, self.ds.width, self.ds.height))
            try:
                self.ds.read(self.band, window=w)
            except RasterioIOError:
                return w
        return None


class SceneReader:
    """Thread-safe chip reader: one GDAL handle per thread (GDAL handles are not thread-safe).

    ``read(window)`` returns the bands the model takes as float32, normalised with ``mean`` and ``std``,
    with invalid values set to 0 (the band mean), plus the 2-D validity mask. A pixel is valid when at
    least one of its bands is valid (GDAL's dataset-mask rule), so a legitimate 0 in one band of a scene
    with nodata 0 is not a hole. Blocks a sparse GeoTIFF leaves out are nodata (see :class:`_Blocks`).
    """

    def __init__(self, path: str, indexes: Sequence[int], mean: Sequence[float], std: Sequence[float]):
        self.path = path
        self.indexes = list(indexes)
        self._mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        self._inv_std = (1.0 / np.asarray(std, dtype=np.float32))[:, None, None]
        self._local = threading.local()
        self._handles: list[rasterio.DatasetReader] = []
        self._lock = threading.Lock()
        self._handle()  # open once here, so a bad path fails in the caller's thread

    def _handle(self) -> rasterio.DatasetReader:
        """This thread's GDAL handle, opened on first use."""
        ds = getattr(self._local, "ds", None)
        if ds is None:
            ds = open_scene(self.path)
            self._local.ds = ds
            self._local.kind = _mask_kind(ds)[0]
            # a pixel-interleaved file stores all bands in one set of blocks: look them up once per chip
            shared = ds.interleaving is not None and ds.interleaving.name == "pixel"
            self._local.blocks = [_Blocks(ds, self.unique_indexes[0])] if shared else \
                [_Blocks(ds, i) for i in self.unique_indexes]
            with self._lock:
                self._handles.append(ds)
        return ds

    @property
    def unique_indexes(self) -> list[int]:
        return sorted(set(self.indexes))

    def _read_raw(self, ds: rasterio.DatasetReader, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """The bands of ``window`` with their validity, blocks left out of a sparse file masked."""
        uniq = self.unique_indexes
        r0, c0 = int(window.row_off), int(window.col_off)
        holes = [b.absent(window) for b in self._local.blocks]
        if len(holes) == 1:
            holes *= len(uniq)
        area = int(window.height) * int(window.width)
        if area and all(sum(_overlap(w, window) for w in h) == area for h in holes):
            # absent blocks cover the whole window in every band: nothing to read
            shape = (len(uniq), int(window.height), int(window.width))
            return np.zeros(shape, dtype=ds.dtypes[uniq[0] - 1]), np.zeros(shape, dtype=bool)
        try:
            raw = ds.read(uniq, window=window)
        except RasterioIOError as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            bad = next((w for b in self._local.blocks if (w := b.damaged(window)) is not None), window)
            br, bc = int(bad.row_off), int(bad.col_off)
            raise InputError(f"{self.path}: cannot read the block at rows {br}-{br + int(bad.height)}, columns "
                             f"{bc}-{bc + int(bad.width)} ({detail}); the file is damaged or truncated: "
                             "download or export it again") from None
        bvalid = band_validity(raw, ds, uniq, window, self._local.kind)
        for k, h in enumerate(holes):
            for w in h:
                y0, x0 = max(0, int(w.row_off) - r0), max(0, int(w.col_off) - c0)
                bvalid[k, y0:max(0, int(w.row_off + w.height) - r0), x0:max(0, int(w.col_off + w.width) - c0)] = False
        return raw, bvalid

    def read(self, window: Window, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Read ``window`` (clipped to the scene), padded by reflection to ``size`` (rows, cols).

        Returns:
            ``(data, valid)``: float32 ``(bands, rows, cols)`` normalised input and bool ``(rows, cols)``.
        """
        raw, bvalid = self._read_raw(self._handle(), window)
        uniq = self.unique_indexes
        pos = [uniq.index(i) for i in self.indexes]
        raw, bvalid = raw[pos], bvalid[pos]
        data = raw.astype(np.float32, copy=False)
        # the same scene band may feed several inputs, so normalise a fresh array
        data = (data - self._mean) * self._inv_std
        data[~bvalid] = 0.0
        valid: np.ndarray = np.asarray(bvalid.any(axis=0))
        if size is not None and (data.shape[1], data.shape[2]) != size:
            ph, pw = size[0] - data.shape[1], size[1] - data.shape[2]
            data = np.pad(data, ((0, 0), (0, ph), (0, pw)), mode="symmetric")
            valid = np.pad(valid, ((0, ph), (0, pw)), mode="constant", constant_values=False)
        return np.ascontiguousarray(data, dtype=np.float32), valid

    def close(self) -> None:
        with self._lock:
            for ds in self._handles:
                ds.close()
            self._handles.clear()


# ---------------------------------------------------------------------------------------------- outputs


def check_writable(path: str | os.PathLike[str], overwrite: bool, elsewhere: str = "another --output-dir") -> None:
    """Refuse an existing output (a local path or a URL) unless ``overwrite``; the error names the
    command's own way to write ``elsewhere``."""
    if overwrite:
        return
    from geoseg.io.store import parent_and_name

    store, name = parent_and_name(path)
    if store.exists(name):
        raise OutputExistsError(f"{path}: already exists; pass --overwrite to replace it or choose {elsewhere}")
