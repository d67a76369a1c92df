"""The model stage: one consumer per device that turns batches of chips into probabilities.

Readers submit chips (``(C, H, W)`` float32, already normalised) from any thread and get a future of the
chip's probabilities ``(K, H, W)`` float32. A single thread owns the network: it gathers chips into
batches of ``batch_size`` (or fewer when no chip has arrived for ``max_wait`` seconds), runs them and
resolves the futures. On CUDA it uses pinned host buffers, a side stream for host-to-device copies and
mixed precision, prepares batch k+1 while the device computes batch k, and hands each chip a view of its
batch's pinned output block rather than a copy.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from geoseg.errors import GeoSegError, InputError, unknown_name
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
    return DeviceSettings(precision, int(batch), str(dev), machine)


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


@dataclass
class _Item:
    data: np.ndarray
    future: Future[tuple[np.ndarray, float]]


_STOP = object()


class ModelServer:
    """The single consumer of chips for one device (see the module docstring).

    Use as a context manager; :meth:`submit` may be called from any thread.
    """

    def __init__(self, predictor: Predictor, batch_size: int = 8, max_wait: float = 0.02):
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        self.predictor = predictor
        self.batch_size = batch_size
        self.max_wait = max_wait
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="geoseg-model", daemon=True)
        self.seconds = 0.0  # time the model thread spent running batches
        self.batches = 0
        self.chips = 0
        self._error: BaseException | None = None
        cuda = predictor.device.type == "cuda"
        self._cuda = cuda
        self._copy_stream = torch.cuda.Stream(predictor.device) if cuda else None
        self._host_in: list[torch.Tensor] = []  # pinned input buffers, two (one batch computes, one fills)

    def __enter__(self) -> ModelServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def submit(self, data: np.ndarray) -> Future[tuple[np.ndarray, float]]:
        """Queue one chip ``(C, H, W)`` float32.

        The future resolves to ``(probs, seconds)``: ``(K, H, W)`` float32 probabilities and the chip's share
        of its batch's model time (so each unit can account for the model time it used).
        """
        fut: Future[tuple[np.ndarray, float]] = Future()
        if self._error is not None:
            fut.set_exception(self._error)
            return fut
        self._queue.put(_Item(data, fut))
        return fut

    def _gather(self) -> tuple[list[_Item], bool]:
        first = self._queue.get()
        if first is _STOP:
            return [], True
        items = [first]
        stop = False
        while len(items) < self.batch_size:
            try:
                nxt = self._queue.get(timeout=self.max_wait)
            except queue.Empty:
                break
            if nxt is _STOP:
                stop = True
                break
            items.append(nxt)
        return items, stop

    def _loop(self) -> None:
        pending: tuple[list[_Item], Any] | None = None
        slot = 0
        stop = False
        while not stop:
            if pending is not None and (not self._cuda or self._queue.empty()):
                # nothing to overlap with (or no device to overlap on): publish the results now
                self._finish(*pending)
                pending = None
            items, stop = self._gather()
            if items:
                try:
                    launched = self._launch(items, slot)
                except BaseException as exc:  # resolve the futures, never kill the thread silently
                    self._fail(items, exc)
                    launched = None
                slot ^= 1
            else:
                launched = None
            if pending is not None:
                self._finish(*pending)
            pending = (items, launched) if launched is not None else None
        if pending is not None:
            self._finish(*pending)
        # anything submitted after the stop sentinel
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                item.future.set_exception(RuntimeError("the model server was closed"))

    def _launch(self, items: list[_Item], slot: int) -> Any:
        """Start a batch; on CUDA this returns before the device is done."""
        t0 = time.perf_counter()
        pred = self.predictor
        n = len(items)
        if not self._cuda:
            batch = np.stack([it.data for it in items])
            if n < self.batch_size:
                # a fixed batch shape: kernels chosen by shape (and their sums' order) must not depend on how
                # many chips happened to arrive together, so a chip's probabilities are the same in any run
                pad = np.zeros((self.batch_size - n, *batch.shape[1:]), dtype=batch.dtype)
                batch = np.concatenate([batch, pad])
            with torch.inference_mode():
                x = torch.from_numpy(batch)
                if pred.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                probs = pred.forward(x).contiguous()  # (N, K, H, W) rows for the blend, whatever the layout
            dt = time.perf_counter() - t0
            self.seconds += dt
            return probs.numpy(), dt
        # the chips go straight into the pinned input buffer, zeros after them (the fixed batch shape)
        host_in = self._pinned(self._host_in, slot, (self.batch_size, *items[0].data.shape))
        buf = host_in.numpy()
        np.stack([it.data for it in items], out=buf[:n])
        buf[n:] = 0.0
        with torch.inference_mode():
            assert self._copy_stream is not None
            with torch.cuda.stream(self._copy_stream):
                x = host_in.to(pred.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            torch.cuda.current_stream(pred.device).wait_stream(self._copy_stream)
            x.record_stream(torch.cuda.current_stream(pred.device))
            probs = pred.forward(x)
            # each batch's probabilities come back into a pinned block of their own, from PyTorch's caching
            # host allocator: the chips get views of it (the model thread copies nothing), and the block goes
            # back to the allocator once the last of them is blended. Copying them out of one reused buffer
            # took 4.4 s of the model thread's 10.5 s on a 16384 x 16384 scene (benchmarks/RESULTS.md, GPU)
            host_out = torch.empty((n, *probs.shape[1:]), dtype=torch.float32, pin_memory=True)
            host_out.copy_(probs[:n], non_blocking=True)
            overflow = pred.take_overflow()
            done = torch.cuda.Event()
            done.record()
        dt = time.perf_counter() - t0
        self.seconds += dt
        return (host_out, n, done, dt, overflow)

    def _pinned(self, pool: list[torch.Tensor], slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        full = (self.batch_size, *shape[1:])
        while len(pool) <= slot:
            pool.append(torch.empty(0))
        if tuple(pool[slot].shape) != full:
            pool[slot] = torch.empty(full, dtype=torch.float32, pin_memory=True)
        return pool[slot]

    def _finish(self, items: list[_Item], launched: Any) -> None:
        try:
            if self._cuda:
                host_out, n, done, dt, overflow = launched
                t1 = time.perf_counter()
                done.synchronize()
                self.seconds += time.perf_counter() - t1
                dt += time.perf_counter() - t1
                probs = host_out.numpy()  # this batch's own block: views, no copy (see _launch)
                self.predictor.count_overflow(overflow)  # filled before `done`: no wait
            else:
                probs, dt = launched
        except BaseException as exc:
            self._fail(items, exc)
            return
        self.batches += 1
        self.chips += len(items)
        share = dt / len(items)
        for i, it in enumerate(items):
            it.future.set_result((probs[i], share))

    def _fail(self, items: list[_Item], exc: BaseException) -> None:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            exc = GeoSegError(f"the model ran out of memory on {self.predictor.device} at --batch-size "
                              f"{self.batch_size}; lower --batch-size (or --tile-size)")
        self._error = exc
        for it in items:
            if not it.future.done():
                it.future.set_exception(exc)
