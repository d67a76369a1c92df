"""A model bundle described as a STAC Item with the Machine Learning Model (MLM) extension.

Catalogues describe models with `MLM <https://github.com/stac-extensions/mlm>`_: what the model takes
(bands, normalisation, chip size), what it gives (classes with names and colours), its architecture and
framework, and the weights as an asset. :func:`mlm_item` builds that Item from a bundle's contract alone
(no torch, no weights read beyond a safetensors header for the parameter count); ``geoseg export`` writes one
beside every export and ``geoseg export --format mlm`` one for any bundle. Asset links are relative to where
the Item is written, so the Item travels with the bundle.

A model has no footprint: the Item's ``geometry`` is null and it has no bbox (STAC allows both for such
Items). ``datetime`` is when the weights file was last written.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path
from typing import Any

from geoseg.model.bundle import Bundle
from geoseg.model.contract import CONTRACT_FILE, Contract

MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
STAC_VERSION = "1.1.0"
MEDIA_TYPES = {
    "safetensors": "application/octet-stream; application=safetensors",
    "onnx": "application/octet-stream; framework=onnx; profile=onnx",
    "torchscript": "application/octet-stream; framework=pytorch; profile=torchscript",
}
ARTIFACT_TYPES = {"safetensors": "safetensors", "onnx": "onnx", "torchscript": "torch.jit.script"}
FRAMEWORKS = {"safetensors": "PyTorch", "onnx": "ONNX", "torchscript": "PyTorch"}
ARCHITECTURES = {"unet": "U-Net", "unetplusplus": "U-Net++", "deeplabv3": "DeepLabV3", "deeplabv3plus": "DeepLabV3+",
                 "fpn": "FPN", "pspnet": "PSPNet", "linknet": "LinkNet", "manet": "MA-Net", "pan": "PAN",
                 "upernet": "UPerNet", "segformer": "SegFormer", "dpt": "DPT", "conv1x1": "1x1 convolution"}


def _mlm_name(name: str) -> str:
    """The bundle's name in MLM's pattern: a letter first, then letters, digits, ``_.-``, not ending in those."""
    s = re.sub(r"[^a-zA-Z0-9_.-]+", "-", name).strip("_.-")
    if not s or not s[0].isalpha():
        s = f"model-{s}" if s else "model"
    return s if len(s) > 2 else f"{s}-model"


def _parameters(bundle: Bundle) -> int | None:
    if bundle.format != "safetensors":
        return None
    from safetensors import safe_open

    total = 0
    with safe_open(str(bundle.weights_path), framework="numpy") as f:
        for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= int(d)
            total += n
    return total


def _pretrained(contract: Contract) -> dict[str, Any]:
    """MLM's pretraining fields: from the contract's record of the encoder's weights, else (bundles written
    before it existed) from the training config's ``model.encoder_weights``."""
    source = contract.pretrained
    if source is not None:
        return {"mlm:pretrained": True, "mlm:pretrained_source": source.pretrained_on or source.file}
    cfg = (contract.metadata.get("training") or {}).get("config") or {}
    model = cfg.get("model") or {}
    if "encoder_weights" not in model:
        return {}
    weights = model.get("encoder_weights")
    if not weights:
        return {"mlm:pretrained": False, "mlm:pretrained_source": None}
    return {"mlm:pretrained": True, "mlm:pretrained_source": os.path.basename(str(weights))}


def _torch_version(contract_meta: dict[str, Any]) -> str | None:
    v = (contract_meta.get("export") or {}).get("torch")
    if v is None:
        try:
            from importlib.metadata import version

            v = version("torch")
        except Exception:
            return None
    m = re.match(r"^(\d+\.\d+\.\d+)", str(v))
    return m.group(1) if m else None


