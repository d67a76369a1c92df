"""Prediction of whole scenes: the chip grid (:mod:`.tiling`), blending (:mod:`.blend`), units of work
(:mod:`.units`), the engine that runs one unit (:mod:`.engine`), the model runtime (:mod:`.runtime` chooses:
:mod:`.inference` and :mod:`.backends` for PyTorch, :mod:`.onnx_predictor` for ONNX bundles without torch;
:mod:`.server` feeds either; :mod:`.hardware`), finishing the outputs (:mod:`.finish`), jobs, schedulers, resume
manifests and job files, and the run report. :mod:`.api` is the entry point.
"""

from __future__ import annotations

from geoseg import lazy_attributes

_LAZY = {
    "predict_scene": "geoseg.predict.api",
    "predict_scenes": "geoseg.predict.api",
    "PredictOptions": "geoseg.predict.api",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
