"""What a GIS reads: polygons of class maps (:mod:`.vectorize`), quicklooks, STAC items of the outputs and
mosaics of many maps. Needs no model.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "vectorize_raster": "geoseg.gis.vectorize",
    "polygonize": "geoseg.gis.vectorize",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    # lazy, so that importing the room does not import torch
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'geoseg.gis' has no attribute {name!r}")
