"""geoseg: land-cover segmentation of large GeoTIFFs with deep networks.

The public API is imported lazily, so ``import geoseg`` stays fast and does not pull in torch::

    import geoseg
    model = geoseg.load_model("demo/model")
    result = geoseg.predict_scene("scene.tif", model, "out/")
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "geoseg.model.weights",
    "read_bundle": "geoseg.model.bundle",
    "save_bundle": "geoseg.model.bundle",
    "Contract": "geoseg.model.contract",
    "predict_scene": "geoseg.predict.api",
    "predict_scenes": "geoseg.predict.api",
    "PredictOptions": "geoseg.predict.api",
    "inspect_scene": "geoseg.io.raster",
    "GeoSegError": "geoseg.errors",
    "vectorize_raster": "geoseg.gis.vectorize",
    "polygonize": "geoseg.gis.vectorize",
    "sieve_raster": "geoseg.gis.sieve",
    "train": "geoseg.learn.train",
    "load_config": "geoseg.learn.config",
    "evaluate": "geoseg.learn.evaluate",
    "export": "geoseg.model.export",
}

__all__ = ["__version__", *_LAZY]


def lazy_attributes(module: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports each of ``names`` (name -> defining module) on first use.

    The package and its rooms re-export their public names this way, so that importing them stays fast and
    imports no torch until a name that needs it is used.
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__


__getattr__ = lazy_attributes(__name__, _LAZY)
