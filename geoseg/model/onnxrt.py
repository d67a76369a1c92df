"""ONNX models in ONNX Runtime, with numpy only: no torch, no segmentation-models-pytorch.

An analyst who runs exported models (``geoseg export --format onnx``) needs numpy and ``onnxruntime``, not
the training stack. :class:`OnnxSession` maps a float32 ``(N, C, H, W)`` array to the model's output
``(N, K, H, W)`` (``probabilities`` as geoseg exports them for QGIS Deepness, or ``logits``), and
:func:`load_onnx_model` loads an ONNX bundle as a :class:`~geoseg.model.bundle.LoadedModel` whose module is
that session. :mod:`geoseg.model.weights` wraps the same session as a torch module for the PyTorch-side
callers (evaluate, the eager checks).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from geoseg.errors import BundleError, InputError
from geoseg.io.workers import cpu_cores, release_freed_memory
from geoseg.model.bundle import Bundle, LoadedModel, read_bundle

log = logging.getLogger(__name__)

ONNX_INPUT = "image"
ONNX_OUTPUTS = ("logits", "probabilities")  # what geoseg exports (probabilities since issue 12)

_threads: int | None = None  # intra-op threads of new sessions; None: torch's when torch is loaded, else the cores

__all__ = ["ONNX_BACKENDS", "ONNX_INPUT", "ONNX_OUTPUTS", "OnnxSession", "OpenVinoSession", "import_ort",
           "make_session", "load_onnx_model", "onnx_metadata",
           "ort_providers", "probabilities_to_logits", "session_threads", "set_session_threads", "softmax"]


def import_ort() -> Any:
    """The ``onnxruntime`` module, or an :class:`InputError` that says how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise InputError("an ONNX bundle runs in ONNX Runtime: pip install onnxruntime (onnxruntime-gpu for "
                         "CUDA)") from None
    return onnxruntime


def set_session_threads(n: int | None) -> None:
    """The intra-op threads of sessions made from now on in this process (a dask worker's ``--nthreads``)."""
    global _threads
    _threads = n


