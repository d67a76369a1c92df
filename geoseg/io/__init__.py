"""Reading and writing: scenes and their windows, local folders and object storage (s3://, https://),
atomic publishing, VRTs, ground geometry of a grid, how many readers run at once and giving freed memory back.

The bottom room: it imports nothing else of geoseg but :mod:`geoseg.errors`.
"""

from __future__ import annotations

from geoseg import lazy_attributes

_LAZY = {
    "inspect_scene": "geoseg.io.raster",
    "open_scene": "geoseg.io.raster",
    "SceneInfo": "geoseg.io.raster",
    "Store": "geoseg.io.store",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
