"""The model stage's single consumer: one thread per device that gathers chips into batches and runs them.

Readers submit chips (``(C, H, W)`` float32, already normalised) from any thread and get a future of the
chip's probabilities ``(K, H, W)`` float32. A single thread owns the predictor: it gathers chips into
batches of ``batch_size`` (or fewer when no chip has arrived for ``max_wait`` seconds), runs them and
resolves the futures.

The server knows predictors only by :class:`ChipPredictor`: numpy in, numpy out, so it runs the PyTorch
:class:`~geoseg.predict.inference.Predictor` and the torch-free
:class:`~geoseg.predict.onnx_predictor.OnnxPredictor` alike, and imports torch only for a PyTorch
predictor on CUDA: there it uses pinned host buffers, a side stream for host-to-device copies, and prepares
batch k+1 while the device computes batch k.

Every network call has the same shape: a batch that is not full is padded with zeros. Convolution libraries
pick kernels (and so the order of their floating-point sums) by shape: oneDNN on a CPU sums a lone 64 px
chip differently from the same chip in a batch of two. With ``net_batch`` (set on a CPU) the network always
sees batches of exactly that many chips, whatever ``batch_size`` gathers, so a chip's probabilities, and
the confidence map rounded from them, are the same bytes at any ``--batch-size``.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from geoseg.errors import GeoSegError, InputError

__all__ = ["ChipPredictor", "ModelServer"]


class ChipPredictor(Protocol):
    """What the server runs: ``run_batch`` maps a host batch ``(N, C, H, W)`` float32 to probabilities
    ``(N, K, H, W)`` float32; ``device.type`` says where (``cpu``, ``cuda``); ``torch_cuda`` is true for a
    PyTorch network on a CUDA device, which the server feeds through pinned buffers (``forward``)."""

    device: Any
    torch_cuda: bool

    def run_batch(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass
class _Item:
    data: np.ndarray
    future: Future[tuple[np.ndarray, float]]


_STOP = object()


class ModelServer:
    """The single consumer of chips for one device (see the module docstring).

    Use as a context manager; :meth:`submit` may be called from any thread.
    """

    def __init__(self, predictor: Any, batch_size: int = 8, max_wait: float = 0.02, net_batch: int | None = None):
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        self.predictor = predictor
        self._cuda = bool(getattr(predictor, "torch_cuda", False))
        # chips per network call: a fixed shape (see the module docstring); the server gathers a whole
        # number of them. On CUDA the batch is the call (memory, not kernel choice, sets it there)
        self.net_batch = batch_size if net_batch is None or self._cuda else max(1, int(net_batch))
        self.batch_size = -(-batch_size // self.net_batch) * self.net_batch
        self.max_wait = max_wait
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="geoseg-model", daemon=True)
        self.seconds = 0.0  # time the model thread spent running batches
        self.batches = 0
        self.chips = 0
        self._error: BaseException | None = None
        self._copy_stream: Any = None
        if self._cuda:
            import torch

            self._copy_stream = torch.cuda.Stream(predictor.device)
        self._host_in: list[Any] = []  # pinned input buffers, CUDA only: two (one batch computes, one fills)

    def __enter__(self) -> ModelServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    @property
    def failed(self) -> bool:
        """Whether a batch failed: every later chip fails with that error."""
        return self._error is not None

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
            if items and self._error is not None:  # the model failed: what was queued behind fails the same way
                self._fail(items, self._error)
                launched = None
            elif items:
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
        batch = np.stack([it.data for it in items])
        # a fixed call shape: kernels chosen by shape (and their sums' order) must not depend on how many
        # chips happened to arrive together, so a chip's probabilities are the same in any run
        step = self.net_batch
        full = -(-len(items) // step) * step
        if len(items) < full:
            pad = np.zeros((full - len(items), *batch.shape[1:]), dtype=batch.dtype)
            batch = np.concatenate([batch, pad])
        pred = self.predictor
        if not self._cuda:
            if full == step:
                probs = pred.run_batch(batch)
            else:
                probs = np.concatenate([pred.run_batch(batch[i:i + step]) for i in range(0, full, step)])
            dt = time.perf_counter() - t0
            self.seconds += dt
            return probs, dt
        import torch

        n = len(items)
        with torch.inference_mode():
            host_in = self._pinned(self._host_in, slot, batch.shape)
            host_in.copy_(torch.from_numpy(batch))
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

    def _pinned(self, pool: list[Any], slot: int, shape: tuple[int, ...]) -> Any:
        import torch

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
        torch = sys.modules.get("torch")  # loaded when a PyTorch predictor runs; never imported here for this
        if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
            exc = GeoSegError(f"the model ran out of memory on {self.predictor.device} at --batch-size "
                              f"{self.batch_size}; lower --batch-size (or --tile-size)")
        self._error = exc
        for it in items:
            if not it.future.done():
                it.future.set_exception(exc)