def session_threads() -> int:
    """Intra-op threads for a new session: as set, else as many as torch uses when torch is already loaded
    (so the two runtimes share the cores alike), else the CPU cores this process may use."""
    if _threads is not None:
        return max(1, _threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        return int(torch.get_num_threads())
    return cpu_cores()


def ort_providers(device: str) -> list[str]:
    """ONNX Runtime providers for a device type (``cpu`` or ``cuda``): CUDA first where asked for and available."""
    ort = import_ort()
    if device == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.warning("ONNX Runtime has no CUDA provider here (pip install onnxruntime-gpu); the ONNX model runs "
                    "on the CPU")
    return ["CPUExecutionProvider"]


def softmax(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """The softmax of float32 logits over ``axis``, in float32."""
    z = logits - logits.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z


def probabilities_to_logits(p: np.ndarray) -> np.ndarray:
    """Logits whose softmax (or sigmoid, for one channel) is ``p`` ``(N, K, H, W)``; finite for p of 0 or 1."""
    if p.shape[1] == 1:
        q = np.clip(p, 1e-7, 1 - 1e-7)
        return np.log(q) - np.log1p(-q)  # type: ignore[no-any-return]
    return np.log(np.maximum(p, np.finfo(np.float32).tiny))  # type: ignore[no-any-return]


class OnnxSession:
    """An ONNX segmentation model in ONNX Runtime: ``run(x)`` maps float32 ``(N, C, H, W)`` to its output.

    The session is made on first use with :func:`session_threads` intra-op threads, one inter-op thread, full
    graph optimisation, no spinning between runs (spinning threads would take the cores from the readers
    and writers) and no memory pattern (the arena holds one run's activations once, not twice); the memory
    freed while it is made goes back to the system (:func:`~geoseg.io.workers.release_freed_memory`). ``output`` names what :meth:`run` returns: ``probabilities`` or ``logits``.

    Args:
        path: the ``.onnx`` file.
        device: ``cpu`` or ``cuda`` (the CUDA provider of the ``onnxruntime-gpu`` package, where present).
    """

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.path = Path(path)
        self.device_type = device
        self._session: Any = None
        self.output = ""
        self.input = ONNX_INPUT

    def session(self) -> Any:
        """The ``onnxruntime.InferenceSession``, made on first use.

        Raises:
            BundleError: ONNX Runtime cannot load the file, or it is not a one-input segmentation model.
        """
        if self._session is None:
            ort = import_ort()
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = session_threads()
            opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            # one chip's activations in the CPU arena, not two: a memory pattern is planned on the first run
            # and then allocated as one more block beside the arena chunks that run left (+83 MB at a 512 px
            # chip of a U-Net resnet18, for no speed measured here). The arena itself stays (~15 % faster)
            opts.enable_mem_pattern = False
            try:
                sess = ort.InferenceSession(str(self.path), opts, providers=ort_providers(self.device_type))
            except Exception as exc:  # onnxruntime's own error types
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                raise BundleError(f"{self.path}: ONNX Runtime cannot load this model ({first}); re-export it "
                                  "with geoseg export") from None
            # the file's bytes and the weights that the optimised graph no longer uses are freed by now
            release_freed_memory()
            inputs, outputs = sess.get_inputs(), sess.get_outputs()
            if len(inputs) != 1 or not outputs:
                raise BundleError(f"{self.path}: an ONNX segmentation model takes one image input "
                                  f"(has {len(inputs)}) and gives logits or probabilities")
            names = [o.name for o in outputs]
            self.output = next((n for n in ONNX_OUTPUTS if n in names), names[0])
            self.input = inputs[0].name
            self._session = sess
        return self._session

    @property
    def gives_probabilities(self) -> bool:
        self.session()
        return self.output == "probabilities"

    @property
    def loaded(self) -> bool:
        """Whether the ONNX Runtime session is made (and holds the network and its arena in memory)."""
        return self._session is not None

    def release(self) -> None:
        """Free the session (the network's weights and its activation arena: ~200 MB for a U-Net resnet18 at
        512 px); the next use makes it again."""
        if self._session is not None:
            self._session = None
            release_freed_memory()

    def run(self, x: np.ndarray) -> np.ndarray:
        """The model's output ``(N, K, H, W)`` float32 for a batch ``(N, C, H, W)`` (made float32, NCHW-contiguous)."""
        sess = self.session()
        image = np.ascontiguousarray(x, dtype=np.float32)
        return sess.run([self.output], {self.input: image})[0]  # type: ignore[no-any-return]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(N, K, H, W)`` for a batch: the output, or logits whose softmax is its probabilities."""
        out = self.run(x)
        return probabilities_to_logits(out) if self.output == "probabilities" else out

    def check(self, bundle: Bundle) -> None:
        """The graph's input and output channel counts must be the contract's (when the graph fixes them).

        Raises:
            BundleError: they differ, or the graph is not ``(N, C, H, W)`` in and out.
        """
        sess = self.session()
        c = bundle.contract
        got_in = sess.get_inputs()[0].shape
        got_out = next(o for o in sess.get_outputs() if o.name == self.output).shape
        for what, shape, want in (("input", got_in, c.in_channels), ("output", got_out, c.out_channels)):
            if len(shape) != 4:
                raise BundleError(f"{bundle.weights_path}: the ONNX {what} has shape {shape}, not (N, C, H, W)")
            if isinstance(shape[1], int) and shape[1] != want:
                raise BundleError(f"{bundle.weights_path}: the ONNX {what} has {shape[1]} channels where the "
                                  f"contract has {want}; the model.json beside it belongs to another model")


class OpenVinoSession:
    """An ONNX model in OpenVINO's runtime, with :class:`OnnxSession`'s interface (``run``, ``output``, ``path``).

    OpenVINO reads the ONNX file (QDQ int8 graphs included) and compiles it for its CPU plugin (Intel and AMD)
    with :func:`session_threads` threads and float32 inference precision (no silent bf16). The network is
    compiled for the static shape of the batches it runs (a job's chips all have one): OpenVINO's kernels for
    a fixed shape are faster than its dynamic-shape ones and plan their memory ahead (U-Net resnet18 at 512 px
    on 2 cores: int8 22 ms a chip against 34 ms, float32 peak 312 MB against 366 MB). A smaller batch (a job's
    last) is padded to that shape; a batch of another chip size compiles the network again for that size.

    Args:
        path: the ``.onnx`` file.
        device: ``cpu`` (OpenVINO's ``CPU`` plugin).
    """

    def __init__(self, path: str | Path, device: str = "cpu"):
        self.path = Path(path)
        self.device_type = device
        self._request: Any = None
        self._shape: tuple[int, ...] | None = None  # the (N, C, H, W) the request is compiled for
        self.output = ""

    def session(self, shape: tuple[int, ...] | None = None) -> Any:
        """The compiled model's infer request for batches of ``shape`` (``None``: the shape compiled already,
        else the file's own, dynamic where it is), compiled on first use and again for another shape.

        Raises:
            InputError: the ``openvino`` package is missing.
            BundleError: OpenVINO cannot read or compile the file.
        """
        if self._request is not None and (shape is None or shape == self._shape):
            return self._request
        try:
            import openvino
        except ImportError:
            raise InputError("--backend openvino needs the openvino package: pip install openvino") from None
        if self.device_type != "cpu":
            raise InputError(f"--backend openvino runs on the CPU here, not {self.device_type}; use --device cpu")
        self.release()  # one compiled shape at a time: each holds its own memory plan
        try:
            core = openvino.Core()
            model = core.read_model(str(self.path))
            if shape is not None:
                model.reshape({0: list(shape)})
            compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": session_threads(),
                                                         "INFERENCE_PRECISION_HINT": "f32"})
        except Exception as exc:  # OpenVINO's own error types
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise BundleError(f"{self.path}: OpenVINO cannot compile this model ({first}); use --backend "
                              "onnxruntime") from None
        names = [o.get_any_name() for o in compiled.outputs]
        self.output = next((n for n in ONNX_OUTPUTS if n in names), names[0])
        self._index = names.index(self.output)
        self._request = compiled.create_infer_request()
        self._shape = shape
        return self._request

    @property
    def loaded(self) -> bool:
        """Whether the model is compiled (and holds its memory)."""
        return self._request is not None

    def release(self) -> None:
        """Free the compiled model; the next use compiles it again."""
        if self._request is not None:
            self._request = None
            self._shape = None
            release_freed_memory()

    def run(self, x: np.ndarray) -> np.ndarray:
        """The model's output ``(N, K, H, W)`` float32 for a batch ``(N, C, H, W)``."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = len(x)
        shape = self._shape
        if shape is not None and n < shape[0] and x.shape[1:] == shape[1:]:  # a short batch: padded, not recompiled
            x = np.concatenate([x, np.zeros((shape[0] - n, *x.shape[1:]), np.float32)])
        else:
            shape = x.shape
        request = self.session(tuple(shape))
        out = request.infer({0: x})
        return np.array(out[self._index][:n], dtype=np.float32)  # a copy: the request reuses its buffers


ONNX_BACKENDS = {"onnxruntime": OnnxSession, "openvino": OpenVinoSession}


def make_session(path: str | Path, device: str = "cpu", backend: str = "onnxruntime") -> Any:
    """An :class:`OnnxSession` or :class:`OpenVinoSession` for ``backend``.

    Raises:
        UnknownNameError: an unknown backend (the message lists the valid ones).
    """
    if backend not in ONNX_BACKENDS:
        from geoseg.errors import unknown_name

        raise unknown_name("ONNX backend", backend, list(ONNX_BACKENDS))
    return ONNX_BACKENDS[backend](path, device)


def load_onnx_model(path: str | Path | Bundle) -> LoadedModel:
    """An ONNX bundle loaded without torch: a :class:`LoadedModel` whose ``module`` is an :class:`OnnxSession`.

    Raises:
        BundleError: not an ONNX bundle, or ONNX Runtime cannot load it, or it does not fit its contract.
    """
    bundle = path if isinstance(path, Bundle) else read_bundle(path)
    if bundle.format != "onnx":
        raise BundleError(f"{bundle.weights_path}: a {bundle.format} bundle needs PyTorch "
                          "(geoseg.model.weights.load_model); only ONNX bundles load without it")
    session = OnnxSession(bundle.weights_path)
    session.check(bundle)
    return LoadedModel(bundle, session)


def onnx_metadata(path: Path) -> dict[str, Any]:
    """The ``metadata_props`` of an ONNX file, values parsed as JSON where they are JSON."""
    sess = OnnxSession(path).session()
    out: dict[str, Any] = {}
    for k, v in sess.get_modelmeta().custom_metadata_map.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out
