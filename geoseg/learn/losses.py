"""Training losses: a weighted sum of named terms (cross-entropy and smp's Dice, Jaccard, focal, Lovasz),
every term ignoring unlabelled pixels, plus the class weights that balance them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geoseg.errors import ConfigError, unknown_name
from geoseg.learn.config import LOSS_NAMES, TrainConfig
from geoseg.learn.labels import IGNORE_INDEX

log = logging.getLogger(__name__)


class _MaskedBCE(nn.Module):
    """Binary cross-entropy on one logit channel, ignoring ``ignore_index`` targets."""

    def __init__(self, ignore_index: int, pos_weight: float | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logit = logits[:, 0]
        keep = target != self.ignore_index  # WeightedLoss answers a batch without labelled pixels
        pw = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=logit.device)
        return F.binary_cross_entropy_with_logits(logit[keep], target[keep].float(), pos_weight=pw)


def _cross_entropy(mode: str, ignore: int, class_weights: list[float] | None, **params: Any) -> nn.Module:
    if mode == "binary":
        pw = None if class_weights is None else class_weights[1] / max(class_weights[0], 1e-12)
        return _MaskedBCE(ignore, params.pop("pos_weight", pw))
    w = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
    return nn.CrossEntropyLoss(weight=w, ignore_index=ignore, **params)


def _smp_loss(cls_name: str) -> Callable[..., nn.Module]:
    def build(mode: str, ignore: int, class_weights: list[float] | None, **params: Any) -> nn.Module:
        import segmentation_models_pytorch as smp

        cls = getattr(smp.losses, cls_name)
        return cls(mode=mode, ignore_index=ignore, **params)  # type: ignore[no-any-return]

    return build


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "cross_entropy": _cross_entropy,
    "dice": _smp_loss("DiceLoss"),
    "jaccard": _smp_loss("JaccardLoss"),
    "focal": _smp_loss("FocalLoss"),
    "lovasz": _smp_loss("LovaszLoss"),
}
assert set(LOSSES) == set(LOSS_NAMES)


class WeightedLoss(nn.Module):
    """``sum(weight_i * loss_i(logits, target))``; logits ``(N, K, H, W)``, target int64 ``(N, H, W)``."""

    def __init__(self, terms: list[tuple[str, float, nn.Module]]):
        super().__init__()
        self.names = [n for n, _, _ in terms]
        self.weights = [w for _, w, _ in terms]
        self.terms = nn.ModuleList([m for _, _, m in terms])

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if not (target != IGNORE_INDEX).any():  # some smp losses give NaN without any labelled pixel
            return logits.sum() * 0.0
        total = logits.new_zeros(())
        for w, term in zip(self.weights, self.terms, strict=True):
            total = total + w * term(logits, target)
        return total


def build_loss(cfg: TrainConfig, class_weights: list[float] | None = None) -> WeightedLoss:
    """The weighted loss of a config (binary mode for a sigmoid model, multiclass otherwise).

    Raises:
        UnknownNameError: a loss name that is not registered (the message lists the valid ones).
        ConfigError: loss parameters the loss does not accept.
    """
    mode = "binary" if cfg.model.activation == "sigmoid" else "multiclass"
    terms = []
    for t in cfg.loss:
        if t.name not in LOSSES:
            raise unknown_name("loss", t.name, list(LOSSES))
        try:
            module = LOSSES[t.name](mode, IGNORE_INDEX, class_weights, **t.params)
        except TypeError as exc:
            raise ConfigError(f"loss {t.name!r}: bad params {t.params} ({exc})") from None
        terms.append((t.name, t.weight, module))
    return WeightedLoss(terms)


def class_weights(cfg: TrainConfig, counts: np.ndarray) -> list[float] | None:
    if isinstance(cfg.class_weights, list):
        return list(cfg.class_weights)
    if cfg.class_weights == "none":
        return None
    freq = counts / max(counts.sum(), 1)
    w = np.where(freq > 0, 1.0 / np.sqrt(np.maximum(freq, 1e-12)), 0.0)
    w[freq == 0] = w.max() if w.max() > 0 else 1.0
    w = w * len(w) / w.sum()
    log.info("class weights (auto): %s", np.round(w, 3).tolist())
    return [float(x) for x in w]


__all__ = ["LOSSES", "WeightedLoss", "build_loss", "class_weights"]
