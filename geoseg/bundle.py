"""The model bundle: the contract between a trained model and every scene it predicts.

A bundle is either a directory holding ``model.json`` (the contract) and its weights file, or a single
``.safetensors`` or ``.onnx`` file whose metadata carries the contract under ``geoseg_contract``. The weights
are safetensors (what training writes), ONNX or TorchScript (what ``geoseg export`` writes), told apart by the
file's name (:func:`weights_format`) and loaded by :mod:`geoseg.weights`; pickle-based weights are refused,
and a network file is only read once its contract validated.

This module does not import torch; :func:`load_model` does, when it is called.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from geoseg.errors import BundleError

if TYPE_CHECKING:
    import torch

    from geoseg.raster import SceneInfo

log = logging.getLogger(__name__)

CONTRACT_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
METADATA_KEY = "geoseg_contract"
FORMAT_VERSION = 1


class ClassInfo(BaseModel):
    """One output class: the id written to the class map, a name and an RGB colour."""

    model_config = ConfigDict(extra="forbid")
    id: int = Field(ge=0, le=65534)
    name: str
    color: tuple[int, int, int] = (128, 128, 128)

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        return check_rgb(v)


def check_rgb(v: tuple[int, int, int]) -> tuple[int, int, int]:
    """The one colour rule of classes, in bundles and training configs alike."""
    if any(not 0 <= c <= 255 for c in v):
        raise ValueError(f"colour components must be 0..255, got {v}")
    return v


class InputSpec(BaseModel):
    """What the network takes: bands in order, their default scene indexes and normalisation.

    ``mean`` and ``std`` are in the scene's raw units (digital numbers, reflectance...), so that
    ``(raw - mean) / std`` is the network input whatever the dtype.
    """

    model_config = ConfigDict(extra="forbid")
    bands: list[str] = Field(min_length=1)
    band_indexes: list[int] | None = None
    mean: list[float]
    std: list[float]
    dtype: str | None = None
    pixel_size: float | None = Field(default=None, gt=0, description="metres per pixel at training")

    @model_validator(mode="after")
    def _lengths(self) -> InputSpec:
        n = len(self.bands)
        for key in ("mean", "std"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"input.{key} has {len(getattr(self, key))} values for {n} bands")
        if self.band_indexes is not None and len(self.band_indexes) != n:
            raise ValueError(f"input.band_indexes has {len(self.band_indexes)} values for {n} bands")
        if self.band_indexes is not None and min(self.band_indexes) < 1:
            raise ValueError("input.band_indexes are 1-based scene band numbers")
        if any(not (s > 0 and math.isfinite(s)) for s in self.std):
            raise ValueError("input.std values must be positive")
        return self

    @property
    def default_indexes(self) -> list[int]:
        return list(self.band_indexes) if self.band_indexes else list(range(1, len(self.bands) + 1))


class ArchSpec(BaseModel):
    """The network: an architecture from the registry in :mod:`geoseg.models` and its arguments."""

    model_config = ConfigDict(extra="forbid")
    architecture: str = "unet"
    encoder: str | None = "resnet34"
    params: dict[str, Any] = Field(default_factory=dict)
    activation: Literal["softmax", "sigmoid"] = "softmax"
    unused: list[str] = Field(
        default_factory=list,
        description="modules of the built network its forward never calls (encoder stages past encoder_depth); "
                    "dropped, so the weights hold only what the network uses")


class Contract(BaseModel):
    """Everything ``predict`` needs to use a model as it is."""

    model_config = ConfigDict(extra="forbid")
    format_version: int = FORMAT_VERSION
    name: str = "model"
    model: ArchSpec
    input: InputSpec
    classes: list[ClassInfo] = Field(min_length=1)
    chip_size: int = Field(default=512, ge=16)
    overlap: int = Field(default=128, ge=0)
    background_class: int | None = None
    weights: str = WEIGHTS_FILE
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("weights")
    @classmethod
    def _inside(cls, v: str) -> str:
        # a file name inside the bundle's folder: a bundle never reads (or, when saved, writes) elsewhere
        if not v or "/" in v or "\\" in v or v in (".", "..") or ":" in v:
            raise ValueError(f"weights must be a file name inside the bundle folder, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> Contract:
        ids = [c.id for c in self.classes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"class ids must be unique, got {ids}")
        if self.overlap * 2 > self.chip_size:
            raise ValueError(f"overlap {self.overlap} must be at most half of chip_size {self.chip_size}")
        if self.model.activation == "sigmoid" and len(self.classes) != 2:
            raise ValueError("a sigmoid (single-logit) model needs exactly two classes")
        if self.background_class is not None and self.background_class not in ids:
            raise ValueError(f"background_class {self.background_class} is not a class id {ids}")
        return self

    @property
    def out_channels(self) -> int:
        return 1 if self.model.activation == "sigmoid" else len(self.classes)

    @property
    def in_channels(self) -> int:
        return len(self.input.bands)

    @property
    def class_ids(self) -> list[int]:
        return [c.id for c in self.classes]


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
        """The weights' format: ``safetensors``, ``onnx`` or ``torchscript`` (:mod:`geoseg.weights`)."""
        return weights_format(self.weights_path)

    @property
    def files(self) -> list[Path]:
        """The files that make the bundle (its contract and its weights), in a fixed order."""
        if self.path.is_dir():
            return [self.path / CONTRACT_FILE, self.weights_path]
        return [self.path]


