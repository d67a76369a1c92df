"""ONNX bundles in ONNX Runtime, numpy in and numpy out: predict without torch.

:class:`OnnxPredictor` is the torch-free sibling of :class:`~geoseg.predict.inference.Predictor`: the
:class:`~geoseg.predict.server.ModelServer` hands it a host batch ``(N, C, H, W)`` float32 and gets the
probabilities ``(N, K, H, W)`` float32. It runs an exported network (``geoseg export --format onnx``, whose
output is already the probabilities), in float32 or int8:

- ``fp32``: the bundle's network as it is.
- ``int8``: a network quantised by ONNX Runtime's static QDQ quantisation (:mod:`geoseg.model.quantize`):
  the bundle's own when it was exported with ``--int8``, else quantised here, at the job's start, on the
  calibration chips the bundle carries (``calibration.npz``) or, when it carries none, on the job's first
  chips (said in a log line). Either way the int8 network is checked against the float32 one before its
  first batch runs: on :data:`CHECK_CHIPS` chips of the job's first scene, its first chip and others spread
  evenly over its grid, when the engine gives them (:meth:`OnnxPredictor.add_check_chips`), else on the
  first batch. One chip (a CPU batch at 512 px) is too few pixels, the first chips of a scene share its
  first rows, and which chip reaches the model first depends on the reader threads, so the engine's chips
  make the check the same in every run. Below :data:`MIN_AGREEMENT` of the pixels' arg max it is quantised
  again at the next step of :data:`~geoseg.model.quantize.INT8_STEPS` (the decoder too in float32, then
  percentile instead of min-max activation ranges) and checked again; below the bar at the last step it refuses itself with a one-line
  reason.

``auto`` is ``int8`` for a bundle exported with ``--int8`` and ``fp32`` for any other.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.errors import InputError
from geoseg.io.store import staged_file
from geoseg.model.bundle import LoadedModel
from geoseg.model.onnxrt import OnnxSession, import_ort, make_session, softmax
from geoseg.model.quantize import (
    FP32_FILE,
    INT8_STEPS,
    argmax_agreement,
    bundle_calibration,
    class_agreement,
    int8_step,
    is_int8_bundle,
    quantize_onnx,
    step_name,
)

log = logging.getLogger(__name__)

MIN_AGREEMENT = 0.995  # as geoseg.predict.backends: the arg max must agree on this share of the first batch
# chips of the job's first scene the int8 check runs on: its first and others evenly spread over its grid.
# Measured on two U-Nets trained 300 s (bench_peer): the first chip alone refused int8 at 83.6 % and 99.44 %
# where the scene as a whole kept 99.8 % of its classes; each check chip costs one float32 and one int8 forward
# per step, once per process
CHECK_CHIPS = 5
INT8_CACHE_VERSION = 1  # bumped when quantize_onnx changes what it writes for the same inputs
ONNX_PRECISIONS = ("auto", "fp32", "int8")

__all__ = ["CHECK_CHIPS", "MIN_AGREEMENT", "ONNX_PRECISIONS", "DeviceName", "OnnxPredictor", "argmax_agreement",
           "onnx_device", "onnx_precision"]


def int8_cache_path(fp32: Path, chips: np.ndarray, step: tuple[str, str]) -> Path:
    """Where an int8 network quantised at predict time is kept for later runs (the system's temporary folder,
    as fetched bundles are): named by the float32 network's bytes, the calibration chips, the step and the
    ONNX Runtime version, so that a run with the same bundle does not quantise again (tens of seconds and
    about 1 GB for a ResNet-18 U-Net)."""
    import hashlib

    from geoseg.model.bundle import bundle_digest

    h = hashlib.sha256(bundle_digest([fp32]).encode())
    h.update(np.ascontiguousarray(chips, dtype=np.float32).tobytes())
    h.update(repr((step, import_ort().__version__, INT8_CACHE_VERSION)).encode())
    return Path(tempfile.gettempdir()) / "geoseg-int8" / f"{h.hexdigest()[:24]}.onnx"


@dataclass(frozen=True)
class DeviceName:
    """Where an ONNX model runs, shaped like ``torch.device`` for the code that reads ``.type`` and ``str()``."""

    type: str

    def __str__(self) -> str:
        return self.type


def onnx_device(device: str) -> DeviceName:
    """``cpu``, or ``cuda`` where asked for (or ``auto``) and ONNX Runtime has its CUDA provider.

    Raises:
        InputError: an unknown device, or CUDA asked for where ONNX Runtime has no CUDA provider.
    """
    name = device.lower()
    ort = import_ort()
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if name == "auto":
        return DeviceName("cuda" if cuda else "cpu")
    if name == "cpu":
        return DeviceName("cpu")
    if name.startswith("cuda"):
        if not cuda:
            raise InputError(f"--device {device}: ONNX Runtime has no CUDA provider here (pip install "
                             "onnxruntime-gpu); use --device cpu or auto")
        return DeviceName("cuda")
    raise InputError(f"--device {device}: an ONNX model runs on cpu or cuda (ONNX Runtime); use one of them")


def onnx_precision(precision: str, model_path: Path, int8_bundle: bool) -> str:
    """The concrete precision of an ONNX bundle: ``fp32`` or ``int8`` (see the module docstring).

    Raises:
        InputError: bf16, fp16 or an unknown name; fp32 asked of an int8 bundle that keeps no float32 network.
    """
    if precision not in ONNX_PRECISIONS:
        raise InputError(f"{model_path}: an ONNX model runs in float32 or int8 (ONNX Runtime), not {precision}; "
                         "use --precision fp32, int8 or auto")
    if precision == "auto":
        return "int8" if int8_bundle else "fp32"
    if precision == "fp32" and int8_bundle and not (model_path.parent / FP32_FILE).is_file():
        raise InputError(f"{model_path}: an int8 export without its float32 network ({FP32_FILE}); use "
                         "--precision int8 or the float32 export")
    return precision


# test-time augmentation on (N, C, H, W) arrays: (forward, inverse), the dihedral views of Predictor's _TTA
_TTA: list[tuple[Any, Any]] = [
    (lambda a: a, lambda a: a),
    (lambda a: a[..., ::-1], lambda a: a[..., ::-1]),
    (lambda a: a[..., ::-1, :], lambda a: a[..., ::-1, :]),
    (lambda a: np.rot90(a, 1, (-2, -1)), lambda a: np.rot90(a, -1, (-2, -1))),
    (lambda a: np.rot90(a, 2, (-2, -1)), lambda a: np.rot90(a, -2, (-2, -1))),
    (lambda a: np.rot90(a, 3, (-2, -1)), lambda a: np.rot90(a, -3, (-2, -1))),
]


class OnnxPredictor:
    """An ONNX bundle on ONNX Runtime: :meth:`run_batch` turns ``(N, C, H, W)`` inputs into probabilities.

    Args:
        model: the loaded ONNX bundle (its ``module`` an :class:`~geoseg.model.onnxrt.OnnxSession`, or a torch
            wrapper of one; only the bundle's file is used).
        device: ``auto``, ``cpu`` or ``cuda``.
        precision: ``auto``, ``fp32`` or ``int8`` (:func:`onnx_precision`).
        tta: average the probabilities over flips and 90-degree rotations (6x the model work).
        backend: ``onnxruntime`` or ``openvino`` (OpenVINO's CPU plugin; the ``openvino`` package).
    """

    torch_cuda = False  # numpy in, numpy out, on any device
    amp_dtype = None

    def __init__(self, model: LoadedModel, device: str = "auto", precision: str = "auto", tta: bool = False,
                 backend: str = "onnxruntime"):
        self.backend = backend
        self.contract = model.contract
        self.bundle = model.bundle
        path = model.bundle.weights_path
        self.device = onnx_device(device)
        self.int8_bundle = is_int8_bundle(model.bundle)
        self.precision = onnx_precision(precision, path, self.int8_bundle)
        self.tta = tta
        self.sigmoid = self.contract.model.activation == "sigmoid"
        self.overflowed = 0
        module = model.module
        given = (module if backend == "onnxruntime" and isinstance(module, OnnxSession)
                 and module.device_type == self.device.type else None)
        if given is None and isinstance(module, OnnxSession):
            module.release()  # the loader's ONNX Runtime session (it checked the graph): not what runs here
        fp32_path = path.parent / FP32_FILE if self.int8_bundle else path
        self.fp32: Any = None  # an OnnxSession or OpenVinoSession
        if fp32_path.is_file():
            self.fp32 = (given if given is not None and not self.int8_bundle
                         else make_session(fp32_path, self.device.type, backend))
        self.session: Any = None  # what runs the chips; the int8 one is made on the first batch
        if self.precision == "fp32":
            self.session = self.fp32
        elif self.int8_bundle:
            self.session = given or make_session(path, self.device.type, backend)
        self._checked = self.precision == "fp32"
        self._refused: InputError | None = None  # the first batch's refusal, raised again for every later batch
        self._spread: np.ndarray | None = None  # the engine's check chips (add_check_chips)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.agreement: float | None = None

    def _probabilities(self, session: Any, x: np.ndarray) -> np.ndarray:
        out = session.run(x)
        if not np.isfinite(out).all():
            if not self.overflowed:
                log.warning("the network's outputs held inf or NaN; those pixels take the largest finite value. If "
                            "the class map looks wrong, check the scene's values against the model's normalisation")
            self.overflowed += 1
            big = float(np.finfo(np.float32).max)
            out = np.nan_to_num(out, nan=-big, posinf=big, neginf=-big)
        if session.output != "probabilities":
            if self.sigmoid:
                out = 1 / (1 + np.exp(-out[:, :1]))
            else:
                out = softmax(out.astype(np.float32, copy=False))
        if out.shape[1] == 1:  # one sigmoid channel: background and foreground
            out = np.concatenate([1 - out, out], axis=1)
        return out.astype(np.float32, copy=False)

    def _classes_in_slices(self, session: Any, x: np.ndarray, n: int) -> np.ndarray:
        """The arg max class index ``(N, H, W)`` of ``x``'s probabilities, run ``n`` chips at a time, the job's
        batch: a runtime keeps the memory of the largest batch it ran for the rest of the job, and only the
        indexes are kept (the probabilities of the check chips would be 4 bytes a class a pixel)."""
        n = max(1, n)
        return np.concatenate([self._probabilities(session, x[i:i + n]).argmax(1).astype(np.uint16)
                               for i in range(0, len(x), n)])

    def _quantize(self, first: np.ndarray, step: tuple[str, str]) -> Any:
        """An int8 network quantised from the float32 one at ``step`` (the convolutions of its float level kept
        float32, its calibration), calibrated on the bundle's chips or ``first``."""
        assert self.fp32 is not None
        chips = bundle_calibration(self.bundle)
        if chips is None:
            log.warning("%s: the bundle carries no calibration chips (calibration.npz); int8 calibrates on the "
                        "job's first %d chip(s); export with --int8 to calibrate on training chips",
                        self.bundle.path, len(first))
            chips = first
        level, calibration = step
        out = int8_cache_path(Path(self.fp32.path), chips, step)
        if out.is_file():
            log.info("int8 (float32 kept: %s): the network quantised by an earlier run (%s)", step_name(step), out)
            return make_session(out, self.device.type, self.backend)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with staged_file(out) as tmp:
                quantize_onnx(self.fp32.path, tmp, chips, level=level, calibration=calibration)
        except OSError as exc:  # a temporary folder that cannot be written: quantise for this run only
            log.debug("int8 cache %s not written (%s)", out, exc)
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="geoseg-int8-")
            out = Path(self._tmp.name) / f"model.int8.{level}.{calibration}.onnx"
            quantize_onnx(self.fp32.path, out, chips, level=level, calibration=calibration)
        return make_session(out, self.device.type, self.backend)

    def wants_check_chips(self) -> bool:
        """Whether the int8 check is still to come and would take the engine's check chips."""
        return not self._checked and self._refused is None and self._spread is None and self.fp32 is not None

    def add_check_chips(self, chips: np.ndarray) -> None:
        """Chips ``(N, C, H, W)`` float32, normalised, of the first batch's size, from the job's first scene
        (its first chip and others spread over it): the int8 check runs on them instead of the first batch."""
        if len(chips):
            self._spread = np.ascontiguousarray(chips, dtype=np.float32)

    def _first_batch(self, first: np.ndarray) -> None:
        """Make the int8 network if needed and check it against float32 on the engine's check chips (else on
        this first batch); refuse it below the bar."""
        if self.fp32 is None:
            log.warning("%s: an int8 export without its float32 network (%s); int8 runs unchecked against fp32",
                        self.bundle.path, FP32_FILE)
            self._checked = True
            return
        spread, self._spread = self._spread, None
        if spread is not None and spread.shape[1:] == first.shape[1:]:
            batch, where = spread, f"{len(spread)} chips of the scene (its first and others spread over it)"
        else:
            batch, where = first, f"the job's first batch ({len(first)} chip(s))"
        ref = self._classes_in_slices(self.fp32, batch, len(first))
        self.fp32.release()  # only the int8 network runs from here: the two never hold memory together
        start = int8_step(self.bundle) if self.int8_bundle else INT8_STEPS[0]  # an export's own step first
        agree, best = 0.0, (-1.0, start)
        for i, step in enumerate(INT8_STEPS[INT8_STEPS.index(start):]):
            if i:  # the step before fell short
                log.info("int8 agrees with fp32 on %.2f %% of the checked pixels; quantising again (float32 "
                         "kept: %s)", 100 * agree, step_name(step))
                self.session.release()
            if i or self.session is None:
                self.session = self._quantize(batch, step)
            self.agreement = agree = class_agreement(self._classes_in_slices(self.session, batch, len(first)), ref)
            best = max(best, (agree, step))
            log.info("int8 (float32 kept: %s): %.4f %% arg max agreement with fp32 on %s", step_name(step),
                     100 * agree, where)
            if agree >= MIN_AGREEMENT:
                break
        else:
            # said once: the batches queued behind this one get the same error, not another round of quantising
            self.agreement = best[0]
            self._refused = InputError(
                f"{self.bundle.path}: int8 agrees with fp32 on only {100 * best[0]:.2f} % of the pixels of "
                f"{where} (best of {i + 1} quantisation(s), float32 kept: "
                f"{step_name(best[1])}; at least {100 * MIN_AGREEMENT:.1f} % needed); use --precision fp32")
            raise self._refused
        self._checked = True

    def release(self) -> None:
        """Free the networks' sessions once the job's chips are done (so that finishing the maps, the quicklook
        and the polygons do not run beside the network's memory); a later batch makes them again."""
        for session in (self.session, self.fp32):
            if session is not None:
                session.release()

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities ``(N, K, H, W)`` float32 (C-contiguous) of a batch ``(N, C, H, W)`` float32.

        Raises:
            InputError: on the first batch, when int8 disagrees with fp32 on too many pixels.
        """
        if self._refused is not None:
            raise self._refused
        if not self._checked:
            self._first_batch(batch)
        session = self.session
        assert session is not None
        views = _TTA if self.tta else _TTA[:1]
        probs: np.ndarray | None = None
        for fwd, inv in views:
            p = inv(self._probabilities(session, np.ascontiguousarray(fwd(batch))))
            probs = p if probs is None else probs + p
        assert probs is not None
        if len(views) > 1:
            probs = probs / len(views)
        return np.ascontiguousarray(probs, dtype=np.float32)
