"""Export a model bundle's network to ONNX or TorchScript, with its contract beside it; or describe it as
a STAC MLM Item.

The export folder is itself a bundle that ``geoseg predict``, ``evaluate`` and ``info`` take: the network
file, ``model.json`` (the bundle's contract with ``weights`` naming the exported file and ``metadata.export``
describing it) and ``model.mlm.json`` (:mod:`geoseg.model.mlm`). The network takes a normalised float32 batch
``image (N, C, H, W)``; the TorchScript one gives ``logits (N, K, H, W)`` (``K = 1`` for a sigmoid model),
the ONNX one ``probabilities`` (softmax over K, or the sigmoid of one logit), as the QGIS Deepness plugin
expects. Normalisation (``input.mean``/``input.std``, raw units), band order, classes, chip size and overlap
are in the contract, so a runtime without geoseg can reproduce ``geoseg predict``. Batch, height and width
are dynamic (height and width must stay multiples of the network's input divisor, in ``metadata.export``).

The ONNX file also carries, in its ``metadata_props``, the contract (``geoseg_contract``: the ``.onnx`` file
alone is a bundle) and the keys Deepness reads (:func:`deepness_metadata`), so the model loads there with its
legend, tile size, overlap, resolution and normalisation.

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

from geoseg.errors import BundleError, InputError, OutputExistsError, unknown_name
from geoseg.io.store import staged_directory, staged_file
from geoseg.model.bundle import Bundle, LoadedModel, read_bundle, write_contract
from geoseg.model.contract import CONTRACT_FILE, METADATA_KEY, Contract
from geoseg.model.networks import first_output, input_divisor
from geoseg.model.quantize import (
    CALIBRATION_FILE,
    FP32_FILE,
    PERCENTILE,
    bundle_calibration,
    int8_backends,
    quantize_agreeing,
    scene_chips,
    step_name,
    write_calibration,
)
from geoseg.model.weights import load_model

MLM_FILE = "model.mlm.json"
# export --int8: the arg max agreement with fp32 wanted on the calibration chips, above predict's 99.5 % bar (which
# predict checks on chips the ranges were not calibrated on)
EXPORT_AGREEMENT = 0.997

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


class Probabilities(torch.nn.Module):
    """A network's class probabilities: the softmax of its logits over channels, or the sigmoid of one."""

    def __init__(self, net: torch.nn.Module, sigmoid: bool):
        super().__init__()
        self.net, self.sigmoid = net, sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = first_output(self.net(x))
        return torch.sigmoid(logits) if self.sigmoid else torch.softmax(logits, dim=1)


def deepness_metadata(c: Contract) -> dict[str, Any]:
    """The keys the QGIS Deepness plugin reads from an ONNX model's metadata (values before JSON encoding).

    Deepness scales 8-bit layers to 0..1 and then standardises, so its mean and std are the contract's
    raw-unit ones divided by 255 (the same network input for 8-bit imagery). ``seg_thresh`` 0 keeps the arg
    max of the probabilities, as geoseg does (0.5 for a one-channel sigmoid model).
    """
    meta: dict[str, Any] = {
        "model_type": "Segmentor",
        "class_names": {str(i): k.name for i, k in enumerate(c.classes)},
        "tile_size": c.chip_size,
        "tiles_overlap": round(100 * c.overlap / c.chip_size),
        "standardization_mean": [m / 255 for m in c.input.mean],
        "standardization_std": [s / 255 for s in c.input.std],
        "seg_thresh": 0.5 if c.model.activation == "sigmoid" else 0.0,
    }
    if c.input.pixel_size:
        meta["resolution"] = round(c.input.pixel_size * 100, 6)  # cm per pixel
    return meta


def _write_onnx_metadata(path: Path, contract: Contract) -> None:
    import json

    import onnx

    model = onnx.load(str(path))
    entries = {k: json.dumps(v) for k, v in deepness_metadata(contract).items()}
    entries[METADATA_KEY] = contract.model_dump_json()
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    for key, value in [*keep, *entries.items()]:
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))


def _export_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path, opset: int,
                 output: str = "logits") -> None:
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
        torch.onnx.export(net, (example,), str(path), input_names=["image"], output_names=[output],
                          dynamic_axes={"image": dynamic["image"], output: dynamic["logits"]}, opset_version=opset,
                          dynamo=False)


def _export_probabilities_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    _export_onnx(net, example, path, opset, output="probabilities")


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
    """Run an exported ONNX network on a float32 batch ``(N, C, H, W)``; its output ``(N, K, H, W)``."""
    p = os.fspath(path)
    sess = _onnx_session(p, os.path.getmtime(p))
    name = sess.get_outputs()[0].name
    return sess.run([name], {"image": np.ascontiguousarray(image, dtype=np.float32)})[0]  # type: ignore[no-any-return]


