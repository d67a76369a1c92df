"""Vectorise a class raster into polygons, block by block, without seams, in bounded memory.

The last step of the pipeline (read -> chips -> model -> blend -> write -> **vectorise**). The raster is cut
into square blocks of ``block_size`` pixels that are polygonised in parallel, in worker processes (threads
for small rasters: :mod:`.pool`). Inside a block, GDAL (``rasterio.features.shapes``, 4- or
8-neighbourhood) turns every connected region of one class into one polygon *piece*, in global pixel
coordinates (integers, so merging is exact); which piece each pixel along the block's border belongs to is
read off the pieces' own border edges.

Seams: a piece that touches an internal block edge is *open*; all others are *closed* and final, and are
measured and written at once. When a block arrives, the pixels on both sides of each of its seams with
already processed neighbours are compared: two open pieces of the same class join when their pixels are
4-neighbours across the seam (with 8-connectivity also diagonal neighbours, including across block corners).
Joined pieces are grouped by union-find; a group is final once no member can reach a block not yet seen
(blocks arrive row by row, so after each row of blocks every group that does not touch the next row is
complete) and is merged by a rectilinear ring stitch (:func:`.stitch.stitch`: shared seam edges cancel,
the rest is relinked into rings; no GEOS overlay). The result is the same set of polygons as one whole-raster ``shapes``
call: same count, same area per class, geometrically equal, and with 4-connectivity the very same vertices.

Memory is bounded by the worker processes (~130 MB each, most of it their interpreter), a few blocks in
flight (``2 * workers``), the open pieces along the current row of blocks, and one batch of features being
written; never by the raster. Requesting ``simplify`` is the one exception: the coverage's shared edges are
simplified together (Douglas-Peucker on arcs between nodes, :mod:`.simplify`), so the polygons (not the
raster) are then held in memory.

Coordinates: the output stays in the raster's CRS unless ``to_crs`` asks otherwise; GeoJSON is always
written in EPSG:4326 as RFC 7946 requires (logged). Areas and perimeters are ground metres: planar for
projected CRSs that keep ground areas within 0.1 % (scaled by the CRS's linear unit), geodesic on the CRS's
ellipsoid for geographic ones and for projected ones that do not (Web Mercator; :mod:`geoseg.io.geodesy`).

Layout, one module per step (the public names are re-exported here):

* :mod:`.formats`: the output formats registry (:data:`FORMATS`) and the write constants;
* :mod:`.quantities`: ``min_area`` and ``simplify`` with their units;
* :mod:`.plan`: the raster's facts and the checked options, fixed before the first read;
* :mod:`.blocks`: one block's pieces (GDAL) and the sliding window of blocks in flight;
* :mod:`.pool`: where blocks run: worker processes, or threads for small rasters;
* :mod:`.merge`: union-find over open pieces across seams;
* :mod:`.stitch`: the exact ring stitch of a group of pieces;
* :mod:`.features`: pieces to output features (CRS, area, perimeter, ``min_area``, ``to_crs``) as columns;
* :mod:`.simplify`: ``simplify`` as a distance, shared edges kept shared;
* :mod:`.writers`: Arrow record batches to OGR files and GeoParquet (shared with :mod:`geoseg.gis.mosaic`);
* :mod:`.api`: :func:`vectorize_raster` and :func:`polygonize`.

The tools of :mod:`.api` (and geopandas with them) are imported on first use, so that worker processes,
which import :mod:`.blocks`, stay lean.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from geoseg.gis.quantities import Quantity, parse_min_area, parse_simplify
from geoseg.gis.vectorize.formats import (
    BATCH_FEATURES,
    COLUMNS,
    FORMATS,
    SHAPEFILE_LIMIT_BYTES,
    VectorFormat,
    format_for,
    get_format,
)
from geoseg.gis.vectorize.plan import BLOCK_SIZE

if TYPE_CHECKING:
    from geoseg.gis.vectorize.api import Progress, VectorizeResult, polygonize, vectorize_raster

_LAZY = {"Progress", "VectorizeResult", "polygonize", "vectorize_raster"}  # in geoseg.gis.vectorize.api

__all__ = [
    "BATCH_FEATURES",
    "BLOCK_SIZE",
    "COLUMNS",
    "FORMATS",
    "SHAPEFILE_LIMIT_BYTES",
    "Progress",
    "Quantity",
    "VectorFormat",
    "VectorizeResult",
    "format_for",
    "get_format",
    "parse_min_area",
    "parse_simplify",
    "polygonize",
    "vectorize_raster",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("geoseg.gis.vectorize.api"), name)
    raise AttributeError(f"module 'geoseg.gis.vectorize' has no attribute {name!r}")
