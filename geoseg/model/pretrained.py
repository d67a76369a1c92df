"""Pretrained encoder weights from a local file: what the file says it is, and its bands matched by name.

A weights file is a ``.safetensors`` file (or a torch state dict read without pickle) holding one of:

- an smp encoder's own keys (``features.*`` for ``mobilenet_v2``, ``layer1.*`` for ``resnet18``...);
- the ``model.*`` keys of smp's timm universal encoders (``tu-...``), which are that encoder's own keys too;
- a whole network's keys: only its ``encoder.*`` keys are taken, stripped of the prefix (a geoseg bundle, an smp
  ``Unet`` saved whole).

Its safetensors metadata (all optional, strings) says what it is: ``encoder`` (the smp encoder name it fits),
``bands`` (a JSON list of the input band names of its first convolution, in order), ``pretrained_on`` (free
text), ``architecture`` (for a whole network), ``mean`` and ``std`` (JSON lists, the normalisation the weights
expect, per band, in the units of ``scale``...). A ``.json`` file of the same stem beside it may hold ``mean``
and ``std`` too. geoseg's own bundles and ``geoseg pretrain`` encoders are read through their contract.

Bands are matched by name, case-insensitively, through a small alias table (:data:`BAND_ALIASES`): STAC's
common names (``red``, ``nir08``, ``swir16``...), ``r``/``g``/``b``, Sentinel-2's band ids (``B02``...
``B12``) and Landsat's ``swir1``/``swir2``. A band named ``pan`` (panchromatic, also ``gray``) takes the mean
of the file's visible filters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geoseg.errors import ConfigError
from geoseg.model.contract import PretrainedSource

log = logging.getLogger(__name__)

__all__ = ["BAND_ALIASES", "IMAGENET_MEAN", "IMAGENET_STD", "EncoderFile", "band_key", "first_conv_for_bands",
           "match_bands", "pretrained_normalization", "read_encoder_file"]

KEY = "model.encoder_weights"
IMAGENET_MEAN = {"red": 0.485, "green": 0.456, "blue": 0.406}  # on 0..1 inputs (torchvision's)
IMAGENET_STD = {"red": 0.229, "green": 0.224, "blue": 0.225}

# name (lower case) -> canonical name; the canonical names are STAC's eo common names
BAND_ALIASES: dict[str, str] = {
    "r": "red", "g": "green", "b": "blue", "coastal": "coastal", "blue": "blue", "green": "green", "red": "red",
    "nir": "nir", "nir08": "nir", "near infrared": "nir", "near-infrared": "nir", "swir16": "swir16",
    "swir1": "swir16", "swir22": "swir22", "swir2": "swir22", "pan": "pan", "panchromatic": "pan",
    "gray": "pan", "grey": "pan",
    # Sentinel-2 band ids (B8A is the narrow NIR, as close to nir08 as B08)
    "b01": "coastal", "b02": "blue", "b03": "green", "b04": "red", "b08": "nir", "b8a": "nir",
    "b11": "swir16", "b12": "swir22",
}
_VISIBLE = ("red", "green", "blue")
_UNNAMED = re.compile(r"^(band[ _]?\d+|\d+|)$", re.IGNORECASE)


def band_key(name: str) -> str:
    """The canonical name a band is matched under (``"B04"`` -> ``"red"``, ``"NIR08"`` -> ``"nir"``)."""
    n = name.strip().lower()
    return BAND_ALIASES.get(n, n)


@dataclass
class EncoderFile:
    """A weights file read: its encoder's tensors and what its metadata says (``None`` where it says nothing)."""

    path: str
    sha256: str
    state: dict[str, Any] = field(repr=False)
    encoder: str | None = None
    architecture: str | None = None
    bands: list[str] | None = None
    pretrained_on: str | None = None
    mean: list[float] | None = None  # the normalisation the weights expect, per file band, in their units
    std: list[float] | None = None

    def source(self, matched: list[str | None] | None = None) -> PretrainedSource:
        """What a bundle records of where its encoder came from."""
        return PretrainedSource(file=os.path.basename(self.path), sha256=self.sha256, encoder=self.encoder,
                                pretrained_on=self.pretrained_on, bands=self.bands, matched=matched)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_list(text: Any) -> list[Any] | None:
    if text is None:
        return None
    if isinstance(text, list):
        return text
    try:
        v = json.loads(text)
    except (TypeError, ValueError):
        return None
    return v if isinstance(v, list) else None


