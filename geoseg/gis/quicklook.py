"""What a finished class map says at a glance: its pixel count per class, and a picture of it.

:func:`class_counts` reads the class map once, block by block (bounded memory), for the exact pixel count
of every class (the raster attribute table and the legend's shares use them). :func:`write_quicklook`
renders ``<stem>.quicklook.png`` from the map's overviews (a decimated read: GDAL serves it from the
overview level closest to the picture's size, never from the full raster): the classes in their colours,
nodata transparent, a legend of class names with the share of the mapped area of each, and a scale bar.
With a confidence map (``geoseg predict --confidence``) the picture has a second panel beside the first: the
confidence on the same ramp as its QGIS style (red unsure, green sure), so that a reviewer sees at once which
mapped areas to check, next to what was mapped there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

QUICKLOOK_SIDE = 1024  # the picture's longer side in map pixels, at most


def class_counts(path: str | Path, ids: Sequence[int]) -> dict[int, int]:
    """Pixels of each class id in a class map (nodata and ids outside ``ids`` are not counted)."""
    import rasterio

    from geoseg.io.raster import gdal_env

    counts = np.zeros(max(list(ids) + [0]) + 1, dtype=np.int64)
    with gdal_env(), rasterio.open(path) as ds:
        nodata = ds.nodata
        for _, window in ds.block_windows(1):
            a = ds.read(1, window=window).ravel()
            if nodata is not None:
                a = a[a != nodata]
            a = a[a < len(counts)]
            counts += np.bincount(a.astype(np.int64), minlength=len(counts))
    return {i: int(counts[i]) for i in ids}


def _nice_length(target_m: float) -> float:
    """1, 2 or 5 times a power of ten, at most ``target_m``."""
    exp = 10 ** math.floor(math.log10(target_m))
    return max(m * exp for m in (1, 2, 5) if m * exp <= target_m)


def _label(metres: float) -> str:
    return f"{metres / 1000:g} km" if metres >= 1000 else f"{metres:g} m"


def _overview(path: str | Path, side: int) -> tuple[np.ndarray, float, Any, float | None]:
    """The class map decimated to at most ``side`` pixels along its longer side: ``(ids, factor, crs,
    nodata)`` where ``factor`` is map pixels per picture pixel."""
    import rasterio
    from rasterio.enums import Resampling

    from geoseg.io.raster import gdal_env

    with gdal_env(), rasterio.open(path) as ds:
        factor = max(1.0, max(ds.width, ds.height) / side)
        shape = (max(1, round(ds.height / factor)), max(1, round(ds.width / factor)))
        data = ds.read(1, out_shape=shape, resampling=Resampling.nearest)
        return data, ds.width / shape[1], ds.crs, ds.nodata


def _confidence_panel(fig: Any, ax: Any, path: str | Path, side: int) -> None:
    """The confidence map on ``ax``: the ramp of its QGIS style, nodata transparent, with a colour bar."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize

    from geoseg.io.profiles import CONFIDENCE_RAMP

    conf, _, _, nodata = _overview(path, side)
    ramp = LinearSegmentedColormap.from_list("confidence", [(v / 254, c) for v, c, _ in CONFIDENCE_RAMP])
    # a 256-entry colour table applied to the uint8 values: no float image of the picture is ever made
    lut = (ramp(np.arange(256) / 254) * 255).round().astype(np.uint8)
    lut[255 if nodata is None else int(nodata)] = 0
    ax.imshow(lut[conf], interpolation="nearest")
    ax.set_axis_off()
    valid = conf[conf != (255 if nodata is None else int(nodata))]
    low = 100 * float(np.mean(valid < 127)) if valid.size else 0.0
    ax.set_title(f"confidence of the mapped class ({low:.1f} % below 50 %)", fontsize=10)
    bar = fig.colorbar(ScalarMappable(Normalize(0, 254), ramp), ax=ax, fraction=0.04, pad=0.02,
                       ticks=[v for v, _, _ in CONFIDENCE_RAMP])
    bar.ax.set_yticklabels([label for _, _, label in CONFIDENCE_RAMP], fontsize=8)


