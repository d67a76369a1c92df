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

import logging
import os
from pathlib import Path
from typing import Any

import torch

from geoseg.errors import BundleError, InputError
from geoseg.model.bundle import Bundle, LoadedModel, read_bundle, weights_format
from geoseg.model.onnxrt import ONNX_INPUT, ONNX_OUTPUTS, OnnxSession, onnx_metadata, ort_providers

log = logging.getLogger(__name__)



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


class OnnxNetwork(torch.nn.Module):
    """An ONNX model as a torch module: ``forward`` runs it in ONNX Runtime and returns logits.

    A thin torch wrapper over :class:`geoseg.model.onnxrt.OnnxSession` (which needs no torch; ``geoseg
    predict`` runs ONNX bundles through it directly). The session is made on first use (or after :meth:`to`
    moves it to another device) with as many intra-op threads as torch uses, so a dask worker's thread
    setting holds. A model whose output is ``probabilities`` (softmax, or a sigmoid for one channel; what
    geoseg exports, for the QGIS Deepness plugin) is turned back into logits, ``log p`` (or
    ``log p - log(1 - p)``), whose softmax is ``p``.
    """

    def __init__(self, path: Path):
        super().__init__()
        self.path = path
        self.runner = OnnxSession(path)

    @property
    def device_type(self) -> str:
        return self.runner.device_type

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # what .to(), .cuda() and .cpu() call
        probe = fn(torch.empty(0))
        if probe.device.type != self.runner.device_type:
            self.runner = OnnxSession(self.path, probe.device.type)
        return self

    def session(self) -> Any:
        return self.runner.session()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.from_numpy(self.runner.run(x.detach().float().contiguous().cpu().numpy()))
        if self.runner.output == "probabilities":
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
            onnx_net = OnnxNetwork(bundle.weights_path)
            onnx_net.runner.check(bundle)
            net: torch.nn.Module = onnx_net
        elif fmt == "torchscript":
            net = _torchscript_network(bundle)
        else:
            net = _state_dict_network(bundle)
    except (BundleError, InputError):
        raise
    except Exception as exc:
        raise BundleError(f"{bundle.weights_path}: cannot read weights ({exc}); re-export the bundle") from None
    return net.eval()


__all__ = ["ONNX_INPUT", "ONNX_OUTPUTS", "OnnxNetwork", "load_network", "onnx_metadata", "ort_providers",
           "probabilities_to_logits"]


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
