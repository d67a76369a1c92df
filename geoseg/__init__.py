"""geoseg: land-cover segmentation of large GeoTIFFs with deep networks.

The public API is imported lazily, so ``import geoseg`` stays fast and does not pull in torch::

    import geoseg
    model = geoseg.load_model("demo/model")
    result = geoseg.predict_scene("scene.tif", model, "out/")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "geoseg.bundle",
    "read_bundle": "geoseg.bundle",
    "save_bundle": "geoseg.bundle",
    "Contract": "geoseg.bundle",
    "predict_scene": "geoseg.predict",
    "predict_scenes": "geoseg.predict",
    "PredictOptions": "geoseg.predict",
    "inspect_scene": "geoseg.raster",
    "GeoSegError": "geoseg.errors",
    "vectorize_raster": "geoseg.vectorize",
    "polygonize": "geoseg.vectorize",
    "sieve_raster": "geoseg.gis.sieve",
    "train": "geoseg.train",
    "load_config": "geoseg.config",
    "evaluate": "geoseg.evaluate",
    "export": "geoseg.export",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'geoseg' has no attribute {name!r}")