def run_torchscript(path: str | os.PathLike[str], image: np.ndarray) -> np.ndarray:
    """Run an exported TorchScript network on a float32 batch ``(N, C, H, W)``; logits ``(N, K, H, W)``."""
    p = os.fspath(path)
    module = _torchscript_module(p, os.path.getmtime(p))
    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))).numpy()  # type: ignore[no-any-return]


EXPORTERS: dict[str, tuple[str, Callable[..., None], Callable[..., np.ndarray]]] = {
    "onnx": ("model.onnx", _export_probabilities_onnx, run_onnx),
    "torchscript": ("model.torchscript.pt", _export_torchscript, run_torchscript),
}


FORMATS = (*EXPORTERS, "mlm")


def mlm_path(src: Path) -> Path:
    """Where ``geoseg export --format mlm`` writes a bundle's Item by default: ``<bundle>.mlm.json`` beside it."""
    name = src.name[: -len(".safetensors")] if src.name.endswith(".safetensors") else src.stem if src.is_file() \
        else src.name
    return src.with_name(f"{name}.mlm.json")


def write_mlm(bundle: Bundle, path: Path, *, overwrite: bool = False) -> Path:
    """Write the STAC MLM Item of ``bundle`` (:func:`geoseg.model.mlm.mlm_item`) to ``path``, atomically."""
    import json

    from geoseg.model.mlm import mlm_item

    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists; pass --overwrite or choose another --output-dir")
    item = mlm_item(bundle, path)
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(item, indent=2) + "\n")
    return path


def export(
    bundle: LoadedModel | Bundle | str | os.PathLike[str],
    format: str = "onnx",
    output: str | os.PathLike[str] | None = None,
    *,
    opset: int = 17,
    overwrite: bool = False,
    check: bool = True,
    int8: bool = False,
    calibration: str | os.PathLike[str] | None = None,
) -> ExportResult:
    """Write the bundle's network as ONNX or TorchScript into a folder, with ``model.json`` beside it; or,
    with ``format="mlm"``, the bundle's STAC MLM Item.

    Args:
        bundle: a loaded model, a bundle or a bundle path.
        format: ``onnx``, ``torchscript`` or ``mlm``.
        output: the export folder (the Item's file for ``mlm``); default ``<bundle>-<format>`` (or
            ``<bundle>.mlm.json``) beside the bundle.
        opset: ONNX opset version.
        overwrite: replace an existing export folder or Item.
        check: run the exported network on a random batch (two sizes) and compare with PyTorch.
        int8: ONNX only: quantise the network to int8 (:func:`geoseg.model.quantize.quantize_onnx`), calibrated
            on the bundle's ``calibration.npz`` (what ``geoseg train`` writes) or on chips of ``calibration``;
            the float32 network stays beside it as ``model.fp32.onnx`` for predict's agreement check.
        calibration: a scene whose chips calibrate int8 (instead of, or for want of, the bundle's).

    Returns:
        An :class:`ExportResult`.

    Raises:
        UnknownNameError: an unknown format (the message lists the valid ones).
        OutputExistsError: the output exists and ``overwrite`` is false.
        BundleError: the exporter's package is missing, the bundle is an export already, the exported
            network disagrees with PyTorch, or int8 has no calibration chips.
    """
    if format not in FORMATS:
        raise unknown_name("export format", format, list(FORMATS))
    if (int8 or calibration is not None) and format != "onnx":
        raise InputError(f"--int8 and --calibration quantise an ONNX network, not {format}; use --format onnx")
    if format == "mlm":
        b = bundle.bundle if isinstance(bundle, LoadedModel) else bundle if isinstance(bundle, Bundle) \
            else read_bundle(bundle)
        path = write_mlm(b, Path(output) if output is not None else mlm_path(Path(b.path)), overwrite=overwrite)
        log.info("wrote the MLM item of %s to %s", b.path, path)
        return ExportResult(path.parent, b.weights_path, path, format, None)
    loaded = bundle if isinstance(bundle, LoadedModel) else load_model(bundle)
    src = Path(loaded.bundle.path)
    if loaded.format != "safetensors":
        raise BundleError(f"{src}: is a {loaded.format} export already; export from the safetensors bundle it "
                          "came from (metadata.export.source_bundle names it)")
    folder = Path(output) if output is not None else src.with_name(f"{src.stem}-{format}")
    if folder.exists() and not overwrite:
        raise OutputExistsError(f"{folder}: already exists; pass --overwrite or choose another --output-dir")
    filename, exporter, runner = EXPORTERS[format]
    c = loaded.contract
    net = loaded.module.eval().to("cpu")
    if format == "onnx":
        net = Probabilities(net, c.model.activation == "sigmoid").eval()
    example = _sample(loaded)
    chips = _calibration_chips(loaded, calibration) if format == "onnx" else None
    if int8 and chips is None:
        raise BundleError(f"{src}: no calibration chips for int8 (the bundle has no {CALIBRATION_FILE}; bundles "
                          "trained before it have none); pass --calibration SCENE.tif, a scene like the ones it maps")
    with staged_directory(folder) as tmp:
        exporter(net, example, tmp / filename, opset)
        diff = _check(net, runner, tmp / filename, loaded) if check else None
        output_name = "probabilities" if format == "onnx" else "logits"
        meta = dict(c.metadata)
        meta["export"] = {
            "format": format, "source_bundle": str(src), "input": "image", "output": output_name,
            "input_layout": "NCHW float32, (raw - input.mean) / input.std, invalid pixels 0",
            "output_layout": ("NCHW probabilities: softmax over K classes (or sigmoid of one logit)"
                              if format == "onnx" else "NCHW logits; softmax over K classes (or sigmoid of one logit)"),
            "input_divisor": input_divisor(c.model), "opset": opset if format == "onnx" else None,
            "torch": torch.__version__, "max_abs_diff": diff,
        }
        if chips is not None:
            write_calibration(tmp / CALIBRATION_FILE, chips)
        if int8:
            assert chips is not None
            meta["export"]["precision"] = "int8"
            meta["export"]["int8"] = _quantize(tmp / filename, chips, str(calibration or CALIBRATION_FILE))
        contract = c.model_copy(update={"weights": filename, "metadata": meta})
        if format == "onnx":
            _write_onnx_metadata(tmp / filename, contract)
            if int8:
                _write_onnx_metadata(tmp / FP32_FILE, contract.model_copy(update={"weights": FP32_FILE}))
        write_contract(tmp, contract)
        write_mlm(read_bundle(tmp), tmp / MLM_FILE)
    log.info("exported %s to %s", src, folder / filename)
    return ExportResult(folder, folder / filename, folder / CONTRACT_FILE, format, diff)