def write_quicklook(classes_path: str | Path, dst: str | Path, classes: Sequence[Any], counts: dict[int, int],
                    pixel_size_m: float | None, title: str | None = None, side: int = QUICKLOOK_SIDE,
                    confidence_path: str | Path | None = None) -> Path:
    """Render the class map at ``classes_path`` to the PNG ``dst`` (see the module's text).

    Args:
        classes: the model's classes (``id``, ``name``, ``color``).
        counts: pixels per class id (:func:`class_counts`), for the legend's shares.
        pixel_size_m: the map's pixel size in metres (None: no scale bar).
        confidence_path: the map's confidence map (uint8, 254 = 1, nodata 255), shown as a second panel.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    data, factor, _crs, nodata = _overview(classes_path, side)
    rgba = np.zeros((*data.shape, 4), dtype=np.uint8)
    for c in classes:
        rgba[data == c.id] = (*c.color, 255)
    if nodata is not None:
        rgba[data == nodata] = 0
    h, w = data.shape
    fig_w = 8.0
    fig_h = max(3.0, fig_w * h / w)
    if confidence_path is None:
        fig, ax = plt.subplots(figsize=(fig_w + 3.2, fig_h), dpi=110)
    else:  # the panels side by side, each as large as the single one, the legend between them
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(2 * fig_w + 4.4, fig_h), dpi=110,
                                      gridspec_kw={"wspace": 0.45})
    try:
        if confidence_path is not None:
            _confidence_panel(fig, ax2, confidence_path, side)
        ax.imshow(rgba, interpolation="nearest")
        ax.set_axis_off()
        if title:
            ax.set_title(title, fontsize=10)
        total = sum(counts.values()) or 1
        handles = [Patch(facecolor=tuple(v / 255 for v in c.color), edgecolor="0.3",
                         label=f"{c.name}  {100 * counts.get(c.id, 0) / total:.1f} %") for c in classes]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9,
                  title="class  share of mapped area", title_fontsize=9)
        if pixel_size_m:
            per_px = pixel_size_m * factor  # metres per picture pixel
            length = _nice_length(w * per_px / 4)
            bar = length / per_px
            x0, y0 = w * 0.04, h * 0.95
            for i in range(2):  # two alternating halves, readable on any colour
                ax.add_patch(Rectangle((x0 + i * bar / 2, y0 - h * 0.012), bar / 2, h * 0.012,
                                       facecolor="black" if i == 0 else "white", edgecolor="black", lw=0.6))
            ax.text(x0 + bar / 2, y0 - h * 0.02, _label(length), ha="center", va="bottom", fontsize=8,
                    bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1})
        out = Path(dst)
        if confidence_path is None:
            fig.tight_layout()
            fig.savefig(out, format="png", transparent=True)
        else:  # a colour bar's axes are not tight_layout's: the picture is cut to what is drawn instead
            fig.savefig(out, format="png", transparent=True, bbox_inches="tight", pad_inches=0.15)
    finally:
        plt.close(fig)
    return out


# GDAL's raster attribute table codes (gdal.h): field types and usages
_GFT = {"int": 0, "real": 1, "str": 2}
_GFU = {"generic": 0, "pixel_count": 1, "name": 2, "min_max": 5, "red": 6, "green": 7, "blue": 8}


def rat_aux_xml(classes: Sequence[Any], counts: dict[int, int], pixel_area_m2: float | None) -> str:
    """A GDAL PAM sidecar (``<map>.tif.aux.xml``) holding the class map's raster attribute table: one row per
    class with its value, name, colour, pixel count and area (m2, when the pixel area is known), so that
    ``gdalinfo``, QGIS and ArcGIS list the classes. GDAL reads it beside the file as part of the dataset."""
    from xml.sax.saxutils import escape

    fields = [("Value", "int", "min_max"), ("Class_Name", "str", "name"), ("Red", "int", "red"),
              ("Green", "int", "green"), ("Blue", "int", "blue"), ("Count", "real", "pixel_count")]
    if pixel_area_m2:
        fields.append(("Area_m2", "real", "generic"))
    lines = ["<PAMDataset>", '  <PAMRasterBand band="1">', '    <GDALRasterAttributeTable tableType="thematic">']
    for i, (name, kind, usage) in enumerate(fields):
        lines.append(f'      <FieldDefn index="{i}"><Name>{name}</Name><Type>{_GFT[kind]}</Type>'
                     f"<Usage>{_GFU[usage]}</Usage></FieldDefn>")
    for row, c in enumerate(classes):
        n = counts.get(c.id, 0)
        values = [str(c.id), escape(c.name), *(str(v) for v in c.color), str(n)]
        if pixel_area_m2:
            values.append(f"{n * pixel_area_m2:.2f}")  # to the cm2: a 6-digit %g drops m2
        lines.append(f'      <Row index="{row}">' + "".join(f"<F>{v}</F>" for v in values) + "</Row>")
    lines += ["    </GDALRasterAttributeTable>", "  </PAMRasterBand>", "</PAMDataset>", ""]
    return "\n".join(lines)


__all__ = ["QUICKLOOK_SIDE", "class_counts", "rat_aux_xml", "write_quicklook"]
