"""Optimiser and learning-rate schedule of a training run (and the schedule of a resumed, longer run)."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from geoseg.config import TrainConfig
from geoseg.errors import ConfigError

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


def resumed_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, sched: Any, saved: dict[str, Any],
                       total_steps: int) -> Any:
    """The learning-rate schedule of a resumed run. With the same number of epochs it is the saved one; when
    ``epochs`` was raised, the schedule is the new, longer one, continued from the steps already taken (the
    saved one would end early: a onecycle schedule refuses to step past its last step)."""
    sched.load_state_dict(saved)
    old_total = saved.get("total_steps", saved.get("T_max"))
    if old_total is None or old_total == max(total_steps, 1 if cfg.optimizer.schedule == "cosine" else 2):
        return sched
    done = int(saved.get("last_epoch", 0))
    for group in opt.param_groups:  # the new schedule starts from the configured learning rate
        group.pop("initial_lr", None)
        group["lr"] = cfg.optimizer.lr
    fresh = scheduler(cfg, opt, total_steps)
    if done >= total_steps:
        raise ConfigError(f"epochs {cfg.epochs}: the run already took {done} optimiser steps of {total_steps}; "
                          "raise epochs to continue it")
    with warnings.catch_warnings():  # "scheduler stepped before the optimiser": on purpose here
        warnings.simplefilter("ignore")
        for _ in range(done):  # replay the steps taken, so the rate is where the longer schedule has it
            fresh.step()
    log.info("resumed with a %d-step schedule (was %d steps), at step %d", total_steps, old_total, done)
    return fresh


def scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int) -> Any:
    s = cfg.optimizer.schedule
    if s == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1), eta_min=cfg.optimizer.lr * 0.01)
    if s == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.optimizer.lr, total_steps=max(total_steps, 2))
    return None
