"""Learning: training configs, training data from rasters and polygons, splits, augmentation, losses,
optimisers, the training loop and its outputs, self-supervised pretraining, evaluation and metrics, and
the offline demo.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "train": "geoseg.learn.train",
    "load_config": "geoseg.learn.config",
    "evaluate": "geoseg.learn.evaluate",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    # lazy, so that importing the room does not import torch
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'geoseg.learn' has no attribute {name!r}")
