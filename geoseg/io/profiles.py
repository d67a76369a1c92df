"""What each output file is: its dtype, nodata, band tags and descriptions (class maps, probabilities,
confidence), the QGIS styles beside them, and the COG options they are written with; named profiles, as
rio-cogeo keeps them, so every writer of an output asks here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import quoteattr

from geoseg.errors import InputError
from geoseg.io.raster import BLOCK

COMPRESSIONS = ("deflate", "zstd", "lzw")


@dataclass
class OutputSpec:
    """A named output profile: what to write and how the COG is built."""

    dtype: str
    count: int
    nodata: float | None
    resampling: str  # COG overview resampling: "MODE" for classes, "AVERAGE" for probabilities
    descriptions: list[str] = field(default_factory=list)
    colormap: dict[int, tuple[int, int, int, int]] | None = None
    tags: dict[str, str] = field(default_factory=dict)
    scales: list[float] | None = None
    nbits: int | None = None
    predictor: int | None = None


def class_dtype(class_ids: Sequence[int]) -> tuple[str, int]:
    """The smallest dtype for ``class_ids`` and its nodata value (the dtype's maximum)."""
    if max(class_ids) < 255:
        return "uint8", 255
    return "uint16", 65535


def classes_spec(classes: Sequence[Any], extra_tags: dict[str, str] | None = None) -> OutputSpec:
    """Output profile of a class map: one band of ids with a colour table and class names."""
    ids = [c.id for c in classes]
    dtype, nodata = class_dtype(ids)
    tags = {f"CLASS_{c.id}": c.name for c in classes}
    tags["CLASSES"] = json.dumps([{"id": c.id, "name": c.name, "color": list(c.color)} for c in classes])
    tags.update(extra_tags or {})
    cmap = {c.id: (*c.color, 255) for c in classes}
    return OutputSpec(dtype, 1, nodata, "MODE", ["class"], cmap, tags)


def probabilities_spec(classes: Sequence[Any], dtype: str, extra_tags: dict[str, str] | None = None) -> OutputSpec:
    """Output profile of per-class probabilities: uint8 (value / 254, nodata 255), float16 or float32 (NaN)."""
    names = [c.name for c in classes]
    tags = {"CLASSES": json.dumps([{"id": c.id, "name": c.name} for c in classes]), **(extra_tags or {})}
    if dtype == "uint8":
        tags["SCALE"] = "probability = value / 254"
        return OutputSpec("uint8", len(names), 255, "AVERAGE", names, None, tags,
                          scales=[1 / 254] * len(names), predictor=2)
    if dtype in ("float16", "float32"):
        return OutputSpec("float32", len(names), float("nan"), "AVERAGE", names, None, tags,
                          nbits=16 if dtype == "float16" else None, predictor=3)
    raise InputError(f"probabilities dtype must be uint8, float16 or float32, got {dtype!r}")


def confidence_spec(extra_tags: dict[str, str] | None = None) -> OutputSpec:
    """Output profile of the confidence map: the blended top-class probability as uint8 ``round(p * 254)``,
    nodata 255, one grey band (its colour ramp is the QGIS style of :func:`confidence_qml`)."""
    tags = {"SCALE": "confidence = value / 254 (the blended probability of the mapped class)", **(extra_tags or {})}
    return OutputSpec("uint8", 1, 255, "AVERAGE", ["confidence"], None, tags, predictor=2)


# the confidence ramp: value (round(p * 254)) -> colour, red where the model is unsure, green where it is sure
CONFIDENCE_RAMP = ((0, "#d7191c", "0 %"), (127, "#fdae61", "50 %"), (191, "#ffffbf", "75 %"),
                   (229, "#a6d96a", "90 %"), (254, "#1a9641", "100 %"))


def confidence_qml() -> str:
    """A QGIS layer style for the confidence map (singleband pseudocolor over 0..254, labels in per cent),
    loaded by QGIS from ``<stem>.confidence.qml``; nodata (255) stays transparent."""
    items = "\n".join(f'          <item value="{v}" color="{c}" alpha="255" label="{label}"/>'
                      for v, c, label in CONFIDENCE_RAMP)
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.28.0" styleCategories="AllStyleCategories">\n'
        "  <pipe>\n"
        '    <rasterrenderer type="singlebandpseudocolor" band="1" opacity="1" alphaBand="-1" '
        'classificationMin="0" classificationMax="254" nodataColor="">\n'
        "      <rasterTransparency/>\n"
        "      <minMaxOrigin>\n"
        "        <limits>None</limits>\n"
        "        <extent>WholeRaster</extent>\n"
        "        <statAccuracy>Estimated</statAccuracy>\n"
        "        <cumulativeCutLower>0.02</cumulativeCutLower>\n"
        "        <cumulativeCutUpper>0.98</cumulativeCutUpper>\n"
        "        <stdDevFactor>2</stdDevFactor>\n"
        "      </minMaxOrigin>\n"
        "      <rastershader>\n"
        '        <colorrampshader colorRampType="INTERPOLATED" classificationMode="1" clip="0" '
        'minimumValue="0" maximumValue="254" labelPrecision="0">\n'
        f"{items}\n"
        "        </colorrampshader>\n"
        "      </rastershader>\n"
        "    </rasterrenderer>\n"
        "  </pipe>\n"
        "</qgis>\n"
    )


def qml_style(classes: Sequence[Any]) -> str:
    """A QGIS layer style (paletted renderer with a legend), loaded by QGIS from ``<name>.qml``."""
    entries = "\n".join(
        f'        <paletteEntry value="{c.id}" color="#{c.color[0]:02x}{c.color[1]:02x}{c.color[2]:02x}" '
        f"alpha=\"255\" label={quoteattr(c.name)}/>"
        for c in classes
    )
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.28.0" styleCategories="AllStyleCategories">\n'
        "  <pipe>\n"
        '    <rasterrenderer type="paletted" band="1" opacity="1" alphaBand="-1" nodataColor="">\n'
        "      <rasterTransparency/>\n"
        "      <colorPalette>\n"
        f"{entries}\n"
        "      </colorPalette>\n"
        "    </rasterrenderer>\n"
        "  </pipe>\n"
        "</qgis>\n"
    )


def check_compress(compress: str) -> str:
    """The one check of ``--compress``."""
    if compress not in COMPRESSIONS:
        raise InputError(f"--compress {compress}: valid values are {', '.join(COMPRESSIONS)}")
    return compress


def cog_options(spec: OutputSpec, compress: str) -> dict[str, Any]:
    """Creation options of GDAL's COG driver for an output of ``spec`` (``rasterio.shutil.copy`` keywords)."""
    check_compress(compress)
    opts: dict[str, Any] = dict(
        driver="COG", COMPRESS=compress.upper(), BLOCKSIZE=BLOCK, BIGTIFF="IF_SAFER",
        OVERVIEW_RESAMPLING=spec.resampling, NUM_THREADS="ALL_CPUS",
    )
    if spec.predictor:
        opts["PREDICTOR"] = spec.predictor
    if spec.nbits:
        opts["NBITS"] = spec.nbits
    return opts
