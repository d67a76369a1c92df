"""The model bundle: the contract between a trained model and every scene it predicts.

A bundle is either a directory holding ``model.json`` (the contract) and its weights file, or a single
``.safetensors`` or ``.onnx`` file whose metadata carries the contract under ``geoseg_contract``. The weights
are safetensors (what training writes), ONNX or TorchScript (what ``geoseg export`` writes), told apart by the
file's name (:func:`weights_format`) and loaded by :mod:`geoseg.model.weights`; pickle-based weights are refused,
and a network file is only read once its contract validated.

This module does not import torch; :func:`geoseg.model.weights.load_model` does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from geoseg.errors import BundleError
from geoseg.io.store import staged_directory, staged_file
from geoseg.model.contract import CONTRACT_FILE, METADATA_KEY, WEIGHTS_FILE, Contract

if TYPE_CHECKING:
    import torch


log = logging.getLogger(__name__)

@dataclass
class Bundle:
    """A contract and where its weights are. Cheap: no torch, no weights read."""

    contract: Contract
    path: Path
    weights_path: Path
    source: str | None = None  # the URL it was fetched from (``s3://...``), when it was not local

    @property
    def name(self) -> str:
        return self.contract.name

    @property
    def format(self) -> str:
        """The weights' format: ``safetensors``, ``onnx`` or ``torchscript`` (:mod:`geoseg.model.weights`)."""
        return weights_format(self.weights_path)

    @property
    def files(self) -> list[Path]:
        """The files that make the bundle (its contract and its weights), in a fixed order."""
        if self.path.is_dir():
            return [self.path / CONTRACT_FILE, self.weights_path]
        return [self.path]


@dataclass
class LoadedModel:
    """A bundle with its network built and its weights loaded (in eval mode, on the CPU).

    ``module`` is a ``torch.nn.Module`` (:func:`geoseg.model.weights.load_model`), or for an ONNX bundle loaded
    without torch an :class:`~geoseg.model.onnxrt.OnnxSession` (:func:`geoseg.model.onnxrt.load_onnx_model`).
    """

    bundle: Bundle
    module: Any
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def contract(self) -> Contract:
        return self.bundle.contract

    @property
    def format(self) -> str:
        return self.bundle.format


def _parse_contract(data: Any, where: Path) -> Contract:
    try:
        return Contract.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise BundleError(
            f"{where}: invalid model contract at '{loc}': {first['msg']} ({len(exc.errors())} problem(s)); "
            "fix the bundle's model.json or re-export it with geoseg"
        ) from None


def read_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read a bundle's contract without loading weights or torch.

    A URL (``s3://bucket/models/landcover``: a bundle folder, or a ``.safetensors`` file) is fetched first
    into a local cache (:func:`fetch_bundle`); the bundle's ``source`` then names the URL.

    Raises:
        BundleError: the path is missing, is not a bundle, or its contract does not validate.
    """
    from geoseg.io.remote import is_remote

    if is_remote(path):
        url = os.fspath(path)
        bundle = read_bundle(fetch_bundle(url))
        bundle.source = url
        return bundle
    p = Path(path)
    if not p.exists():
        raise BundleError(f"{p}: no such model bundle; give a bundle directory (with {CONTRACT_FILE}) "
                          "or a .safetensors or .onnx file made by geoseg")
    if p.is_dir():
        cfile = p / CONTRACT_FILE
        if not cfile.is_file():
            raise BundleError(f"{p}: not a model bundle (no {CONTRACT_FILE} inside); "
                              "point --model at a directory written by geoseg train, demo or export")
        try:
            data = json.loads(cfile.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"{cfile}: cannot read the contract ({exc}); restore or re-export the bundle") from None
        contract = _parse_contract(data, cfile)
        weights = p / contract.weights
        weights_format(weights)  # refuses pickles before anything reads them
        if not weights.is_file():
            raise BundleError(f"{p}: weights file {contract.weights!r} is missing; re-export the bundle")
        return Bundle(contract, p, weights)
    if p.suffix == ".json":
        return read_bundle(p.parent)
    if p.suffix.lower() == ".onnx":
        return _onnx_bundle(p)
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(p), framework="numpy") as f:
                meta = f.metadata() or {}
        except Exception as exc:  # safetensors raises its own error types
            raise BundleError(f"{p}: not a readable safetensors file ({exc})") from None
        if METADATA_KEY not in meta:
            raise BundleError(f"{p}: safetensors file without a geoseg contract in its metadata; "
                              "save it with geoseg.save_bundle or use a bundle directory")
        try:
            data = json.loads(meta[METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise BundleError(f"{p}: the embedded contract is not JSON ({exc})") from None
        return Bundle(_parse_contract(data, p), p, p)
    if (p.parent / CONTRACT_FILE).is_file():
        return read_bundle(p.parent)
    raise BundleError(f"{p}: not a model bundle; expected a directory, a .safetensors or an .onnx file")


def _onnx_bundle(p: Path) -> Bundle:
    """An ``.onnx`` file: the bundle folder it sits in, or a single file carrying its contract (geoseg export
    writes it into the graph's metadata)."""
    beside = p.parent / CONTRACT_FILE
    if beside.is_file():
        bundle = read_bundle(p.parent)
        if bundle.weights_path.name == p.name:
            return bundle
    try:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        meta = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]).get_modelmeta()
        text = meta.custom_metadata_map.get(METADATA_KEY)
    except ImportError:
        raise BundleError(f"{p}: reading an ONNX model needs onnxruntime (pip install onnxruntime)") from None
    except Exception as exc:  # onnxruntime's own error types
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise BundleError(f"{p}: not a readable ONNX model ({first})") from None
    if text is None:
        raise BundleError(f"{p}: an ONNX file without a geoseg contract (no model.json beside it, none in its "
                          "metadata); export it with geoseg export, or write a model.json naming it")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{p}: the embedded contract is not JSON ({exc})") from None
    return Bundle(_parse_contract(data, p), p, p)


