"""The model stage in PyTorch: a :class:`Predictor` turns batches of chips into probabilities on its device.

The :class:`~geoseg.predict.server.ModelServer` (re-exported here) feeds it batches from the reader
threads. ONNX bundles run without torch, through :class:`~geoseg.predict.onnx_predictor.OnnxPredictor`;
:mod:`geoseg.predict.runtime` chooses between the two.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from geoseg.errors import InputError, unknown_name
from geoseg.model.bundle import LoadedModel
from geoseg.predict import hardware
from geoseg.predict.backends import BACKENDS, prepare
from geoseg.predict.hardware import (
    AUTO,
    DEVICES,
    PRECISIONS,
    DeviceSettings,
    resolve_device,
    resolve_precision,
)
from geoseg.predict.server import ModelServer

log = logging.getLogger(__name__)

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
__all__ = ["DEVICES", "PRECISIONS", "DeviceSettings", "ModelServer", "Predictor", "resolve_device", "resolve_precision",
           "resolve_settings"]


def resolve_settings(options: Any, tile: int, bands: int, load: Any = None) -> DeviceSettings:
    """Make ``options.precision`` and ``options.batch_size`` concrete for this machine's device.

    Args:
        options: a :class:`~geoseg.predict.units.PredictOptions`.
        tile: the chip size the job runs.
        bands: the model's input bands.
        load: a callable returning the :class:`~geoseg.model.bundle.LoadedModel`; called only when a CUDA
            ``--batch-size auto`` must be measured.
    """
    dev = hardware.resolve_device(options.device)
    # backends other than eager run float32 (geoseg.predict.backends)
    precision = hardware.resolve_precision("fp32" if options.precision == AUTO and options.backend != "eager"
                                  else options.precision, dev)
    batch = options.batch_size
    if batch == AUTO:
        if dev.type == "cuda":
            if load is None:
                raise InputError("--batch-size auto on CUDA needs the model to measure its memory")
            batch = hardware.gpu_batch_size(Predictor(load(), str(dev), precision), tile, bands)
        else:
            batch = hardware.cpu_batch_size(tile)
    elif not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise InputError(f"--batch-size {batch}: must be a positive whole number or auto")
    machine = f"{torch.cuda.get_device_name(dev)} (CUDA)" if dev.type == "cuda" else hardware.cpu_features().describe()
    return DeviceSettings(precision, int(batch), str(dev), machine, options.backend)


# test-time augmentation: (forward transform, inverse transform) on (N, C, H, W) tensors
_TTA: list[tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = [
    (lambda t: t, lambda t: t),
    (lambda t: t.flip(-1), lambda t: t.flip(-1)),
    (lambda t: t.flip(-2), lambda t: t.flip(-2)),
    (lambda t: t.rot90(1, (-2, -1)), lambda t: t.rot90(-1, (-2, -1))),
    (lambda t: t.rot90(2, (-2, -1)), lambda t: t.rot90(-2, (-2, -1))),
    (lambda t: t.rot90(3, (-2, -1)), lambda t: t.rot90(-3, (-2, -1))),
]


class Predictor:
    """A loaded model on its device: :meth:`forward` turns ``(N, C, H, W)`` inputs into ``(N, K, H, W)`` probabilities.

    Args:
        model: the loaded bundle.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see :func:`geoseg.predict.hardware.resolve_precision`):
            autocast of the network; the softmax always runs in float32.
        tta: average the probabilities over flips and 90-degree rotations (6x the model work).
        backend: what runs the network (:mod:`geoseg.predict.backends`): ``eager`` PyTorch, or ``onnxruntime`` on
            the CPU, converted from the first batch and checked against eager on it.
    """

    def __init__(self, model: LoadedModel, device: str = "auto", precision: str = "auto", tta: bool = False,
                 backend: str = "eager"):
        self.contract = model.contract
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.amp_dtype = AMP_DTYPES[self.precision]
        self.tta = tta
        self.overflowed = 0  # forwards whose logits held inf or NaN (on a GPU: counted once read, see _finite)
        self._bad: list[torch.Tensor] = []  # on a GPU: per forward, whether its logits overflowed (not read yet)
        net = model.module.to(self.device).eval()
        self.channels_last = self.device.type in ("cpu", "cuda")
        if self.channels_last:
            # oneDNN and cuDNN run convolutions fastest on NHWC: 1.4-1.6x per chip on CPU (U-Net resnet18,
            # the demo's MobileNetV3 U-Net), with the same arg max
            net = net.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.net = net
        self.torch_cuda = self.device.type == "cuda"  # the model server feeds it through pinned buffers
        self.sigmoid = self.contract.model.activation == "sigmoid"
        self.backend = backend
        self._run: Callable[[torch.Tensor], torch.Tensor] | None = None
        if model.format == "onnx":  # the network is ONNX Runtime already (geoseg.model.weights.OnnxNetwork)
            if self.amp_dtype is not None:
                raise InputError(f"{model.bundle.weights_path}: an ONNX model runs in float32 (ONNX Runtime), not "
                                 f"{self.precision}; use --precision fp32 or auto")
            self.backend = "onnxruntime"
            self._run = prepare(net, "eager", self.device, None, None)
        elif backend == "eager":
            self._run = prepare(net, "eager", self.device, None, self.amp_dtype)
        elif backend not in BACKENDS:
            raise unknown_name("backend", backend, BACKENDS)

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        if self._run is None:  # converted from the first batch the job runs (real chips, for the agreement check)
            self._run = prepare(self.net, self.backend, self.device, x, self.amp_dtype)
        return self._run(x)

    def _finite(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits that overflowed (the bf16/fp16 range under autocast, or extreme inputs) kept ordered.

        +-inf become the largest finite float32 values and NaN the smallest, so the softmax stays a
        probability distribution (sums to 1) and the arg max a class; said once per predictor.

        On a GPU the check must not wait for the device (a host sync per batch would stall the model
        thread until the batch is computed, so it could not prepare the next one meanwhile): the logits
        are always passed through ``nan_to_num`` (which leaves finite values as they are), and the count of
        overflowed forwards is read later (:meth:`take_overflow`, :meth:`check_overflow`).
        """
        big = torch.finfo(torch.float32).max
        if logits.device.type != "cpu":
            bad = (~torch.isfinite(logits)).any()
            self._bad.append(bad)
            if len(self._bad) > 64:  # nobody reads them (a bare forward loop): keep the list short
                self.check_overflow()
            return torch.nan_to_num(logits, nan=-big, posinf=big, neginf=-big)
        if bool(torch.isfinite(logits).all()):
            return logits
        self._overflowed(1)
        return torch.nan_to_num(logits, nan=-big, posinf=big, neginf=-big)

    def _overflowed(self, batches: int) -> None:
        if batches and not self.overflowed:
            log.warning("the network's outputs overflowed (inf or NaN) under %s; those pixels take the largest "
                        "finite logit. If the class map looks wrong, run with --precision fp32 and check the "
                        "scene's values against the model's normalisation", self.precision)
        self.overflowed += batches

    def check_overflow(self) -> int:
        """Count (and say once) the forwards on a GPU whose logits overflowed since the last call; returns
        :attr:`overflowed`. Waits for the device."""
        bad, self._bad = self._bad, []
        if bad:
            self._overflowed(int(torch.stack(bad).sum()))
        return self.overflowed

    def take_overflow(self) -> torch.Tensor | None:
        """On a GPU: how many forwards since the last call overflowed, as a pinned host scalar that the device
        fills when its work gets there (pass it to :meth:`count_overflow` once the batch is done, so reading
        it waits for nothing); ``None`` when there is nothing to count."""
        bad, self._bad = self._bad, []
        if not bad:
            return None
        host = torch.empty((), dtype=torch.int64, pin_memory=True)
        host.copy_(torch.stack(bad).sum(), non_blocking=True)
        return host

    def count_overflow(self, counted: torch.Tensor | None) -> None:
        """Add a :meth:`take_overflow` count, read after its batch is done (saying once that logits overflowed)."""
        if counted is not None:
            self._overflowed(int(counted))

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, K, H, W)`` float32 (C-contiguous) of a host batch ``(N, C, H, W)`` float32 (CPU)."""
        with torch.inference_mode():
            x = torch.from_numpy(batch)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.forward(x).contiguous().numpy()  # (N, K, H, W) rows for the blend, whatever the layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """logits -> probabilities for one device batch ``(N, C, H, W)`` -> ``(N, K, H, W)`` float32."""
        transforms = _TTA if self.tta else _TTA[:1]
        probs: torch.Tensor | None = None
        for fwd, inv in transforms:
            logits = self._finite(inv(self._network(fwd(x))))  # float32 logits; aux heads dropped
            if self.sigmoid:
                p1 = torch.sigmoid(logits[:, :1])
                p = torch.cat([1 - p1, p1], dim=1)
            else:
                p = torch.softmax(logits, dim=1)
            probs = p if probs is None else probs + p
        assert probs is not None
        return probs / len(transforms) if len(transforms) > 1 else probs


