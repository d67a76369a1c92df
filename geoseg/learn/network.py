"""The network a training config asks for: checked before a run starts, built with its pretrained weights."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from geoseg.errors import ConfigError
from geoseg.learn.config import PretrainConfig, TrainConfig
from geoseg.learn.data import input_band_names
from geoseg.model.contract import ArchSpec
from geoseg.model.networks import (
    create_network,
    drop_modules,
    first_output,
    input_divisor,
    is_local_file,
    unused_modules,
)

__all__ = ["arch_spec", "build_model", "check_network"]

log = logging.getLogger(__name__)


def _add_dropout(net: nn.Module, p: float) -> None:
    """Channel dropout on the input of the segmentation head, as a hook (the state dict is unchanged)."""
    head = getattr(net, "segmentation_head", None)
    if head is None:
        log.warning("dropout %.2f asked for, but this architecture has no segmentation head; ignored", p)
        return

    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (F.dropout2d(args[0], p, module.training), *args[1:])

    head.register_forward_pre_hook(hook)


def check_network(cfg: TrainConfig) -> None:
    """Build the config's network (random weights) and run one chip through it, before any run folder is
    made: an unknown encoder, arguments the architecture refuses, or logits of the wrong size (``fpn`` at
    ``encoder_depth: 3``) become one-line config errors naming the keys.

    Raises:
        ConfigError: naming ``model.encoder``, ``model.params`` or ``data.chip_size``.
    """
    spec = arch_spec(cfg)
    div = input_divisor(spec)
    if cfg.data.chip_size % div:
        raise ConfigError(f"data.chip_size {cfg.data.chip_size} must be a multiple of {div} for "
                          f"{spec.architecture} with this encoder depth")
    if spec.architecture.lower() == "conv1x1":
        return
    import difflib

    import segmentation_models_pytorch as smp

    encoder = spec.encoder or "resnet34"
    if encoder.startswith("tu-"):  # any timm model, through smp's timm universal encoder
        import timm

        names = ["tu-" + n for n in timm.list_models()]
    else:
        names = smp.encoders.get_encoder_names()
    if encoder not in names:
        close = difflib.get_close_matches(encoder, names, n=4, cutoff=0.6)
        raise ConfigError(f"model.encoder {encoder!r} is not an encoder of segmentation-models-pytorch"
                          + (f"; did you mean {', '.join(close)}?" if close else "; see smp's encoder list"))
    in_ch: int | None = len(cfg.data.bands) if cfg.data.bands else None
    out_ch = 1 if cfg.model.activation == "sigmoid" else len(cfg.classes)
    chip = cfg.data.chip_size
    local = cfg.model.encoder_weights if cfg.model.encoder_weights and is_local_file(cfg.model.encoder_weights) \
        else None  # a local file is read here, so a wrong one fails before the run folder is made
    bands = input_band_names(cfg.data) if local else None  # (a header read) to match the file's bands
    in_ch = len(bands) if bands else in_ch
    try:
        net = create_network(spec, in_ch or 3, out_ch, local, bands).eval()
        with torch.no_grad():
            shape = tuple(first_output(net(torch.zeros(1, in_ch or 3, chip, chip))).shape)
    except ConfigError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"model.architecture {spec.architecture} with model.encoder {encoder!r} and "
                          f"model.params {dict(spec.params)} cannot be built or run on {chip} px chips "
                          f"({first}); fix model.params (decoder_channels must have encoder_depth entries) "
                          "or data.chip_size") from None
    if shape[-2:] != (chip, chip) or shape[1] != out_ch:
        raise ConfigError(f"model.architecture {spec.architecture} with model.params {dict(spec.params)} gives "
                          f"{shape[1]} x {shape[2]} x {shape[3]} logits for {chip} px chips, not {out_ch} x {chip} "
                          f"x {chip}; change model.params (e.g. encoder_depth: 5) or the architecture")


def build_model(cfg: TrainConfig, in_channels: int, band_names: list[str] | None = None) -> nn.Module:
    """The network of a config, with pretrained encoder weights when ``model.encoder_weights`` is set.

    ``band_names`` (the input bands in order) are matched to a weights file's bands; where it is None, a
    local file's first convolution is adapted by the number of bands only.

    Raises:
        ConfigError: the chip size does not fit the network, or the encoder cannot be built.
    """
    spec = arch_spec(cfg)  # checked by check_network before the run started
    out_ch = 1 if cfg.model.activation == "sigmoid" else len(cfg.classes)
    net = create_network(spec, in_channels, out_ch, cfg.model.encoder_weights, band_names)
    if spec.architecture.lower() != "conv1x1":
        unused = unused_modules(net, in_channels, cfg.data.chip_size)
        drop_modules(net, unused)
        net.geoseg_unused = unused  # type: ignore[assignment]  # recorded in the contract (make_contract)
    if cfg.model.dropout > 0:
        _add_dropout(net, cfg.model.dropout)
    return net


def arch_spec(cfg: TrainConfig | PretrainConfig) -> ArchSpec:
    """The contract's description of a training or pretraining config's network."""
    return ArchSpec(architecture=cfg.model.architecture, encoder=cfg.model.encoder,
                    params=dict(cfg.model.params), activation=cfg.model.activation)