@dataclass
class LoadedModel:
    """A bundle with its network built and its weights loaded (in eval mode, on the CPU)."""

    bundle: Bundle
    module: torch.nn.Module
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
    from geoseg.remote import is_remote

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

    from geoseg.store import Store

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


def load_model(path: str | os.PathLike[str] | Bundle) -> LoadedModel:
    """Load a bundle: contract, network and weights, ready for inference on the CPU.

    Args:
        path: a bundle directory, a geoseg ``.safetensors`` file, or an already read :class:`Bundle`.

    Raises:
        BundleError: the bundle is not valid or its weights do not fit its architecture.
    """
    from geoseg.weights import load_network

    bundle = path if isinstance(path, Bundle) else read_bundle(path)
    net = load_network(bundle)
    return LoadedModel(bundle, net)


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


def staged_directory(dst: Path) -> contextlib.AbstractContextManager[Path]:
    """A hidden temporary folder beside ``dst`` that replaces ``dst`` whole only if the block succeeds."""
    from geoseg.store import Store

    store = Store(dst.parent)
    store.prepare()
    return store.staged_dir(dst.name)


def staged_file(dst: Path) -> contextlib.AbstractContextManager[Path]:
    """A temporary path beside ``dst`` that becomes ``dst`` whole only if the block succeeds."""
    from geoseg.store import Store

    store = Store(dst.parent)
    store.prepare()
    return store.staged_file(dst.name)


@dataclass
class Preflight:
    """The outcome of checking a bundle against one scene: which scene bands feed the model."""

    band_indexes: list[int]
    warnings: list[str]


def _bands_by_name(contract: Contract, scene: SceneInfo) -> list[int] | None:
    """Scene band numbers whose descriptions are the model's band names (any case), or None."""
    where = {(d or "").strip().casefold(): i + 1 for i, d in enumerate(scene.descriptions) if d}
    idx = [where.get(name.strip().casefold()) for name in contract.input.bands]
    return [i for i in idx if i is not None] if all(idx) else None


def _ambiguous_bands(contract: Contract, scene: SceneInfo) -> list[int]:
    need = contract.in_channels
    first = ",".join(str(i) for i in range(1, need + 1))
    raise BundleError(
        f"{scene.path}: has {scene.count} bands but model {contract.name!r} takes {need} "
        f"({', '.join(contract.input.bands)}) and the scene's band names do not say which; choose them with "
        f"--bands (e.g. --bands {first}), or name the scene's bands like the model's"
    )


def check_scene(contract: Contract, scene: SceneInfo, bands: list[int] | None = None) -> Preflight:
    """Check that a scene fits the contract before any model work.

    Args:
        contract: the model contract.
        scene: the scene as described by :func:`geoseg.raster.inspect_scene`.
        bands: 1-based scene band numbers feeding the model inputs in order (the ``--bands`` flag);
            default: the contract's ``input.band_indexes``, else bands 1..n.

    Raises:
        BundleError: band count or numbers that do not fit.
    """
    need = contract.in_channels
    names = ", ".join(contract.input.bands)
    if scene.dtype.startswith("complex"):
        raise BundleError(f"{scene.path}: has complex values ({scene.dtype}), which no model takes; convert it to "
                          "real bands first (the amplitude of SAR data: gdal_translate with a VRT pixel function "
                          "'mod', or gdal_translate -ot Float32 for the real part)")
    if bands is not None:
        if len(bands) != need:
            raise BundleError(
                f"{scene.path}: --bands gives {len(bands)} band(s) but model {contract.name!r} takes {need} "
                f"({names}); give {need} comma-separated scene band numbers"
            )
        idx = list(bands)
    else:
        idx = contract.input.default_indexes
        data_bands = scene.count - (1 if scene.alpha_band else 0)
        if contract.input.band_indexes is None and data_bands > need:
            idx = _bands_by_name(contract, scene) or _ambiguous_bands(contract, scene)
    bad = [i for i in idx if not 1 <= i <= scene.count]
    if bad:
        hint = ",".join(["1"] * need) if scene.count == 1 else ",".join(str(min(i, scene.count)) for i in idx)
        raise BundleError(
            f"{scene.path}: has {scene.count} band(s) but model {contract.name!r} reads band(s) "
            f"{','.join(map(str, idx))} for its inputs ({names}); map scene bands to model inputs "
            f"with --bands, e.g. --bands {hint}"
        )
    warnings: list[str] = []
    unused = [i for i in range(1, scene.count + 1) if i not in idx and i != scene.alpha_band]
    if unused:
        warnings.append(f"{scene.path}: model {contract.name!r} reads band(s) {','.join(map(str, idx))}; "
                        f"band(s) {','.join(map(str, unused))} are not used")
    want = contract.input.pixel_size
    have = scene.pixel_size_m
    if want and have and not 0.5 <= have / want <= 2.0:
        warnings.append(
            f"{scene.path}: pixel size {have:.3g} m is far from the {want:.3g} m model {contract.name!r} "
            "was trained at; expect poor results (resample the scene, or use a model trained at this scale)"
        )
    if contract.input.dtype and scene.dtype != contract.input.dtype:
        warnings.append(
            f"{scene.path}: dtype {scene.dtype} differs from the {contract.input.dtype} model "
            f"{contract.name!r} was trained on; its normalisation may not fit"
        )
    return Preflight(idx, warnings)
