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

``--backend auto`` is made concrete here too, once per job, by a short measured probe of the backends this
bundle and machine can run (:func:`choose_backend`, :mod:`geoseg.predict.probe`), torch-free for an ONNX bundle.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import Any

from geoseg.errors import InputError
from geoseg.model.bundle import Bundle, LoadedModel
from geoseg.predict import hardware
from geoseg.predict.hardware import AUTO, DeviceSettings

log = logging.getLogger(__name__)

__all__ = ["backend_candidates", "choose_backend", "load_for_predict", "make_predictor", "resolve_settings",
           "runs_without_torch"]


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
    """Make ``options.backend``, ``options.precision`` and ``options.batch_size`` concrete for this machine.

    ONNX bundles are resolved here without torch (:func:`~geoseg.predict.onnx_predictor.onnx_precision`, one
    512 x 512 chip of pixels per batch on a CPU, 8 chips on CUDA); others by
    :func:`geoseg.predict.inference.resolve_settings`. ``--backend auto`` is resolved by a probe
    (:func:`choose_backend`).

    Args:
        options: a :class:`~geoseg.predict.units.PredictOptions`.
        tile: the chip size the job runs.
        bands: the model's input bands.
        bundle: the job's bundle (its format decides the runtime); ``None`` loads it through ``load``.
        load: a callable returning the :class:`~geoseg.model.bundle.LoadedModel`.

    Raises:
        InputError: a precision, batch size or device this bundle or machine cannot run.
    """
    if bundle is None and load is not None:
        bundle = load().bundle
    if options.backend == AUTO:
        return choose_backend(options, tile, bands, bundle, load)
    return _concrete(options, tile, bands, bundle, load)


def _concrete(options: Any, tile: int, bands: int, bundle: Bundle | None,
              load: Callable[[], LoadedModel] | None) -> DeviceSettings:
    """:func:`resolve_settings` for a named backend."""
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
    return DeviceSettings(precision, int(batch), str(dev), machine,
                          "openvino" if options.backend == "openvino" else "onnxruntime")


def backend_candidates(fmt: str, device_type: str, precision: str) -> list[str]:
    """The backends ``--backend auto`` chooses among for a bundle of weights format ``fmt`` on ``device_type``.

    - ONNX bundle: ``onnxruntime``, and ``openvino`` on a CPU where the ``openvino`` package is installed.
    - PyTorch bundle: ``eager``, and ``onnxruntime`` on a CPU where ``onnx`` and ``onnxruntime`` are installed
      and ``precision`` is ``auto`` or ``fp32`` (ONNX Runtime runs float32 only). On CUDA and MPS eager alone.

    The first is the default backend, which the job runs when no other candidate is faster.
    """
    def have(*packages: str) -> bool:
        return all(importlib.util.find_spec(p) is not None for p in packages)

    if runs_without_torch(fmt):
        return ["onnxruntime", "openvino"] if device_type == "cpu" and have("openvino") else ["onnxruntime"]
    if device_type == "cpu" and precision in (AUTO, "fp32") and have("onnx", "onnxruntime"):
        return ["eager", "onnxruntime"]
    return ["eager"]


def choose_backend(options: Any, tile: int, bands: int, bundle: Bundle | None = None,
                   load: Callable[[], LoadedModel] | None = None) -> DeviceSettings:
    """``--backend auto``: the settings of the fastest of :func:`backend_candidates`, by a short probe.

    Each candidate's precision and batch size are resolved as if it had been named (ONNX Runtime runs a
    PyTorch network in float32, so on a CPU with AMX the probe weighs eager's bf16 against ONNX Runtime's
    fp32). With one candidate nothing is timed. Otherwise every candidate runs a batch of random chips of the
    job's network batch shape through :func:`geoseg.predict.probe.time_backends` (a warm-up, then up to three
    timed forwards, about 2 s of timed forwards in all) and the fastest median wins; one line logs the times.
    Random chips decide speed only: the chosen backend is still converted from, and checked against eager
    or fp32 on, the job's first batch, as when it is named. Probing an int8 network that the job would
    quantise at its start times the float32 network instead (said in the log line).

    Returns:
        The winner's :class:`~geoseg.predict.hardware.DeviceSettings`, its ``probe`` holding every timed
        candidate (fastest first).
    """
    import dataclasses

    if bundle is None:
        if load is None:
            raise InputError("--backend auto needs the model to probe its backends")
        bundle = load().bundle
    default = "onnxruntime" if runs_without_torch(bundle.format) else "eager"
    first = _concrete(dataclasses.replace(options, backend=default), tile, bands, bundle, load)
    names = backend_candidates(bundle.format, first.device.split(":")[0], options.precision)
    per = {name: first if name == default else
           _concrete(dataclasses.replace(options, backend=name), tile, bands, bundle, load) for name in names}
    if len(names) == 1:
        return first
    model = load() if load is not None else load_for_predict(bundle)
    batch = _probe_batch(first, tile, bands)
    note = ""
    if runs_without_torch(bundle.format) and first.precision == "int8":
        from geoseg.model.quantize import is_int8_bundle

        if not is_int8_bundle(bundle):
            note = " (int8 is quantised at the job's start: the float32 network was timed)"
    from geoseg.predict.probe import time_backends

    result = time_backends({name: _prober(model, options.device, name, per[name].precision, batch)
                            for name in names}, batch)
    winner = result.winner or default
    if not runs_without_torch(bundle.format):
        from geoseg.predict.backends import release

        release(model.module, keep=winner)  # the losers' conversions go; the winner's is the job's
    log.info("--backend auto: %s%s; chose %s (%s)", result.describe(), note, winner, per[winner].precision)
    probe = tuple((name, per[name].precision, s) for name, s in result.seconds.items())
    return dataclasses.replace(per[winner], probe=probe)


def _probe_batch(settings: DeviceSettings, tile: int, bands: int) -> Any:
    """Random normalised chips ``(N, C, tile, tile)`` float32, N the batch one network call runs on this device."""
    import numpy as np

    n = hardware.cpu_batch_size(tile) if settings.device == "cpu" else settings.batch_size
    return np.random.default_rng(0).standard_normal((n, bands, tile, tile), dtype=np.float32)


def _prober(model: LoadedModel, device: str, backend: str, precision: str,
            batch: Any) -> Callable[[], Callable[[Any], Any]]:
    """What :func:`~geoseg.predict.probe.time_backends` builds for ``backend``: the network's forward on ``batch``.

    An ONNX predictor's network is timed as it is (its first-batch int8 check belongs to the job's real chips);
    a PyTorch network through :func:`geoseg.predict.backends.probe_forward`, whose conversion the job reuses.
    """
    def build() -> Callable[[Any], Any]:
        torch_free = runs_without_torch(model.format)
        predictor = make_predictor(model, device, precision, False, backend if torch_free else "eager")
        if torch_free:
            session = predictor.session if predictor.session is not None else predictor.fp32
            return session.run  # type: ignore[no-any-return]
        import torch

        from geoseg.predict.backends import probe_forward

        x = torch.from_numpy(batch).to(predictor.device)
        if predictor.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        forward = probe_forward(predictor.net, backend, predictor.device, x, predictor.amp_dtype)
        return lambda _batch: forward(x)

    return build