def _describe(meta: dict[str, str], path: str) -> dict[str, Any]:
    """What the metadata of a weights file says, whatever wrote it."""
    out: dict[str, Any] = {}
    if "geoseg_contract" in meta:  # a geoseg bundle's weights
        c = json.loads(meta["geoseg_contract"])
        out.update(encoder=(c.get("model") or {}).get("encoder"), architecture=(c.get("model") or {}).get("architecture"),
                   bands=(c.get("input") or {}).get("bands"),
                   pretrained_on=f"geoseg bundle {c.get('name', '')!r}".strip())
    if "geoseg_pretrain" in meta:  # geoseg pretrain's encoder: its bands are scene band numbers, not names
        p = json.loads(meta["geoseg_pretrain"])
        out.update(encoder=p.get("encoder"), pretrained_on=f"geoseg pretrain {p.get('name', '')!r}")
    for key in ("encoder", "architecture", "pretrained_on"):
        if meta.get(key):
            out[key] = meta[key]
    for key in ("bands", "mean", "std"):
        v = _json_list(meta.get(key))
        if v is not None:
            out[key] = v
    side = Path(path).with_suffix(".json")
    if "mean" not in out and side.is_file():  # the normalisation written beside the weights
        try:
            extra = json.loads(side.read_text())
        except (OSError, ValueError):
            extra = {}
        if isinstance(extra, dict) and isinstance(extra.get("mean"), list) and isinstance(extra.get("std"), list):
            out.update(mean=extra["mean"], std=extra["std"])
    if out.get("bands") is not None and not all(isinstance(b, str) for b in out["bands"]):
        out["bands"] = None
    if out.get("bands") and "mean" not in out and str(out.get("pretrained_on", "")).lower().startswith("imagenet") \
            and all(band_key(b) in IMAGENET_MEAN for b in out["bands"]):
        out["mean"] = [IMAGENET_MEAN[band_key(b)] for b in out["bands"]]
        out["std"] = [IMAGENET_STD[band_key(b)] for b in out["bands"]]
    for key in ("mean", "std"):
        if out.get(key) is not None and (not out.get("bands") or len(out[key]) != len(out["bands"])):
            out[key] = None
    return out


