"""Labels on an image's pixel grid: class ids mapped to training indexes (:class:`ClassMap`), and label
sources read window by window: rasters (reprojected onto the image grid when theirs differs) and vector
files (reprojected and rasterised per window). :func:`open_labels` picks one by the file suffix.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import rasterio
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from geoseg.errors import InputError
from geoseg.io.raster import SceneInfo, _mask_kind, gdal_env, open_scene
from geoseg.predict.tiling import clip_to_scene

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Target value of pixels that do not count in the loss or the metrics (torch's default ignore index)."""
UNLABELLED = -1
"""Value of unlabelled pixels in label windows (before mapping class ids to training indexes)."""
VECTOR_SUFFIXES = (".gpkg", ".shp", ".geojson", ".json", ".fgb", ".gml", ".kml", ".sqlite", ".parquet")


# ---------------------------------------------------------------------------------------------- classes


class ClassMap:
    """Maps label class ids to contiguous training indexes (the logit channel order).

    Args:
        ids: class ids in logit order; ``ids[i]`` is predicted by channel ``i``.
    """

    def __init__(self, ids: Sequence[int]):
        self.ids = list(ids)
        self._lut = np.full(max(self.ids) + 2, IGNORE_INDEX, dtype=np.int64)
        for i, cid in enumerate(self.ids):
            self._lut[cid] = i

    def __len__(self) -> int:
        return len(self.ids)

    def to_index(self, labels: np.ndarray) -> np.ndarray:
        """Class ids ``(rows, cols)`` (``UNLABELLED`` allowed) -> int64 training indexes, others -> ignore."""
        lab = labels.astype(np.int64, copy=False)
        inside = (lab >= 0) & (lab < len(self._lut))
        out = np.full(lab.shape, IGNORE_INDEX, dtype=np.int64)
        out[inside] = self._lut[lab[inside]]
        return out


# ---------------------------------------------------------------------------------------------- labels


class LabelSource(Protocol):
    """Labels on an image's pixel grid, read by window."""

    path: str

    def read(self, window: Window) -> np.ndarray:
        """Class ids int32 ``(window.height, window.width)``; :data:`UNLABELLED` where there is no label
        (also outside the scene)."""
        ...


def _pad_to(arr: np.ndarray, window: Window, clipped: Window, fill: int) -> np.ndarray:
    out = np.full((int(window.height), int(window.width)), fill, dtype=arr.dtype)
    r0 = int(clipped.row_off - window.row_off)
    c0 = int(clipped.col_off - window.col_off)
    out[r0:r0 + arr.shape[0], c0:c0 + arr.shape[1]] = arr
    return out


class RasterLabels:
    """A label raster of class ids. Read directly when it shares the image grid, else warped onto it."""

    def __init__(self, path: str, image: SceneInfo, nodata: int | None = None):
        self.path = path
        self.image = image
        self._nodata_override = nodata
        self._ds: Any = None
        self._vrt: Any = None
        self._pid = -1
        with gdal_env(), open_scene(path) as ds:
            self.same_grid = self._same_grid(ds, image)
            self.nodata = nodata if nodata is not None else ds.nodata
            if ds.dtypes[0].startswith("float"):
                log.warning("%s: float label raster; values are truncated to integer class ids", path)

    @staticmethod
    def _same_grid(ds: rasterio.DatasetReader, image: SceneInfo) -> bool:
        if (ds.width, ds.height) != (image.width, image.height):
            if ds.crs is None:
                raise InputError(f"{ds.name}: label raster has no CRS and a different size "
                                 f"({ds.width}x{ds.height}) from its image {image.path} "
                                 f"({image.width}x{image.height}); georeference it or resample it onto the image grid")
            return False
        if ds.crs is None:
            log.warning("%s: label raster has no CRS; assuming it shares the grid of %s", ds.name, image.path)
            return True
        if image.crs is None:
            return True
        return bool(ds.crs == image.crs and ds.transform.almost_equals(image.transform))

    def _dataset(self) -> Any:
        if self._pid != os.getpid():  # one handle per process (DataLoader workers fork)
            self._ds = open_scene(self.path)
            self._vrt = None
            if not self.same_grid:
                from rasterio.enums import Resampling
                from rasterio.vrt import WarpedVRT

                self._vrt = WarpedVRT(self._ds, crs=self.image.crs, transform=self.image.transform,
                                      width=self.image.width, height=self.image.height,
                                      resampling=Resampling.nearest, src_nodata=self.nodata, nodata=self.nodata)
            self._pid = os.getpid()
        return self._vrt if self._vrt is not None else self._ds

    def read(self, window: Window) -> np.ndarray:
        clipped = clip_to_scene(window, self.image.width, self.image.height)
        ds = self._dataset()
        raw = ds.read(1, window=clipped)
        lab = raw.astype(np.int64)
        bad = np.zeros(lab.shape, dtype=bool)
        if self.nodata is not None and not (isinstance(self.nodata, float) and math.isnan(self.nodata)):
            bad |= raw == np.asarray(self.nodata).astype(raw.dtype)
        if raw.dtype.kind == "f":
            bad |= ~np.isfinite(raw)
        if self._vrt is None and self.same_grid:
            kind = _mask_kind(ds)[0]
            if kind in ("alpha", "internal"):
                bad |= ds.read_masks(1, window=clipped) == 0
        lab[bad | (lab < 0)] = UNLABELLED
        out = lab.astype(np.int32)
        if (clipped.width, clipped.height) != (window.width, window.height):
            out = _pad_to(out, window, clipped, UNLABELLED)
        return out


