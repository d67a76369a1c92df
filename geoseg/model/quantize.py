"""int8 networks: ONNX Runtime's post-training static quantisation, and the calibration chips a bundle carries.

:func:`quantize_onnx` quantises a float32 ONNX network to int8 in the QDQ format (QuantizeLinear /
DequantizeLinear pairs around each quantised operator, which ONNX Runtime fuses into integer kernels),
weights per output channel, activations per tensor, their ranges calibrated on normalised chips (min-max, or
the 99.999th percentile of each tensor's magnitudes, which spends the 256 levels on the values that occur
rather than on rare outliers).
Two kinds of convolution stay float32 (:func:`float_convolutions`): the stem, the first convolution, which
sees the normalised input (several bands of different ranges in one per-tensor scale), and depthwise
convolutions (``group`` > 1), whose few weights per channel quantise badly. On an EfficientNet-Lite0 U-Net
trained on the Amazon tiles, arg-max agreement with float32 went from 98.72 % (all quantised) to 99.50 %
(stem kept) and 99.82 % (stem and depthwise kept), at the same speed as all quantised; a network without
depthwise convolutions (ResNet) keeps only its stem.
The float32 input and the output (probabilities) stay float32, so the network keeps the bundle's contract
and runs wherever the float32 one runs, QGIS Deepness included.

Calibration chips travel in a bundle as ``calibration.npz`` (:func:`write_calibration`): up to
:data:`CALIBRATION_CHIPS` chips as the network sees them (normalised), stored as uint8 with a per-band
offset and scale, so a 3-band bundle carries ~64 x 3 x 256 x 256 bytes. ``geoseg train`` writes them from
its training chips and ``geoseg export`` copies them; a bundle without them calibrates on the job's first
chips (:mod:`geoseg.predict.onnx_predictor`).

Needs ``onnxruntime`` and ``onnx`` (the quantiser edits the graph), not torch.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from geoseg.errors import BundleError, InputError
from geoseg.model.bundle import Bundle
from geoseg.model.contract import Contract, input_divisor

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.npz"
CALIBRATION_CHIPS = 64  # chips kept for calibration
CALIBRATION_SIZE = 256  # their side at most (the network is fully convolutional; ranges barely depend on it)
FP32_FILE = "model.fp32.onnx"  # an int8 export keeps its float32 network here, for predict's agreement check
INT8_OPS = ["Conv", "ConvTranspose", "MatMul", "Gemm"]  # quantised; the rest stays float32 between them
FLOAT_LEVELS = ("stem", "decoder")  # what stays float32, finest first (float_convolutions)
CALIBRATIONS = ("minmax", "percentile")  # how activation ranges are calibrated (quantize_onnx)
PERCENTILE = 99.999  # ONNX Runtime's default for its percentile calibration
# the ladder of int8 steps, fastest first: (float level, calibration). On a SpaceNet building U-Net (resnet18,
# one band) the decoder level agreed with fp32 on 99.51 % of the scene's pixels with min-max ranges and 99.88 %
# with percentile ranges; on the demo's network percentile ranges at the stem level lost a chip (95 %), so
# min-max comes first at each level and percentile only where min-max falls short at the last one
INT8_STEPS: tuple[tuple[str, str], ...] = (("stem", "minmax"), ("decoder", "minmax"), ("decoder", "percentile"))

__all__ = ["CALIBRATIONS", "CALIBRATION_CHIPS", "CALIBRATION_FILE", "CALIBRATION_SIZE", "FLOAT_LEVELS", "FP32_FILE",
           "INT8_STEPS", "argmax_agreement", "bundle_calibration", "class_agreement", "float_convolutions",
           "int8_backends", "int8_step",
           "is_int8_bundle", "quantize_agreeing", "quantize_onnx", "read_calibration", "scene_chips", "step_name",
           "write_calibration"]


def is_int8_bundle(bundle: Bundle) -> bool:
    """An ONNX bundle written by ``geoseg export --int8``."""
    export = bundle.contract.metadata.get("export") or {}
    return bundle.format == "onnx" and isinstance(export, dict) and export.get("precision") == "int8"


def int8_step(bundle: Bundle) -> tuple[str, str]:
    """The step of :data:`INT8_STEPS` (float level, calibration) an int8 export was quantised at; the first for
    older exports, which recorded no calibration (min-max) or no level (``stem``)."""
    export = bundle.contract.metadata.get("export") or {}
    info = export.get("int8") if isinstance(export, dict) else None
    info = info if isinstance(info, dict) else {}
    step = (info.get("float32", FLOAT_LEVELS[0]), info.get("calibration_method", CALIBRATIONS[0]))
    return step if step in INT8_STEPS else INT8_STEPS[0]


def step_name(step: tuple[str, str]) -> str:
    """``stem``, ``decoder``, ``decoder, percentile``: a step as logs and messages name it."""
    level, calibration = step
    return level if calibration == CALIBRATIONS[0] else f"{level}, {calibration}"


def argmax_agreement(probs: np.ndarray, reference: np.ndarray) -> float:
    """The fraction of pixels whose arg max over classes (axis 1) is the same in two ``(N, K, H, W)`` arrays of
    probabilities (one channel: the same side of 0.5)."""
    if probs.shape[1] == 1:
        return class_agreement(probs > 0.5, reference > 0.5)
    return class_agreement(probs.argmax(1), reference.argmax(1))


def class_agreement(classes: np.ndarray, reference: np.ndarray) -> float:
    """The fraction of pixels of the same class in two arrays of class indexes of one shape."""
    return float((classes == reference).mean())


def write_calibration(path: str | os.PathLike[str], chips: np.ndarray) -> Path:
    """Store normalised chips ``(N, C, H, W)`` float32 as uint8 with a per-band offset and scale (``.npz``)."""
    x = np.asarray(chips, dtype=np.float32)
    if x.ndim != 4 or not len(x):
        raise InputError(f"calibration chips must be (N, C, H, W) with N > 0, got shape {x.shape}")
    lo = x.min(axis=(0, 2, 3))
    hi = x.max(axis=(0, 2, 3))
    scale = np.where(hi > lo, (hi - lo) / 255, 1.0).astype(np.float32)
    q = np.rint((x - lo[None, :, None, None]) / scale[None, :, None, None]).clip(0, 255).astype(np.uint8)
    p = Path(path)
    np.savez_compressed(p, chips=q, offset=lo.astype(np.float32), scale=scale)
    return p


def read_calibration(path: str | os.PathLike[str]) -> np.ndarray:
    """The chips of a ``calibration.npz``, as float32 ``(N, C, H, W)``.

    Raises:
        BundleError: the file cannot be read or is not a calibration file.
    """
    try:
        with np.load(path) as f:
            q, lo, scale = f["chips"], f["offset"], f["scale"]
    except (OSError, KeyError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable calibration file ({exc}); re-export the bundle") from None
    return q.astype(np.float32) * scale[None, :, None, None] + lo[None, :, None, None]  # type: ignore[no-any-return]


def bundle_calibration(bundle: Bundle) -> np.ndarray | None:
    """The calibration chips a bundle folder carries (``calibration.npz`` beside its weights), or ``None``."""
    path = bundle.weights_path.parent / CALIBRATION_FILE
    if not bundle.path.is_dir() or not path.is_file():
        return None
    chips = read_calibration(path)
    if chips.shape[1] != bundle.contract.in_channels:
        raise BundleError(f"{path}: calibration chips have {chips.shape[1]} bands where the contract has "
                          f"{bundle.contract.in_channels}; re-export the bundle")
    return chips


def scene_chips(scene: str | os.PathLike[str], contract: Contract, n: int = CALIBRATION_CHIPS,
                size: int = CALIBRATION_SIZE) -> np.ndarray:
    """Up to ``n`` chips of ``size`` px (at most the contract's chip size) evenly spread over a scene, read with
    the contract's bands and normalisation; chips without valid pixels are left out.

    Raises:
        InputError: the scene cannot be read, does not fit the contract, or has no valid chip.
    """
    from geoseg.io.raster import SceneReader, gdal_env, inspect_scene
    from geoseg.model.preflight import check_scene

    info = inspect_scene(scene)
    bands = check_scene(contract, info, None).band_indexes
    side = min(size, contract.chip_size, info.width, info.height)
    div = input_divisor(contract.model)
    side = max(div, side // div * div)
    rows = range(0, max(1, info.height - side + 1), side)
    cols = range(0, max(1, info.width - side + 1), side)
    cells = [(r, c) for r in rows for c in cols]
    picks = np.unique(np.linspace(0, len(cells) - 1, min(4 * n, len(cells))).round().astype(int))
    chips: list[np.ndarray] = []
    with gdal_env():
        reader = SceneReader(info.path, list(bands), contract.input.mean, contract.input.std)
        try:
            for i in picks:
                r, c = cells[i]
                data, valid = reader.read(Window(c, r, side, side), size=(side, side))
                if valid.mean() >= 0.5:
                    chips.append(data)
        finally:
            reader.close()
    if not chips:
        raise InputError(f"{scene}: no chip of {side} px with valid pixels to calibrate int8 on; give another scene")
    if len(chips) > n:
        chips = [chips[i] for i in np.linspace(0, len(chips) - 1, n).round().astype(int)]
    return np.stack(chips).astype(np.float32)


class _Chips:
    """ONNX Runtime's CalibrationDataReader over chips, one at a time (the calibrator keeps every output)."""

    def __init__(self, name: str, chips: np.ndarray):
        self.name = name
        self.chips = chips
        self._it: Iterator[dict[str, np.ndarray]] = self._items()

    def _items(self) -> Iterator[dict[str, np.ndarray]]:
        for chip in self.chips:
            yield {self.name: np.ascontiguousarray(chip[None], dtype=np.float32)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._items()

    # ONNX Runtime's strided calibration (extra option CalibStridedMinMax, any method): it collects the chips
    # a slice at a time and merges each slice's ranges or histograms into the others
    def __len__(self) -> int:
        return len(self.chips)

    def set_range(self, start_index: int, end_index: int) -> None:
        chips = self.chips
        self._it = iter([{self.name: np.ascontiguousarray(c[None], dtype=np.float32)}
                         for c in chips[start_index:end_index]])


def float_convolutions(model: Any, level: str = "stem") -> list[str]:
    """Names of the convolutions :func:`quantize_onnx` keeps in float32: at level ``stem`` the first one (the
    stem) and every depthwise or grouped one (attribute ``group`` above 1); at level ``decoder`` also those of
    the decoder and the segmentation head (smp's module names, which the exported node names carry)."""
    if level not in FLOAT_LEVELS:
        raise ValueError(f"unknown float level {level!r}; one of {', '.join(FLOAT_LEVELS)}")
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    keep = [n.name for n in convs[:1]]
    keep += [n.name for n in convs[1:] if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    if level == "decoder":
        keep += [n.name for n in convs[1:] if n.name not in keep and ("decoder" in n.name or "head" in n.name)]
    return keep


def _stride(n: int) -> int:
    """Chips per slice of the strided calibration: the largest divisor of ``n`` up to 4 (ONNX Runtime needs
    one)."""
    return next(k for k in (4, 3, 2, 1) if n % k == 0)


def quantize_onnx(src: str | os.PathLike[str], dst: str | os.PathLike[str], chips: np.ndarray, *,
                  per_channel: bool = True, level: str = "stem", calibration: str = "minmax") -> Path:
    """Quantise a float32 ONNX network to int8 (static, QDQ), calibrated on ``chips`` ``(N, C, H, W)``, the
    convolutions of :func:`float_convolutions` at ``level`` kept in float32, the activation ranges by
    ``calibration`` (:data:`CALIBRATIONS`: each tensor's min and max, or its :data:`PERCENTILE` th percentile
    of magnitudes, clipped to its min and max).

    The graph is first prepared as ONNX Runtime recommends (shape inference and graph optimisation),
    the metadata (the contract, Deepness' keys) is carried over, and the result written to ``dst``.

    Raises:
        InputError: ``onnx`` or ``onnxruntime`` is missing.
        BundleError: the network cannot be quantised.
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; one of {', '.join(CALIBRATIONS)}")
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise InputError(f"int8 quantisation needs the {exc.name or 'onnx'} package: pip install onnx "
                         "onnxruntime") from None
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    meta = [(p.key, p.value) for p in model.metadata_props]
    name = model.graph.input[0].name
    del model
    reader: Any = type("Reader", (_Chips, CalibrationDataReader), {})(name, chips)
    with tempfile.TemporaryDirectory(prefix="geoseg-quant-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:  # the pre-processing is an optimisation; quantise the graph as it is
            log.info("quantisation pre-processing skipped (%s: %s)", type(exc).__name__, exc)
            prepared = src
        keep_float = float_convolutions(onnx.load(str(prepared), load_external_data=False), level)
        # the chips go through a slice at a time, each slice's ranges (or histograms) merged into the last: every
        # chip counts and their tensors never sit in memory together. (Not CalibMaxIntermediateOutputs: ONNX
        # Runtime 1.32's min-max calibrator drops each full slice unmerged, so only the chips after the last
        # full slice set the ranges; with 64 chips in slices of 3, one chip.)
        extra: dict[str, Any] = {"ActivationSymmetric": False, "WeightSymmetric": True,
                                 "CalibStridedMinMax": _stride(len(chips))}
        if calibration == "percentile":
            method = CalibrationMethod.Percentile
            extra.update(CalibPercentile=PERCENTILE, CalibTensorRangeSymmetric=True)
        else:
            method = CalibrationMethod.MinMax
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the percentile calibrator prints its settings
                quantize_static(str(prepared), str(dst), reader, quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                per_channel=per_channel, op_types_to_quantize=INT8_OPS, nodes_to_exclude=keep_float,
                                calibrate_method=method, extra_options=extra)
        except Exception as exc:  # onnxruntime's and onnx's own error types
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise BundleError(f"{src}: ONNX Runtime cannot quantise this network ({type(exc).__name__}: {first})"
                              ) from None
    out = onnx.load(str(dst))
    have = {p.key for p in out.metadata_props}
    for key, value in meta:
        if key not in have:
            prop = out.metadata_props.add()
            prop.key, prop.value = key, value
    onnx.save(out, str(dst))
    log.info("quantised %s to int8 (QDQ, per-channel weights; %d convolution(s) kept float32, level %s; %s ranges) "
             "on %d calibration chips", src, len(keep_float), level, calibration, len(chips))
    return dst


def int8_backends() -> tuple[str, ...]:
    """The CPU runtimes installed here that run an int8 ONNX network: ONNX Runtime, and OpenVINO when it is
    importable (it runs the same QDQ file with int8 kernels of its own, so its agreement differs)."""
    import importlib.util

    return ("onnxruntime",) + (("openvino",) if importlib.util.find_spec("openvino") is not None else ())


def _outputs(path: Path, chips: np.ndarray, backend: str = "onnxruntime") -> np.ndarray:
    from geoseg.model.onnxrt import make_session

    session = make_session(path, "cpu", backend)
    try:
        out = np.concatenate([session.run(chips[i:i + 4]) for i in range(0, len(chips), 4)])
    finally:
        session.release()
    if out.shape[1] == 1 and session.output != "probabilities":
        out = 1 / (1 + np.exp(-out))
    return out


def quantize_agreeing(src: str | os.PathLike[str], dst: str | os.PathLike[str], chips: np.ndarray,
                      check: np.ndarray, target: float, steps: tuple[tuple[str, str], ...] = INT8_STEPS,
                      backends: tuple[str, ...] = ("onnxruntime",)) -> tuple[tuple[str, str], float, dict[str, float]]:
    """Quantise ``src`` to ``dst`` at the first of ``steps`` (float level, calibration) whose arg max agrees with
    float32 on the ``check`` chips on at least ``target`` of the pixels in every one of ``backends`` (each
    int8 network against the float32 one in the same runtime, as predict checks it), else at the last step;
    that step, its lowest agreement, and each backend's."""
    refs = {b: _outputs(Path(src), check, b) for b in backends}
    step, agree, each = steps[0], 0.0, dict.fromkeys(backends, 0.0)
    for step in steps:
        quantize_onnx(src, dst, chips, level=step[0], calibration=step[1])
        each = {b: argmax_agreement(_outputs(Path(dst), check, b), ref) for b, ref in refs.items()}
        agree = min(each.values())
        log.info("int8 (float32 kept: %s): %s arg max agreement with fp32 on %d chip(s)", step_name(step),
                 ", ".join(f"{100 * a:.4f} % in {b}" for b, a in each.items()), len(check))
        if agree >= target:
            break
    return step, agree, each
