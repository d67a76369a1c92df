"""A bundle's network from its weights file, in one of three formats, chosen by the file's name.

========================  ======================  ===============================================================
weights file              format                  what runs it
========================  ======================  ===============================================================
``*.safetensors``         ``safetensors``         the contract's smp network, built here, with these weights
                                                  (what ``geoseg train`` writes; bf16/fp16 autocast, any device)
``*.onnx``                ``onnx``                ONNX Runtime: the CPU's threads, or its CUDA provider where the
                                                  ``onnxruntime-gpu`` package and a GPU are present; float32
``*.torchscript.pt``      ``torchscript``         ``torch.jit.load``: a traced network, no smp code needed
========================  ======================  ===============================================================

Every format is reached through a contract that validated first (:func:`geoseg.model.bundle.read_bundle`), so
a network file is never opened without the classes, bands and normalisation that make sense of it. No
format unpickles Python objects: safetensors holds tensors only, ONNX is a protobuf graph, and a
TorchScript archive is read by TorchScript's own loader, which builds tensors and TorchScript code but
resolves no arbitrary Python class. Pickle-based weights (``.pt``/``.pth``/``.ckpt`` state dicts) are
refused with the way to convert them.

Each loader returns a ``torch.nn.Module`` mapping a float32 ``(N, C, H, W)`` batch to logits
``(N, K, H, W)``, so the rest of geoseg runs every format the same way.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from geoseg.errors import BundleError, InputError
from geoseg.model.bundle import Bundle, LoadedModel, read_bundle, weights_format

log = logging.getLogger(__name__)

ONNX_INPUT = "image"
ONNX_OUTPUTS = ("logits", "probabilities")  # what geoseg exports (probabilities since issue 12)


# ------------------------------------------------------------------------------------------- safetensors


def _own_copy(t: torch.Tensor) -> torch.Tensor:
    """A float32 (when floating) tensor in its own memory, not a view of the weights file's buffer, so the
    file's memory is released once the network holds its weights."""
    return (t.float() if t.is_floating_point() else t).clone()


def _state_dict_network(bundle: Bundle) -> torch.nn.Module:
    from safetensors.torch import load_file

    from geoseg.model.networks import build_network

    state = {k: _own_copy(v) for k, v in load_file(str(bundle.weights_path), device="cpu").items()}
    # the network is built without memory (meta tensors) and takes the file's tensors as they are: no random
    # initialisation to overwrite, and one copy of the weights instead of two (about 100 MB less peak
    # memory for U-Net resnet18)
    with torch.device("meta"):
        net = build_network(bundle.contract)
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0]
        raise BundleError(f"{bundle.weights_path}: weights do not fit the contract's network ({msg})") from None
    if any(t.is_meta for t in (*net.parameters(), *net.buffers())):  # a buffer that is not saved with the weights
        net = build_network(bundle.contract)
        net.load_state_dict(state, strict=True)
    return net


# ------------------------------------------------------------------------------------------------ ONNX


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError("an ONNX bundle runs in ONNX Runtime: pip install onnxruntime (onnxruntime-gpu for "
                         "CUDA)") from None
    return ort


def ort_providers(device: str) -> list[str]:
    """ONNX Runtime providers for a torch device type: CUDA first where asked for and available."""
    ort = _import_ort()
    if device == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.warning("ONNX Runtime has no CUDA provider here (pip install onnxruntime-gpu); the ONNX model runs "
                    "on the CPU")
    return ["CPUExecutionProvider"]