def mlm_item(bundle: Bundle, item_path: Path) -> dict[str, Any]:
    """The STAC Item (a JSON-ready dict) describing ``bundle``, with hrefs relative to ``item_path``'s folder."""
    c = bundle.contract
    fmt = bundle.format
    chip, k = c.chip_size, c.out_channels
    written = dt.datetime.fromtimestamp(bundle.weights_path.stat().st_mtime, dt.timezone.utc)
    arch = ARCHITECTURES.get(c.model.architecture.lower(), c.model.architecture)
    if c.model.encoder and c.model.architecture.lower() != "conv1x1":
        arch = f"{arch} ({c.model.encoder} encoder)"
    # the classification extension's names are identifiers ([0-9A-Za-z-_]+): the class's own name is the title
    classes = [{"value": i, "name": re.sub(r"[^-a-zA-Z0-9_]+", "_", cl.name) or f"class_{cl.id}", "title": cl.name,
                "color_hint": "{:02X}{:02X}{:02X}".format(*cl.color),
                **({"description": f"class id {cl.id} in geoseg's class maps"} if cl.id != i else {})}
               for i, cl in enumerate(c.classes)]
    if c.model.activation == "sigmoid":  # one logit: the channel scores the second class
        classes = [{**classes[1], "value": 0}]
    base = item_path.parent

    def href(p: Path) -> str:
        return Path(os.path.relpath(p.resolve(), base.resolve())).as_posix()

    props: dict[str, Any] = {
        "datetime": written.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "description": f"geoseg land-cover model {c.name!r}: {arch}, {len(c.input.bands)} band(s), "
                       f"{len(c.classes)} classes, {chip} px chips with {c.overlap} px overlap",
        "mlm:name": _mlm_name(c.name),
        "mlm:architecture": arch,
        "mlm:tasks": ["semantic-segmentation"],
        "mlm:framework": FRAMEWORKS[fmt],
        "mlm:input": [{
            "name": "image",
            "bands": list(c.input.bands),
            "input": {"shape": [-1, len(c.input.bands), chip, chip], "dim_order": ["batch", "channel", "height", "width"],
                      "data_type": "float32"},
            "value_scaling": [{"type": "z-score", "mean": m, "stddev": s}  # per band, in the scene's raw units
                              for m, s in zip(c.input.mean, c.input.std, strict=True)],
            "resize_type": None,
            "pre_processing_function": None,
        }],
        "mlm:output": [{
            "name": "probabilities" if fmt == "onnx" else "logits",
            "tasks": ["semantic-segmentation"],
            "result": {"shape": [-1, k, chip, chip], "dim_order": ["batch", "channel", "height", "width"],
                       "data_type": "float32"},
            "classification:classes": classes,
            "post_processing_function": None,
        }],
        "mlm:hyperparameters": {"chip_size": chip, "overlap": c.overlap, "activation": c.model.activation,
                                **{f"params.{key}": v for key, v in c.model.params.items()}},
        "bands": [{"name": b} for b in c.input.bands],
        **_pretrained(c),
    }
    if c.input.pixel_size:
        props["gsd"] = c.input.pixel_size
    version = _torch_version(c.metadata) if FRAMEWORKS[fmt] == "PyTorch" else None
    if version:
        props["mlm:framework_version"] = version
    total = _parameters(bundle)
    if total is not None:
        props["mlm:total_parameters"] = total
    assets: dict[str, Any] = {
        "model": {"href": href(bundle.weights_path), "type": MEDIA_TYPES[fmt], "title": f"{c.name} weights ({fmt})",
                  "roles": ["mlm:model", "data"], "mlm:artifact_type": ARTIFACT_TYPES[fmt],
                  # STAC 1.1 takes bands in Item properties only where an asset lists them too
                  "bands": [{"name": b} for b in c.input.bands]},
    }
    if bundle.path.is_dir():
        assets["contract"] = {"href": href(bundle.path / CONTRACT_FILE), "type": "application/json",
                              "title": "geoseg model contract (bands, normalisation, classes, chips)",
                              "roles": ["metadata"]}
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [MLM_SCHEMA],
        "id": _mlm_name(c.name),
        "geometry": None,
        "properties": props,
        "links": [],
        "assets": assets,
    }


__all__ = ["MLM_SCHEMA", "mlm_item"]
