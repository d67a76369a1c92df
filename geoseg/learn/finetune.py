"""Fine-tuning a pretrained encoder: its BatchNorm kept as pretrained, the encoder frozen for the first part of
the run, and the input statistics the weights expect.

Each is a config key whose default leaves a run as it was (``model.freeze_bn``, ``model.freeze_encoder_fraction``,
``model.normalization``; the encoder's own learning rate, ``optimizer.encoder_lr_scale``, is in
:mod:`geoseg.learn.optim`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import nn

from geoseg.learn.config import TrainConfig
from geoseg.model.networks import is_local_file
from geoseg.model.pretrained import pretrained_normalization, read_encoder_file

__all__ = ["EncoderFreeze", "freeze_batchnorm", "input_scale", "use_pretrained_normalization"]

log = logging.getLogger(__name__)

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _encoder(net: nn.Module) -> nn.Module | None:
    enc = getattr(net, "encoder", None)
    return enc if isinstance(enc, nn.Module) else None


def freeze_batchnorm(net: nn.Module) -> int:
    """Put the encoder's BatchNorm layers in evaluation mode (running statistics kept) and stop training their
    scale and shift. Call it after every ``net.train()``. Returns the number of layers frozen."""
    enc = _encoder(net)
    if enc is None:
        return 0
    n = 0
    for m in enc.modules():
        if isinstance(m, _BATCHNORM):
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            n += 1
    return n


class EncoderFreeze:
    """The encoder frozen (no gradient, so no update and no backward pass through it) while the run's progress
    is below ``fraction``, then trained with the rest. ``update(progress)`` before each step."""

    def __init__(self, net: nn.Module, fraction: float, keep_bn_frozen: bool = False):
        enc = _encoder(net)
        self.fraction = fraction if enc is not None else 0.0
        self.params: list[nn.Parameter] = []
        if enc is not None and fraction > 0:
            bn = {id(p) for m in enc.modules() if isinstance(m, _BATCHNORM) for p in m.parameters(recurse=False)}
            self.params = [p for p in enc.parameters() if not (keep_bn_frozen and id(p) in bn)]
        self.frozen: bool | None = None

    def update(self, progress: float) -> None:
        frozen = progress < self.fraction
        if frozen == self.frozen or not self.params:
            return
        for p in self.params:
            p.requires_grad_(not frozen)
        if self.frozen is not None or frozen:
            log.info("encoder %s at %.0f %% of the run", "frozen" if frozen else "trained from now", 100 * progress)
        self.frozen = frozen


def input_scale(cfg: TrainConfig, dtype: str) -> float:
    """Raw units per unit of the weights' input: ``model.pretrained_scale``, else by the scenes' dtype."""
    if cfg.model.pretrained_scale:
        return cfg.model.pretrained_scale
    return {"uint8": 255.0, "uint16": 10000.0, "int16": 10000.0}.get(dtype, 1.0)


def use_pretrained_normalization(cfg: TrainConfig, band_names: list[str], dtype: str, mean: list[float],
                                 std: list[float]) -> tuple[list[float], list[float]]:
    """The input statistics of a run: the data's, or with ``model.normalization: pretrained`` those the
    weights file expects for the bands it has (the others keep the data's). Raw units either way."""
    weights = cfg.model.encoder_weights
    if cfg.model.normalization != "pretrained" or not weights:
        return mean, std
    if weights == "imagenet":
        from geoseg.model.pretrained import IMAGENET_MEAN, IMAGENET_STD, EncoderFile

        said: Any = EncoderFile(weights, "", {}, bands=list(IMAGENET_MEAN), mean=list(IMAGENET_MEAN.values()),
                                std=list(IMAGENET_STD.values()))
    elif is_local_file(weights):
        said = read_encoder_file(weights, tensors=False)
    else:
        return mean, std
    scale = input_scale(cfg, dtype)
    new_mean, new_std, changed = pretrained_normalization(said, band_names, mean, std, scale)
    if changed:
        log.info("normalisation of %s for band(s) %s (x %g raw units); data statistics for the others",
                 os.path.basename(weights), ", ".join(changed), scale)
    else:
        log.warning("model.normalization pretrained: %s gives no statistics for bands %s; using the data's",
                    os.path.basename(weights), ", ".join(band_names))
    return new_mean, new_std