class VectorLabels:
    """Label polygons, reprojected to the image CRS and rasterised onto its grid one window at a time.

    Args:
        path: a vector file GDAL can read.
        image: the image the labels belong to.
        column: attribute with class ids (integers) or class names; None: every polygon gets ``value``.
        value: class id of every polygon when there is no column.
        background: class id of pixels outside every polygon; None leaves them unlabelled.
        names: class name -> id, for a column of names.
    """

    def __init__(self, path: str, image: SceneInfo, *, column: str | None, value: int | None,
                 background: int | None, names: dict[str, int] | None = None):
        import geopandas as gpd

        self.path = path
        self.image = image
        self.background = UNLABELLED if background is None else int(background)
        try:
            gdf = gpd.read_file(path)
        except Exception as exc:  # pyogrio raises several types
            raise InputError(f"{path}: cannot be read as vector labels ({exc}); give a GPKG, SHP or GeoJSON") from None
        if column is None and value is None:
            raise InputError(f"{path}: vector labels need label_column (class ids or names) or label_value "
                             "(one class id for every polygon)")
        if column is not None and column not in gdf.columns:
            cols = [c for c in gdf.columns if c != gdf.geometry.name]
            raise InputError(f"{path}: no column {column!r}; columns are: {', '.join(cols)}")
        if gdf.crs is None:
            log.warning("%s: labels have no CRS; assuming the CRS of %s", path, image.path)
        elif image.crs is not None and gdf.crs != image.crs:
            gdf = gdf.to_crs(image.crs)
        gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
        if column is None:
            values = np.full(len(gdf), int(value or 0), dtype=np.int64)
        else:
            values = self._column_values(gdf[column], names or {}, path, column)
        keep = values >= 0
        self.geometries = np.asarray(gdf.geometry.values)[keep]
        self.values = values[keep]
        from shapely import STRtree

        self._tree = STRtree(self.geometries)
        log.info("%s: %d label polygon(s)", path, len(self.geometries))

    @staticmethod
    def _column_values(col: Any, names: dict[str, int], path: str, column: str) -> np.ndarray:
        import pandas as pd

        if pd.api.types.is_numeric_dtype(col):
            vals = col.to_numpy(dtype=float, na_value=np.nan)
            return np.where(np.isfinite(vals), vals, UNLABELLED).astype(np.int64)
        out = []
        unknown: set[str] = set()
        for v in col:
            if v is None or (isinstance(v, float) and math.isnan(v)):
                out.append(UNLABELLED)
            elif str(v) in names:
                out.append(names[str(v)])
            elif str(v).lstrip("-").isdigit():
                out.append(int(str(v)))
            else:
                unknown.add(str(v))
                out.append(UNLABELLED)
        if unknown:
            log.warning("%s: column %r has values that are no class name (left unlabelled): %s",
                        path, column, ", ".join(sorted(unknown)[:10]))
        return np.asarray(out, dtype=np.int64)

    def read(self, window: Window) -> np.ndarray:
        from rasterio.features import rasterize
        from shapely.geometry import box

        h, w = int(window.height), int(window.width)
        tf = window_transform(window, self.image.transform)
        x0, y0 = tf * (0, 0)
        x1, y1 = tf * (w, h)
        hits = self._tree.query(box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
        if len(hits) == 0:
            out = np.full((h, w), self.background, dtype=np.int32)
        else:
            # burn in file order so that a later polygon wins where polygons overlap
            hits = np.sort(hits)
            shapes = zip(self.geometries[hits], self.values[hits].tolist(), strict=True)
            out = rasterize(shapes, out_shape=(h, w), transform=tf, fill=self.background, dtype="int32")
        clipped = clip_to_scene(window, self.image.width, self.image.height)
        if (clipped.width, clipped.height) != (w, h):
            inner = np.full((h, w), UNLABELLED, dtype=np.int32)
            r0, c0 = int(clipped.row_off - window.row_off), int(clipped.col_off - window.col_off)
            rs = slice(r0, r0 + int(clipped.height))
            cs = slice(c0, c0 + int(clipped.width))
            inner[rs, cs] = out[rs, cs]
            out = inner
        return out


def is_vector(path: str) -> bool:
    return Path(path).suffix.lower() in VECTOR_SUFFIXES


def open_labels(path: str, image: SceneInfo, *, column: str | None = None, value: int | None = None,
                background: int | None = None, names: dict[str, int] | None = None,
                nodata: int | None = None) -> LabelSource:
    """Open labels (raster or vector, chosen by the file suffix) on the pixel grid of ``image``.

    Raises:
        InputError: the file cannot be read, or a vector file gives no way to find class ids.
    """
    if not Path(path).exists() and "://" not in path:
        raise InputError(f"{path}: no such label file; check the path in the config")
    if is_vector(path):
        return VectorLabels(path, image, column=column, value=value, background=background, names=names)
    return RasterLabels(path, image, nodata=nodata)


__all__ = ["IGNORE_INDEX", "UNLABELLED", "ClassMap", "LabelSource", "RasterLabels", "TrainScene", "VectorLabels", "is_vector",
           "open_labels"]


@dataclass
class TrainScene:
    """One image with its labels and the scene band numbers that feed the model."""

    index: int
    info: SceneInfo
    labels: LabelSource
    bands: list[int]
    split: str = "auto"

    @property
    def path(self) -> str:
        return self.info.path