def bundle_digest(paths: list[Path]) -> str:
    """SHA-256 over the bundle's files (contract and weights), streamed."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:32]


def fetch_bundle(url: str, digest: str | None = None) -> Path:
    """Download the bundle at ``url`` (a folder with ``model.json`` and its weights, or a ``.safetensors``
    file) into a local cache folder, whole, and return the local path. Fetched afresh on every call: a job
    checks what it fetched by digest, so a changed bundle is never mixed with an old copy.

    With ``digest``, a cached copy with that digest is used as it is (the workers of one machine fetch once).

    Raises:
        BundleError: nothing like a bundle is at ``url``.
        StorageError: the storage cannot be read (credentials, bucket).
    """
    import tempfile

    from geoseg.io.store import Store

    url = url.rstrip("/")
    folder, _, name = url.rpartition("/")
    cache = Path(tempfile.gettempdir()) / "geoseg-bundles" / hashlib.sha256(url.encode()).hexdigest()[:16]
    single = name.endswith((".safetensors", ".onnx"))  # a single-file bundle
    cached = cache / name if single else cache / "bundle"
    if digest is not None and cached.exists():
        with contextlib.suppress(BundleError, OSError):
            if bundle_digest(read_bundle(cached).files) == digest:
                return cached
    cache.mkdir(parents=True, exist_ok=True)
    if single:
        src = Store(folder)
        if not src.exists(name):
            raise BundleError(f"{url}: no such model bundle; check the URL")
        with staged_file(cache / name) as tmp:
            src.fetch(name, tmp)
        return cache / name
    src = Store(url)
    text = src.read_text(CONTRACT_FILE)
    if text is None:
        raise BundleError(f"{url}: not a model bundle (no {CONTRACT_FILE} there); give the folder written by "
                          "geoseg train, uploaded whole")
    try:
        weights = str(json.loads(text).get("weights", WEIGHTS_FILE))
    except (json.JSONDecodeError, AttributeError):
        raise BundleError(f"{url}/{CONTRACT_FILE}: not a JSON contract; re-upload the bundle") from None
    with staged_directory(cache / "bundle") as tmp:
        (tmp / CONTRACT_FILE).write_text(text)
        src.fetch(weights, tmp / weights)
    return cache / "bundle"


FORMATS = ("safetensors", "onnx", "torchscript")
TORCHSCRIPT_SUFFIX = ".torchscript.pt"
_PICKLED = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


def weights_format(name: str | Path) -> str:
    """The format of a weights file, from its name.

    Raises:
        BundleError: pickle-based or unknown weights.
    """
    n = Path(name).name.lower()
    if n.endswith(".safetensors"):
        return "safetensors"
    if n.endswith(".onnx"):
        return "onnx"
    if n.endswith(TORCHSCRIPT_SUFFIX):
        return "torchscript"
    if n.endswith(_PICKLED):
        raise BundleError(
            f"{name}: pickle-based weights are not loaded (a pickle can run code); convert the state dict once "
            "with safetensors.torch.save_file(torch.load(f, weights_only=True), 'weights.safetensors') and name "
            "that file in model.json, or export the model (geoseg export) to ONNX or TorchScript")
    raise BundleError(f"{name}: unknown weights format; a bundle's weights end in .safetensors, .onnx or "
                      f"{TORCHSCRIPT_SUFFIX}")


def save_bundle(
    path: str | os.PathLike[str], contract: Contract, network: torch.nn.Module | dict[str, torch.Tensor],
    *, overwrite: bool = False,
) -> Bundle:
    """Write a bundle atomically: a directory, or a single file when ``path`` ends in ``.safetensors``.

    Raises:
        OutputExistsError: the path exists and ``overwrite`` is false.
    """
    from safetensors.torch import save_file

    from geoseg.errors import OutputExistsError

    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExistsError(f"{p}: already exists; choose another path or pass overwrite")
    state = network if isinstance(network, dict) else network.state_dict()
    # safetensors refuses shared or non-contiguous storage: give it plain copies
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    if p.suffix == ".safetensors":
        meta = {METADATA_KEY: contract.model_dump_json()}
        with staged_file(p) as tmp:
            save_file(state, str(tmp), metadata=meta)
        return Bundle(contract, p, p)
    c = contract.model_copy(update={"weights": WEIGHTS_FILE})
    with staged_directory(p) as tmpdir:
        save_file(state, str(tmpdir / WEIGHTS_FILE))
        write_contract(tmpdir, c)
    return Bundle(c, p, p / WEIGHTS_FILE)


def write_contract(folder: Path, contract: Contract) -> Path:
    """Write ``contract`` as ``folder/model.json``."""
    path = folder / CONTRACT_FILE
    path.write_text(json.dumps(contract.model_dump(mode="json"), indent=2) + "\n")
    return path


