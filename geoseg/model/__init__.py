"""The model: its contract (bands, normalisation, classes, chip), the network registry, the weight
formats, loading and saving bundles, ONNX Runtime sessions without torch (:mod:`.onnxrt`), int8 quantisation
(:mod:`.quantize`), export (ONNX, TorchScript) and STAC MLM metadata.

:mod:`.contract` is plain data that imports neither torch nor the network code.
"""

from __future__ import annotations

from geoseg import lazy_attributes

_LAZY = {
    "Contract": "geoseg.model.contract",
    "load_model": "geoseg.model.weights",
    "read_bundle": "geoseg.model.bundle",
    "save_bundle": "geoseg.model.bundle",
    "export": "geoseg.model.export",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