class OnnxNetwork(torch.nn.Module):
    """An ONNX model as a torch module: ``forward`` runs it in ONNX Runtime and returns logits.

    The session is made on first use (or after :meth:`to` moves it to another device) with as many
    intra-op threads as torch uses, so a dask worker's thread setting holds. A model whose output is
    ``probabilities`` (softmax, or a sigmoid for one channel; what geoseg exports, for the QGIS Deepness
    plugin) is turned back into logits, ``log p`` (or ``log p - log(1 - p)``), whose softmax is ``p``.
    """

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.device_type = "cpu"
        self._session: Any = None
        self._output = ""

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # what .to(), .cuda() and .cpu() call
        probe = fn(torch.empty(0))
        if probe.device.type != self.device_type:
            self.device_type, self._session = probe.device.type, None
        return self

    def session(self) -> Any:
        if self._session is None:
            ort = _import_ort()
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.intra_op_num_threads = torch.get_num_threads()
            opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                sess = ort.InferenceSession(str(self.path), opts, providers=ort_providers(self.device_type))
            except Exception as exc:  # onnxruntime's own error types
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                raise BundleError(f"{self.path}: ONNX Runtime cannot load this model ({first}); re-export it "
                                  "with geoseg export") from None
            inputs, outputs = sess.get_inputs(), sess.get_outputs()
            if len(inputs) != 1 or not outputs:
                raise BundleError(f"{self.path}: an ONNX segmentation model takes one image input "
                                  f"(has {len(inputs)}) and gives logits or probabilities")
            names = [o.name for o in outputs]
            self._output = next((n for n in ONNX_OUTPUTS if n in names), names[0])
            self._input = inputs[0].name
            self._session = sess
        return self._session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sess = self.session()
        image = x.detach().float().contiguous().cpu().numpy()  # ONNX Runtime wants NCHW-contiguous memory
        out = torch.from_numpy(sess.run([self._output], {self._input: image})[0])
        if self._output == "probabilities":
            out = probabilities_to_logits(out)
        return out.to(x.device)


def probabilities_to_logits(p: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax (or sigmoid, for one channel) is ``p``; finite for p of 0 or 1."""
    tiny = torch.finfo(torch.float32).tiny
    if p.shape[1] == 1:
        q = p.clamp(1e-7, 1 - 1e-7)
        return torch.log(q) - torch.log1p(-q)
    return torch.log(p.clamp_min(tiny))


# ----------------------------------------------------------------------------------------- TorchScript


def _torchscript_network(bundle: Bundle) -> torch.nn.Module:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated for torch.export
            return torch.jit.load(str(bundle.weights_path), map_location="cpu")  # type: ignore[no-any-return]
    except Exception as exc:  # TorchScript's loader raises RuntimeError and its own types
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise BundleError(f"{bundle.weights_path}: not a TorchScript archive ({first}); re-export it with "
                          "geoseg export --format torchscript") from None


# ----------------------------------------------------------------------------------------------- all


def load_network(bundle: Bundle) -> torch.nn.Module:
    """The bundle's network in eval mode on the CPU, whatever its weights format.

    Raises:
        BundleError: the weights cannot be read or do not fit the contract.
    """
    fmt = weights_format(bundle.weights_path)
    try:
        if fmt == "onnx":
            net: torch.nn.Module = OnnxNetwork(bundle.weights_path)
            _check_onnx(net, bundle)
        elif fmt == "torchscript":
            net = _torchscript_network(bundle)
        else:
            net = _state_dict_network(bundle)
    except (BundleError, InputError):
        raise
    except Exception as exc:
        raise BundleError(f"{bundle.weights_path}: cannot read weights ({exc}); re-export the bundle") from None
    return net.eval()


def _check_onnx(net: Any, bundle: Bundle) -> None:
    """The graph's input and output channel counts must be the contract's (when the graph fixes them)."""
    sess = net.session()
    c = bundle.contract
    got_in = sess.get_inputs()[0].shape
    got_out = next(o for o in sess.get_outputs() if o.name == net._output).shape
    for what, shape, want in (("input", got_in, c.in_channels), ("output", got_out, c.out_channels)):
        if len(shape) != 4:
            raise BundleError(f"{bundle.weights_path}: the ONNX {what} has shape {shape}, not (N, C, H, W)")
        if isinstance(shape[1], int) and shape[1] != want:
            raise BundleError(f"{bundle.weights_path}: the ONNX {what} has {shape[1]} channels where the "
                              f"contract has {want}; the model.json beside it belongs to another model")


def onnx_metadata(path: Path) -> dict[str, Any]:
    """The ``metadata_props`` of an ONNX file, values parsed as JSON where they are JSON."""
    sess = OnnxNetwork(path).session()
    out: dict[str, Any] = {}
    for k, v in sess.get_modelmeta().custom_metadata_map.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


__all__ = ["OnnxNetwork", "load_network", "onnx_metadata", "ort_providers", "probabilities_to_logits"]


def load_model(path: str | os.PathLike[str] | Bundle) -> LoadedModel:
    """Load a bundle: contract, network and weights, ready for inference on the CPU.

    Args:
        path: a bundle directory, a geoseg ``.safetensors`` file, or an already read :class:`Bundle`.

    Raises:
        BundleError: the bundle is not valid or its weights do not fit its architecture.
    """
    bundle = path if isinstance(path, Bundle) else read_bundle(path)
    net = load_network(bundle)
    return LoadedModel(bundle, net)
