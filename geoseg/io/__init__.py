"""Reading and writing: scenes and their windows, local folders and object storage (s3://, https://),
atomic publishing, VRTs, ground geometry of a grid and how many readers run at once.

The bottom room: it imports nothing else of geoseg but :mod:`geoseg.errors`.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "inspect_scene": "geoseg.io.raster",
    "open_scene": "geoseg.io.raster",
    "SceneInfo": "geoseg.io.raster",
    "Store": "geoseg.io.store",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    # lazy, so that importing the room does not import torch
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'geoseg.io' has no attribute {name!r}")
