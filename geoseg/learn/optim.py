"""Optimiser and learning-rate schedule of a training run (and the schedule of a resumed, longer run)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from geoseg.learn.config import TrainConfig

log = logging.getLogger(__name__)


def optimizer(cfg: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD over the network's trainable parameters, without weight decay on biases and normalisation
    parameters; the encoder's groups carry ``lr_scale`` (``optimizer.encoder_lr_scale``), which
    :class:`Schedule` applies."""
    o = cfg.optimizer
    enc = getattr(net, "encoder", None)
    in_encoder = {id(p) for p in enc.parameters()} if isinstance(enc, nn.Module) else set()
    groups: list[dict[str, Any]] = []
    for scale, inside in ((o.encoder_lr_scale, True), (1.0, False)):
        params = [p for p in net.parameters() if p.requires_grad and (id(p) in in_encoder) == inside]
        groups.append({"params": [p for p in params if p.ndim > 1], "weight_decay": o.weight_decay, "lr_scale": scale})
        groups.append({"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": scale})
    if o.encoder_lr_scale == 1.0:  # one rate: the two groups of today's runs (their checkpoints resume)
        groups = [{"params": groups[0]["params"] + groups[2]["params"], "weight_decay": o.weight_decay},
                  {"params": groups[1]["params"] + groups[3]["params"], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr)


class Schedule:
    """The learning rate as a function of the run's progress ``p`` in [0, 1], which is the larger of the
    share of optimiser steps taken (``epochs`` x steps per epoch) and the share of the time budget spent.

    So the schedule completes whichever limit binds: with ``max_seconds`` the rate warms up and anneals
    within the budget (a step-based schedule is cut mid-way when time runs out). Without a budget the
    progress depends on steps only, and a seeded run stays repeatable.

    ``reserve`` is time kept back from the budget for what follows the last step (validation, bundle).
    Kinds: ``none`` (constant), ``cosine`` (to 1 % of the rate), ``onecycle`` (30 % cosine warm-up from
    1/25 of the rate, then cosine annealing to 1/10,000, torch's OneCycleLR defaults). ``warmup`` (a share of
    the run) replaces onecycle's 30 % or puts the same warm-up before the others. A parameter group's
    ``lr_scale`` multiplies its rate.
    """

    def __init__(self, kind: str, lr: float, opt: torch.optim.Optimizer, total_steps: int,
                 max_seconds: float | None, warmup: float | None = None):
        self.kind = kind
        self.warmup = warmup if warmup is not None else (0.3 if kind == "onecycle" else 0.0)
        self.lr = lr
        self.opt = opt
        self.total_steps = max(total_steps, 1)
        self.max_seconds = max_seconds
        self.steps, self.seconds, self.reserve = 0, 0.0, 0.0
        self._apply()

    @property
    def progress(self) -> float:
        p = self.steps / self.total_steps
        if self.max_seconds:
            p = max(p, self.seconds / max(self.max_seconds - self.reserve, 1e-9))
        return min(p, 1.0)

    @property
    def done(self) -> bool:
        return self.progress >= 1.0

    def rate(self, p: float) -> float:
        warm = self.warmup
        if p < warm:
            start = self.lr / 25
            return start + (self.lr - start) * 0.5 * (1 - math.cos(math.pi * p / warm))
        q = (p - warm) / (1 - warm)  # progress of the annealing
        if self.kind == "cosine":
            low = self.lr * 0.01
            return low + (self.lr - low) * 0.5 * (1 + math.cos(math.pi * q))
        if self.kind == "onecycle":
            end = self.lr / 25 / 1e4
            return end + (self.lr - end) * 0.5 * (1 + math.cos(math.pi * q))
        return self.lr

    def step(self, seconds: float) -> None:
        """One optimiser step taken; ``seconds`` is the run's time so far (all sessions of a resumed run)."""
        self.steps += 1
        self.seconds = seconds
        self._apply()

    def _apply(self) -> None:
        rate = self.rate(self.progress)
        for group in self.opt.param_groups:
            group["lr"] = rate * group.get("lr_scale", 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": self.seconds, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a run: its steps and time so far, on this (possibly longer) schedule."""
        self.steps, self.seconds = int(state.get("steps", 0)), float(state.get("seconds", 0.0))
        old = int(state.get("total_steps", self.total_steps))
        if old != self.total_steps:
            log.info("resumed on a %d-step schedule (was %d steps), at step %d", self.total_steps, old, self.steps)
        self._apply()
