"""Inference backends: what runs a network's forward pass, by name.

``prepare(net, backend, device, example, amp_dtype)`` returns a callable that maps a float32 batch
``(N, C, H, W)`` (channels_last on the CPU) to float32 logits ``(N, K, H, W)`` (the first output when the
network returns a tuple or list). A backend other than eager is converted from the example in
``prepare``, run on it once, and checked there against eager float32: the arg max of the logits must agree
on ``MIN_AGREEMENT`` of the example's pixels, or ``prepare`` refuses it. The ``--backend auto`` probe
(:func:`geoseg.predict.runtime.choose_backend`) times them through :func:`probe_forward`, whose conversion the
job's ``prepare`` then reuses: the check still runs on the job's first batch.

- ``eager``: PyTorch as it is, with autocast when ``amp_dtype`` is given; CPU and CUDA. The default. Without
  autocast on CUDA the convolutions run in float32, not cuDNN's default TF32.
- ``onnxruntime``: the network exported to ONNX (``geoseg.model.export``'s exporter: batch, height and width stay
  dynamic) and run by ONNX Runtime's CPU provider, full graph optimisation, as many intra-op threads as
  torch has, no spinning between runs; float32 on the CPU only. About 0.6-0.7x eager's time per 512 px
  chip (U-Net and DeepLabV3+ resnet18, 2 cores of an Intel Xeon without AMX) with the same classes;
  ``prepare`` takes 1-8 s to export.

``torch.compile`` (0.75-0.8x eager, 15-45 s to compile), TorchScript trace + freeze (0.8-0.85x), oneDNN
Graph fusion (0.7x on DeepLabV3+ but 1.1x on U-Net) and bf16 (slower than fp32 without AMX) measured no
better than ONNX Runtime on this CPU: ``benchmarks/bench_backends.py`` measures them all.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from geoseg.errors import GeoSegError, InputError, unknown_name
from geoseg.model.networks import first_output
from geoseg.predict.hardware import BACKENDS

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]

MIN_AGREEMENT = 0.995


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


@contextlib.contextmanager
def _ieee_fp32(on: bool) -> Iterator[None]:
    """float32 convolutions in float32: cuDNN runs them in TF32 (10-bit mantissas) unless told not to, which
    flipped classes against the CPU's near ties (35 of 810,000 pixels of the SpaceNet bundle on an H200,
    benchmarks/RESULTS.md, GPU). A process-wide cuDNN flag, set around the forward (one model thread runs it)."""
    if not on:
        yield
        return
    cudnn = torch.backends.cudnn
    old = cudnn.allow_tf32
    cudnn.allow_tf32 = False
    try:
        yield
    finally:
        cudnn.allow_tf32 = old


def _eager(net: torch.nn.Module, device: torch.device, example: torch.Tensor,
           amp_dtype: torch.dtype | None) -> Forward:
    ieee = device.type == "cuda" and amp_dtype is None  # --precision fp32 means float32 on a GPU too

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), _autocast(device, amp_dtype), _ieee_fp32(ieee):
            return first_output(net(x)).float()

    return forward


def _onnxruntime(net: torch.nn.Module, device: torch.device, example: torch.Tensor,
                 amp_dtype: torch.dtype | None) -> Forward:
    try:
        import onnx  # noqa: F401  (the exporter's)
        import onnxruntime as ort
    except ImportError as exc:
        raise InputError(f"--backend onnxruntime needs the {exc.name or 'onnxruntime'} package: "
                         'pip install onnx onnxruntime') from None
    if amp_dtype is not None:
        raise InputError(f"--backend onnxruntime runs float32 only, not {amp_dtype}; use --precision fp32 "
                         "or --backend eager")
    from geoseg.model.export import _export_onnx

    with tempfile.TemporaryDirectory(prefix="geoseg-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        _export_onnx(net, example.contiguous(), path, 17)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        # spinning workers would take the cores from the readers and writers between forwards: as fast
        # alone, faster when other work shares the cores. The memory arena stays on: ~15 % faster than
        # without it, for ~0.4 GB more at two 512 px chips a batch
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def forward(x: torch.Tensor) -> torch.Tensor:
        image = x.detach().contiguous().numpy()  # ONNX Runtime wants NCHW-contiguous memory
        return torch.from_numpy(session.run(["logits"], {"image": image})[0])

    return forward


_BUILDERS: dict[str, Callable[[torch.nn.Module, torch.device, torch.Tensor, torch.dtype | None], Forward]] = {
    "eager": _eager,
    "onnxruntime": _onnxruntime,
}


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """The fraction of pixels whose arg max over classes (dim 1) is the same in two ``(N, K, H, W)`` logits."""
    if logits.shape[1] == 1:  # one sigmoid logit: compare the sign
        return float(((logits > 0) == (reference > 0)).float().mean())
    return float((logits.argmax(1) == reference.argmax(1)).float().mean())


# conversions made by the --backend auto probe (probe_forward), kept for the job's predictor of the same network:
# prepare() takes one instead of converting again, and checks it on the job's first batch all the same
_KEPT: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, str], Forward]] = weakref.WeakKeyDictionary()


def _convert(net: torch.nn.Module, backend: str, device: torch.device, example: torch.Tensor,
             amp_dtype: torch.dtype | None) -> tuple[Forward, torch.Tensor]:
    """``backend``'s forward converted from ``example``, and its logits of ``example`` (the first run)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and exporter warnings about Python control flow
            forward = _BUILDERS[backend](net, device, example, amp_dtype)
            logits = forward(example)  # the runtime's first-run optimisation happens here, not on a chip
    except GeoSegError:
        raise
    except Exception as exc:  # any failure to convert: tracing, an unsupported op, the runtime refusing it
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"--backend {backend} cannot run this network ({type(exc).__name__}: {first[:200]}); "
                         "use --backend eager") from exc
    return forward, logits


