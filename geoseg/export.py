"""Export a model bundle's network to ONNX or TorchScript, with its contract beside it.

The export folder holds the network file and ``model.json``: the bundle's contract with ``weights``
naming the exported file and ``metadata.export`` describing it. The network maps a normalised float32
batch ``image (N, C, H, W)`` to ``logits (N, K, H, W)`` (``K = 1`` for a sigmoid model); normalisation
(``input.mean``/``input.std``, raw units), band order, classes, chip size and overlap are in the contract,
so a runtime without geoseg can reproduce ``geoseg predict``. Batch, height and width are dynamic (height
and width must stay multiples of the network's input divisor, given in ``metadata.export``).

After writing, the exported network is run on a random batch and compared with the PyTorch one.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoseg.bundle import CONTRACT_FILE, Bundle, LoadedModel, load_model, staged_directory, write_contract
from geoseg.errors import BundleError, OutputExistsError, unknown_name
from geoseg.models import input_divisor

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    """The export folder, the network file in it, its contract file and the check's largest difference."""

    folder: Path
    model_path: Path
    contract_path: Path
    format: str
    max_abs_diff: float | None


def _sample(loaded: LoadedModel, size: int | None = None, batch: int = 1, seed: int = 0) -> torch.Tensor:
    c = loaded.contract
    div = input_divisor(c.model)
    side = size or min(c.chip_size, 256)
    side = max(div, (side // div) * div)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c.in_channels, side, side, generator=g)


def _export_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise BundleError("ONNX export needs the onnx package (pip install onnx onnxscript)") from None
    dynamic = {"image": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch", 2: "height", 3: "width"}}
    import warnings

    # the TorchScript-based exporter is deprecated upstream, but it handles dynamic H/W of smp models
    # without the extra dependencies of the dynamo exporter
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (example,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)


def _export_torchscript(net: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on static shapes
        traced = torch.jit.trace(net, example, check_trace=False)
    traced.save(str(path))


@functools.lru_cache(maxsize=4)
def _onnx_session(path: str, mtime: float) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise BundleError("running ONNX needs onnxruntime (pip install onnxruntime)") from None
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=4)
def _torchscript_module(path: str, mtime: float) -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated in favour of torch.export
        module = torch.jit.load(path, map_location="cpu")
    return module.eval()


def run_onnx(path: str | os.PathLike[str], image: np.ndarray) -> np.ndarray:
    """Run an exported ONNX network on a float32 batch ``(N, C, H, W)``; logits ``(N, K, H, W)``."""
    p = os.fspath(path)
    sess = _onnx_session(p, os.path.getmtime(p))
    return sess.run(["logits"], {"image": np.ascontiguousarray(image, dtype=np.float32)})[0]  # type: ignore[no-any-return]


def run_torchscript(path: str | os.PathLike[str], image: np.ndarray) -> np.ndarray:
    """Run an exported TorchScript network on a float32 batch ``(N, C, H, W)``; logits ``(N, K, H, W)``."""
    p = os.fspath(path)
    module = _torchscript_module(p, os.path.getmtime(p))
    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))).numpy()  # type: ignore[no-any-return]


EXPORTERS: dict[str, tuple[str, Callable[..., None], Callable[..., np.ndarray]]] = {
    "onnx": ("model.onnx", _export_onnx, run_onnx),
    "torchscript": ("model.torchscript.pt", _export_torchscript, run_torchscript),
}


def export(
    bundle: LoadedModel | Bundle | str | os.PathLike[str],
    format: str = "onnx",
    output: str | os.PathLike[str] | None = None,
    *,
    opset: int = 17,
    overwrite: bool = False,
    check: bool = True,
) -> ExportResult:
    """Write the bundle's network as ONNX or TorchScript into a folder, with ``model.json`` beside it.

    Args:
        bundle: a loaded model, a bundle or a bundle path.
        format: ``onnx`` or ``torchscript``.
        output: the export folder; default ``<bundle>-<format>`` beside the bundle.
        opset: ONNX opset version.
        overwrite: replace an existing export folder.
        check: run the exported network on a random batch (two sizes) and compare with PyTorch.

    Returns:
        An :class:`ExportResult`.

    Raises:
        UnknownNameError: an unknown format (the message lists the valid ones).
        OutputExistsError: the folder exists and ``overwrite`` is false.
        BundleError: the exporter's package is missing, or the exported network disagrees with PyTorch.
    """
    if format not in EXPORTERS:
        raise unknown_name("export format", format, list(EXPORTERS))
    loaded = bundle if isinstance(bundle, LoadedModel) else load_model(bundle)
    src = Path(loaded.bundle.path)
    folder = Path(output) if output is not None else src.with_name(f"{src.stem}-{format}")
    if folder.exists() and not overwrite:
        raise OutputExistsError(f"{folder}: already exists; pass --overwrite or choose another --output")
    filename, exporter, runner = EXPORTERS[format]
    net = loaded.module.eval().to("cpu")
    example = _sample(loaded)
    with staged_directory(folder) as tmp:
        exporter(net, example, tmp / filename, opset)
        diff = None
        if check:
            diff = _check(net, runner, tmp / filename, loaded)
        c = loaded.contract
        meta = dict(c.metadata)
        meta["export"] = {
            "format": format, "source_bundle": str(src), "input": "image", "output": "logits",
            "input_layout": "NCHW float32, (raw - input.mean) / input.std, invalid pixels 0",
            "output_layout": "NCHW logits; softmax over K classes (or sigmoid of one logit)",
            "input_divisor": input_divisor(c.model), "opset": opset if format == "onnx" else None,
            "torch": torch.__version__, "max_abs_diff": diff,
        }
        write_contract(tmp, c.model_copy(update={"weights": filename, "metadata": meta}))
    log.info("exported %s to %s", src, folder / filename)
    return ExportResult(folder, folder / filename, folder / CONTRACT_FILE, format, diff)


def _check(net: torch.nn.Module, runner: Callable[..., np.ndarray], path: Path, loaded: LoadedModel) -> float:
    worst = 0.0
    div = input_divisor(loaded.contract.model)
    for batch, size in ((1, None), (2, max(div, 2 * div, 96 // div * div))):
        x = _sample(loaded, size, batch, seed=batch)
        with torch.no_grad():
            ref = net(x).numpy()
        got = runner(path, x.numpy())
        if got.shape != ref.shape:
            raise BundleError(f"{path}: exported network gives shape {got.shape}, PyTorch {ref.shape}")
        diff = float(np.abs(got - ref).max())
        scale = float(np.abs(ref).max()) or 1.0
        if diff > 1e-3 * max(scale, 1.0):
            raise BundleError(f"{path}: exported network differs from PyTorch by {diff:.3g}; report this "
                              "architecture as not exportable")
        worst = max(worst, diff)
    return worst


__all__ = ["export", "ExportResult", "EXPORTERS", "run_onnx", "run_torchscript"]
