"""Learning: training configs, training data from rasters and polygons, splits, augmentation, losses,
optimisers, the training loop and its outputs, self-supervised pretraining, evaluation and metrics, and
the offline demo.
"""

from __future__ import annotations

from geoseg import lazy_attributes

_LAZY = {
    "train": "geoseg.learn.train",
    "load_config": "geoseg.learn.config",
    "evaluate": "geoseg.learn.evaluate",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