def probe_forward(net: torch.nn.Module, backend: str, device: torch.device, example: torch.Tensor,
                  amp_dtype: torch.dtype | None = None) -> Forward:
    """``backend``'s forward for the ``--backend auto`` probe, which times it on ``example``.

    Eager is :func:`prepare`'s. Another backend is converted from ``example`` here, unchecked (the probe's
    chips are random), and kept for this network's next :func:`prepare` of the same backend and dtype, which
    takes it instead of converting again and checks it against eager on the job's first batch all the same.
    :func:`release` drops what the job will not run.

    Raises:
        UnknownNameError, InputError: as :func:`prepare`.
    """
    if backend not in _BUILDERS:
        raise unknown_name("backend", backend, BACKENDS)
    if backend == "eager":
        return prepare(net, "eager", device, None, amp_dtype)
    if device.type != "cpu":
        raise InputError(f"--backend {backend} runs on the CPU only, not {device}; use --backend eager")
    forward, _ = _convert(net, backend, device, example, amp_dtype)
    _KEPT.setdefault(net, {})[(backend, str(amp_dtype))] = forward
    return forward


def release(net: torch.nn.Module, keep: str | None = None) -> None:
    """Drop the probe's conversions of ``net`` (:func:`probe_forward`) but those of backend ``keep``."""
    kept = _KEPT.get(net, {})
    for key in [k for k in kept if k[0] != keep]:
        del kept[key]


def prepare(net: torch.nn.Module, backend: str = "eager", device: torch.device | None = None,
            example: torch.Tensor | None = None, amp_dtype: torch.dtype | None = None) -> Forward:
    """A callable that runs ``net`` through ``backend``: float32 ``(N, C, H, W)`` -> float32 logits ``(N, K, H, W)``.

    Args:
        net: the network in eval mode, already on ``device`` (channels_last on the CPU is fastest).
        backend: one of ``BACKENDS``.
        device: where ``net`` lives; default the CPU. Backends other than eager run on the CPU only.
        example: a batch like the ones the callable will see (chips of the model's size, normalised);
            required for backends other than eager, which are converted from it and checked on it.
        amp_dtype: autocast dtype (``torch.bfloat16`` or ``torch.float16``), or ``None`` for float32.

    Returns:
        ``forward(x) -> logits`` for any batch size, and any height and width the network accepts.

    Raises:
        UnknownNameError: an unknown backend (the message lists the valid ones).
        InputError: the backend needs a package that is missing, does not run on ``device`` or in
            ``amp_dtype``, cannot convert this network, or disagrees with eager on the example.
    """
    if backend not in _BUILDERS:
        raise unknown_name("backend", backend, BACKENDS)
    device = device or torch.device("cpu")
    if backend == "eager":
        return _eager(net, device, example if example is not None else torch.empty(0), amp_dtype)
    if device.type != "cpu":
        raise InputError(f"--backend {backend} runs on the CPU only, not {device}; use --backend eager")
    if example is None:
        raise InputError(f"--backend {backend} needs an example batch of the chips it will run on")
    forward = _KEPT.get(net, {}).pop((backend, str(amp_dtype)), None)  # the probe's conversion, if it made one
    if forward is None:
        forward, logits = _convert(net, backend, device, example, amp_dtype)
    else:
        logits = forward(example)
    reference = _eager(net, device, example, None)(example)
    agree = agreement(logits, reference)
    log.info("backend %s: %.4f %% arg max agreement with eager float32, max |logit difference| %.3g",
             backend, 100 * agree, float((logits - reference).abs().max()))
    if agree < MIN_AGREEMENT:
        raise InputError(f"--backend {backend} agrees with eager on only {100 * agree:.2f} % of the pixels "
                         f"of the example (at least {100 * MIN_AGREEMENT:.1f} % needed); use --backend eager")
    return forward


__all__ = ["BACKENDS", "MIN_AGREEMENT", "Forward", "agreement", "first_output", "prepare", "probe_forward", "release"]
