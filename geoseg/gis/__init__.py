"""What a GIS reads: class maps cleaned to a minimum mapping unit (:mod:`.sieve`), their polygons
(:mod:`.vectorize`), quicklooks, STAC items of the outputs and mosaics of many maps. Needs no model.
"""

from __future__ import annotations

from geoseg import lazy_attributes

_LAZY = {
    "vectorize_raster": "geoseg.gis.vectorize",
    "polygonize": "geoseg.gis.vectorize",
    "sieve_raster": "geoseg.gis.sieve",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
