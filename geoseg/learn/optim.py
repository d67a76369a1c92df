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
    o = cfg.optimizer
    # no weight decay on biases and normalisation parameters
    decay = [p for p in net.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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
    1/25 of the rate, then cosine annealing to 1/10,000, torch's OneCycleLR defaults).
    """

    def __init__(self, kind: str, lr: float, opt: torch.optim.Optimizer, total_steps: int,
                 max_seconds: float | None):
        self.kind = kind
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
        if self.kind == "cosine":
            low = self.lr * 0.01
            return low + (self.lr - low) * 0.5 * (1 + math.cos(math.pi * p))
        if self.kind == "onecycle":
            warm = 0.3
            if p < warm:
                start = self.lr / 25
                return start + (self.lr - start) * 0.5 * (1 - math.cos(math.pi * p / warm))
            end = self.lr / 25 / 1e4
            return end + (self.lr - end) * 0.5 * (1 + math.cos(math.pi * (p - warm) / (1 - warm)))
        return self.lr

    def step(self, seconds: float) -> None:
        """One optimiser step taken; ``seconds`` is the run's time so far (all sessions of a resumed run)."""
        self.steps += 1
        self.seconds = seconds
        self._apply()

    def _apply(self) -> None:
        for group in self.opt.param_groups:
            group["lr"] = self.rate(self.progress)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": self.seconds, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a run: its steps and time so far, on this (possibly longer) schedule."""
        self.steps, self.seconds = int(state.get("steps", 0)), float(state.get("seconds", 0.0))
        old = int(state.get("total_steps", self.total_steps))
        if old != self.total_steps:
            log.info("resumed on a %d-step schedule (was %d steps), at step %d", self.total_steps, old, self.steps)
        self._apply()
