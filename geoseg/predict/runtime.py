"""The runtime seam: which predictor runs a bundle, and how it is loaded, without importing torch for ONNX.

=====================================  ====================================================================
bundle                                 what runs it
=====================================  ====================================================================
ONNX (``geoseg export --format onnx``)  :class:`~geoseg.predict.onnx_predictor.OnnxPredictor`: numpy and
                                       ONNX Runtime only, fp32 or int8; torch, segmentation-models-pytorch
                                       and timm are never imported, from preflight to polygons
safetensors, TorchScript               :class:`~geoseg.predict.inference.Predictor`: PyTorch (``--backend
                                       eager``, or ``onnxruntime`` converted from the first batch)
=====================================  ====================================================================

Everything on the way (:mod:`.api`, :mod:`.engine`, :mod:`.server`, :mod:`.blend`, :mod:`.finish`,
:mod:`.hardware`, :mod:`.report`) imports torch lazily, inside the functions that need it, so an ONNX job
that never calls them never loads it; ``tests/predict/test_torch_free.py`` checks ``sys.modules``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from geoseg.errors import InputError
from geoseg.model.bundle import Bundle, LoadedModel
from geoseg.predict import hardware
from geoseg.predict.hardware import AUTO, DeviceSettings

log = logging.getLogger(__name__)

__all__ = ["load_for_predict", "make_predictor", "resolve_settings", "runs_without_torch"]


def runs_without_torch(fmt: str) -> bool:
    """Whether a bundle of this weights format predicts without torch (ONNX does)."""
    return fmt == "onnx"


def load_for_predict(bundle: Bundle) -> LoadedModel:
    """The bundle's network ready for :func:`make_predictor`: an ONNX session without torch, else PyTorch's."""
    if runs_without_torch(bundle.format):
        from geoseg.model.onnxrt import load_onnx_model

        return load_onnx_model(bundle)
    from geoseg.model.weights import load_model

    return load_model(bundle)


def make_predictor(model: LoadedModel, device: str = "auto", precision: str = "auto", tta: bool = False,
                   backend: str = "eager") -> Any:
    """The predictor for ``model``: an :class:`~geoseg.predict.onnx_predictor.OnnxPredictor` for an ONNX bundle,
    else a PyTorch :class:`~geoseg.predict.inference.Predictor` (which refuses ``int8``)."""
    if runs_without_torch(model.format):
        from geoseg.predict.onnx_predictor import OnnxPredictor

        return OnnxPredictor(model, device, precision, tta, backend if backend == "openvino" else "onnxruntime")
    if backend == "openvino":
        raise InputError(f"{model.bundle.path}: --backend openvino runs an ONNX model; export one with geoseg export "
                         "--format onnx and predict that")
    if precision == "int8":
        raise InputError(f"{model.bundle.path}: --precision int8 runs an ONNX model; export one with geoseg export "
                         "--format onnx --int8 (or predict its ONNX export with --precision int8)")
    from geoseg.predict.inference import Predictor

    return Predictor(model, device, precision, tta, backend)


def resolve_settings(options: Any, tile: int, bands: int, bundle: Bundle | None = None,
                     load: Callable[[], LoadedModel] | None = None) -> DeviceSettings:
    """Make ``options.precision`` and ``options.batch_size`` concrete for this machine's device.

    ONNX bundles are resolved here without torch (:func:`~geoseg.predict.onnx_predictor.onnx_precision`, one
    512 x 512 chip of pixels per batch on a CPU, 8 chips on CUDA); others by
    :func:`geoseg.predict.inference.resolve_settings`.

    Args:
        options: a :class:`~geoseg.predict.units.PredictOptions`.
        tile: the chip size the job runs.
        bands: the model's input bands.
        bundle: the job's bundle (its format decides the runtime); ``None`` loads it through ``load``.
        load: a callable returning the :class:`~geoseg.model.bundle.LoadedModel`.
    """
    if bundle is None and load is not None:
        bundle = load().bundle
    if bundle is None or not runs_without_torch(bundle.format):
        if options.precision == "int8":
            where = bundle.path if bundle is not None else "the model"
            raise InputError(f"{where}: --precision int8 runs an ONNX model; export one with geoseg export "
                             "--format onnx --int8")
        from geoseg.predict.inference import resolve_settings as torch_settings

        return torch_settings(options, tile, bands, load=load)
    from geoseg.model.quantize import is_int8_bundle
    from geoseg.predict.onnx_predictor import onnx_device, onnx_precision

    dev = onnx_device(options.device)
    precision = onnx_precision(options.precision, bundle.weights_path, is_int8_bundle(bundle))
    batch = options.batch_size
    if batch == AUTO:
        batch = hardware.cpu_batch_size(tile) if dev.type == "cpu" else 8
    elif not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise InputError(f"--batch-size {batch}: must be a positive whole number or auto")
    machine = "CUDA (ONNX Runtime)" if dev.type == "cuda" else hardware.cpu_features().describe()
    return DeviceSettings(precision, int(batch), str(dev), machine)