def _calibration_chips(loaded: LoadedModel, scene: str | os.PathLike[str] | None) -> np.ndarray | None:
    """Chips to calibrate int8 on: from ``scene`` when given, else the bundle's ``calibration.npz``, else None."""
    if scene is not None:
        return scene_chips(scene, loaded.contract)
    return bundle_calibration(loaded.bundle)


def _quantize(path: Path, chips: np.ndarray, source: str) -> dict[str, Any]:
    """Quantise ``path`` in place (the float32 network moves to ``model.fp32.onnx``) at the first step of
    :data:`~geoseg.model.quantize.INT8_STEPS` (float level, calibration) whose agreement with fp32 on the
    calibration chips reaches :data:`EXPORT_AGREEMENT` in every CPU runtime installed
    (:func:`~geoseg.model.quantize.int8_backends`: OpenVINO's int8 kernels flip other pixels than ONNX
    Runtime's, and a step that falls short in the runtime predict uses is quantised again there, at every run);
    the step and the agreements, as export metadata."""
    fp32 = path.with_name(FP32_FILE)
    path.rename(fp32)
    backends = int8_backends()
    (level, method), agree, each = quantize_agreeing(fp32, path, chips, chips, EXPORT_AGREEMENT, backends=backends)
    log.info("int8 (float32 kept: %s): %.4f %% arg max agreement with fp32 on %d calibration chips (lowest of %s)",
             step_name((level, method)), 100 * agree, len(chips), ", ".join(backends))
    ranges = "min-max" if method == "minmax" else f"{PERCENTILE}th percentile"
    return {"calibration": source, "calibration_chips": len(chips), "agreement": round(agree, 6),
            "agreement_by_backend": {b: round(a, 6) for b, a in each.items()},
            "float32": level, "calibration_method": method, "fp32_network": FP32_FILE,
            "quantization": f"ONNX Runtime static QDQ, per-channel int8 weights, uint8 activations, {ranges} "
            f"calibration; float32 kept: the stem and depthwise convolutions{' and the decoder' if level == 'decoder' else ''}"}


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


__all__ = ["export", "ExportResult", "EXPORTERS", "FORMATS", "Probabilities", "deepness_metadata", "run_onnx",
           "run_torchscript", "write_mlm", "mlm_path"]