def read_encoder_file(path: str, tensors: bool = True) -> EncoderFile:
    """Read a weights file: its encoder's tensors (``tensors=False``: the header only) and its metadata.

    Raises:
        ConfigError: naming ``model.encoder_weights`` when the file is missing or unreadable.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"{KEY} {path!r}: no such file; give a local .safetensors/.pth file, 'imagenet' "
                          "(downloads) or null")
    meta: dict[str, str] = {}
    state: dict[str, Any] = {}
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
                if tensors:
                    state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not iterable)
        elif tensors:
            import torch

            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(loaded, dict):
                loaded = loaded.get("model", loaded.get("state_dict", loaded))
            if not isinstance(loaded, dict):
                raise ConfigError(f"{KEY} {path!r}: holds no state dict of tensors")
            state = loaded
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{KEY} {path!r}: cannot read weights ({str(exc).splitlines()[0][:200]}); give a "
                          ".safetensors file or a plain state dict") from None
    if any(k.startswith("encoder.") for k in state):  # a whole network: its encoder only
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    try:
        said = _describe(meta, path)
    except (TypeError, ValueError, AttributeError):
        said = {}
    return EncoderFile(path=path, sha256=_sha256(path) if tensors else "", state=state, **said)


def _unnamed(name: str) -> bool:
    return bool(_UNNAMED.match(name.strip()))


def match_bands(config_bands: list[str], weights: EncoderFile) -> list[list[int]]:
    """For each of the config's bands, the file bands whose first-convolution filters it takes (their mean).

    An empty list: the file lacks the band (it is initialised as smp initialises extra bands). A band named
    ``pan`` takes the file's visible bands. Unnamed bands (``band1``...) take the file's bands in order when
    the counts match, with a warning.

    Raises:
        ConfigError: the file has band names and shares none with the config.
    """
    file_bands = weights.bands or []
    keys = [band_key(b) for b in file_bands]
    out: list[list[int]] = []
    for name in config_bands:
        k = band_key(name)
        if k in keys:
            out.append([keys.index(k)])
        elif k == "pan" and any(v in keys for v in _VISIBLE):
            out.append([keys.index(v) for v in _VISIBLE if v in keys])
        else:
            out.append([])
    if not any(out):
        if all(_unnamed(b) for b in config_bands) and len(config_bands) == len(file_bands):
            log.warning("the config's bands have no names (%s); taking them as the bands of %s in its order (%s); "
                        "set data.band_names to match by name", ", ".join(config_bands), os.path.basename(weights.path),
                        ", ".join(file_bands))
            return [[i] for i in range(len(file_bands))]
        raise ConfigError(f"{KEY} {weights.path!r}: its bands ({', '.join(file_bands)}) share none with the "
                          f"config's ({', '.join(config_bands)}); name the bands with data.band_names (e.g. red, "
                          "green, blue, nir) or choose weights made for these bands")
    lacking = [n for n, m in zip(config_bands, out, strict=True) if not m]
    if lacking:
        log.info("%s has no filter for band(s) %s: initialised as smp does for extra bands (another band's filter, "
                 "cycled, and rescaled)", os.path.basename(weights.path), ", ".join(lacking))
    return out


def first_conv_for_bands(weight: Any, sources: list[list[int]]) -> Any:
    """The first convolution's weight ``(out, len(sources), kh, kw)`` built from the file's ``(out, m, kh, kw)``.

    A band takes its filter (the mean of its filters for ``pan``); a band without one takes the file's band at
    its position, cycled (smp's ``patch_first_conv``). Unless the bands are exactly the file's (in any order),
    the result is rescaled by ``m / n`` as smp does, so that a uniform input keeps its response.
    """
    import torch

    m, n = int(weight.shape[1]), len(sources)
    cols = []
    for i, src in enumerate(sources):
        cols.append(weight[:, src].mean(dim=1) if src else weight[:, i % m])
    new = torch.stack(cols, dim=1)
    exact = n == m and sorted(s[0] for s in sources if len(s) == 1) == list(range(m))
    return new if exact else new * (m / n)


def pretrained_normalization(weights: EncoderFile, config_bands: list[str], mean: list[float], std: list[float],
                             scale: float) -> tuple[list[float], list[float], list[str]]:
    """The raw-unit mean and std the weights expect, for the bands they have; the others keep ``mean``/``std``.

    ``scale`` is how many raw units make one unit of the weights' input (255 for 8-bit imagery against
    ImageNet's 0..1). Returns the new mean, std and the names of the bands whose statistics changed.
    """
    if weights.mean is None or weights.std is None or not weights.bands:
        return mean, std, []
    keys = [band_key(b) for b in weights.bands]
    new_mean, new_std, changed = list(mean), list(std), []
    for i, name in enumerate(config_bands):
        k = band_key(name)
        if k in keys:
            j = keys.index(k)
            new_mean[i], new_std[i] = float(weights.mean[j]) * scale, float(weights.std[j]) * scale
            changed.append(name)
    return new_mean, new_std, changed
