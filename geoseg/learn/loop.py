"""The training loop's parts: where a run's chips come from, what it has done, the trainer (network, loss,
optimiser, schedule and precision on a device, and its checkpoint state) and one epoch of training and of
validation. :mod:`geoseg.learn.train` runs them, epoch after epoch, within the run's budget."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from geoseg.learn import augment as augment_mod
from geoseg.learn.config import UNBOUNDED_EPOCHS, TrainConfig
from geoseg.learn.data import (
    IGNORE_INDEX,
    ChipDataset,
    ChipLocation,
    GridChipSampler,
    PreparedData,
    RandomChipSampler,
)
from geoseg.learn.finetune import EncoderFreeze, freeze_batchnorm
from geoseg.learn.losses import build_loss, class_weights
from geoseg.learn.metrics import ConfusionMatrix
from geoseg.learn.network import build_model
from geoseg.learn.optim import Schedule, optimizer
from geoseg.learn.outputs import predict_indexes

log = logging.getLogger(__name__)


@dataclass
class TrainProgress:
    """One progress report: ``stage`` is "scan", "train" or "val"; ``step`` of ``total`` in that stage."""

    stage: str
    epoch: int
    epochs: int
    step: int
    total: int
    metrics: dict[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[TrainProgress], None]


def shown(limit: int) -> int:
    """The epoch count progress shows: 0 when the time budget decides."""
    return 0 if limit >= UNBOUNDED_EPOCHS else limit


@dataclass
class Samples:
    """Where the chips of a run come from."""

    data: PreparedData
    train: RandomChipSampler | GridChipSampler
    val: list[ChipLocation]
    batch_size: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.batch_size)

    def passes(self, chips: int) -> float:
        """How often ``chips`` training chips see each labelled training pixel, on average."""
        labelled = float(self.data.class_counts.sum())
        return chips * self.train.labelled_per_chip / labelled if labelled else 0.0

    @property
    def passes_per_epoch(self) -> float:
        return self.passes(len(self.train))

    def step_limit(self, cfg: TrainConfig) -> int:
        """Optimiser steps of the whole run: ``epochs`` of them, or fewer where ``passes`` binds first."""
        steps = self.steps_per_epoch * cfg.epoch_limit
        limit = cfg.pass_limit
        if limit is not None and self.passes_per_epoch > 0:
            steps = min(steps, math.ceil(limit / self.passes_per_epoch * self.steps_per_epoch))
        return max(steps, 1)


@dataclass
class Progress:
    """What the run has done so far (checkpointed, so a resumed run continues it)."""

    history: list[dict[str, Any]] = field(default_factory=list)
    epoch: int = 0
    best_score: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    best_scores: dict[str, Any] = field(default_factory=dict)
    chips: int = 0  # training chips seen
    seconds: float = 0.0  # wall time of the run's epochs (every session of a resumed run)
    stopped_by: str = "epochs"  # epochs, passes, max_seconds or early_stopping


@dataclass
class Trainer:
    """The network, loss, optimiser, schedule and precision of a run on its device."""

    cfg: TrainConfig
    device: torch.device
    net: nn.Module
    criterion: nn.Module
    opt: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    use_amp: bool
    amp_dtype: torch.dtype
    augment: Any
    ema: torch.optim.swa_utils.AveragedModel | None = None  # the weights' moving average (optimizer.ema)
    encoder_freeze: EncoderFreeze | None = None  # model.freeze_encoder_fraction

    def train_mode(self) -> None:
        """The network in training mode, its encoder's BatchNorm kept as pretrained with ``model.freeze_bn``."""
        self.net.train()
        if self.cfg.model.freeze_bn:
            freeze_batchnorm(self.net)

    @property
    def kept(self) -> nn.Module:
        """The network that validation scores and the best checkpoint keeps: the moving average, if any."""
        return self.ema.module if self.ema is not None else self.net

    @classmethod
    def build(cls, cfg: TrainConfig, device: torch.device, samples: Samples) -> Trainer:
        net = build_model(cfg, len(samples.data.mean), samples.data.band_names).to(device)
        if cfg.model.freeze_bn:
            log.info("encoder BatchNorm frozen: %d layers keep their statistics and parameters", freeze_batchnorm(net))
        criterion = build_loss(cfg, class_weights(cfg, samples.data.class_counts)).to(device)
        opt = optimizer(cfg, net)
        use_amp, amp_dtype = amp_settings(cfg, device)
        scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
        ema = None
        if cfg.optimizer.ema is not None:  # torch's own EMA; normalisation statistics are averaged too
            swa = torch.optim.swa_utils
            ema = swa.AveragedModel(net, multi_avg_fn=swa.get_ema_multi_avg_fn(cfg.optimizer.ema), use_buffers=True)
        schedule = Schedule(cfg.optimizer.schedule, cfg.optimizer.lr, opt, samples.step_limit(cfg), cfg.max_seconds,
                            cfg.optimizer.warmup)
        freeze = EncoderFreeze(net, cfg.model.freeze_encoder_fraction, cfg.model.freeze_bn) \
            if cfg.model.freeze_encoder_fraction > 0 else None
        return cls(cfg, device, net, criterion, opt, schedule, scaler, use_amp, amp_dtype,
                   augment_mod.from_config(cfg.augment, IGNORE_INDEX), ema, freeze)

    def checkpoint(self, done: Progress, cfg_hash: str) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "progress": dataclasses.asdict(done), "rng": get_rng(), "config_hash": cfg_hash}

    def restore(self, state: dict[str, Any]) -> Progress:
        self.net.load_state_dict(used_weights(self.net, state["model"]))
        self.opt.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state.get("schedule") or {})
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        set_rng(state["rng"])
        return Progress(**state["progress"])


def used_weights(net: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's weights without those of modules the network dropped (a run begun before they were)."""
    dropped = tuple(n + "." for n in getattr(net, "geoseg_unused", []))
    return {k: v for k, v in state.items() if not k.startswith(dropped)} if dropped else state


def amp_settings(cfg: TrainConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    if cfg.precision == "32":
        return False, torch.float32
    if device.type != "cuda":
        log.warning("precision %s needs CUDA; training in float32 on %s", cfg.precision, device)
        return False, torch.float32
    if cfg.precision == "bf16-mixed":
        if torch.cuda.is_bf16_supported():
            return True, torch.bfloat16
        log.warning("this GPU has no bfloat16; using float16 mixed precision")
    return True, torch.float16


def chip_loader(cfg: TrainConfig, data: PreparedData, locs: list[ChipLocation], augment: Any, epoch: int,
            device: torch.device) -> torch.utils.data.DataLoader:
    ds = ChipDataset(data.scenes, locs, data.class_map, data.mean, data.std, cfg.data.chip_size, augment,
                     cfg.seed, epoch)
    # ChipDataset is a map-style dataset (len + getitem); data.py stays importable without torch
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=False,  # type: ignore[arg-type]
                                       num_workers=cfg.data.workers,
                                       pin_memory=device.type == "cuda", drop_last=False)


def train_epoch(cfg: TrainConfig, data: PreparedData, locs: list[ChipLocation], epoch: int, t: Trainer,
                 clock: Callable[[], float], progress: ProgressCallback | None) -> tuple[float, int]:
    """One epoch of optimiser steps; it ends early when the schedule does (the time budget). Returns the mean
    loss and the number of chips seen."""
    t.train_mode()
    loader = chip_loader(cfg, data, locs, t.augment, epoch, t.device)
    total, n = 0.0, 0
    for step, (image, target) in enumerate(loader, start=1):
        if t.encoder_freeze is not None:
            t.encoder_freeze.update(t.schedule.progress)
        image = image.to(t.device, non_blocking=True)
        target = target.to(t.device, non_blocking=True)
        t.opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=t.device.type, dtype=t.amp_dtype, enabled=t.use_amp):
            logits = t.net(image)
        loss = t.criterion(logits, target)
        t.scaler.scale(loss).backward()
        if cfg.optimizer.grad_clip:
            t.scaler.unscale_(t.opt)
            torch.nn.utils.clip_grad_norm_(t.net.parameters(), cfg.optimizer.grad_clip)
        t.scaler.step(t.opt)
        t.scaler.update()
        if t.ema is not None:
            t.ema.update_parameters(t.net)
        t.schedule.step(clock())
        total += float(loss.detach()) * image.shape[0]
        n += image.shape[0]
        if progress:
            progress(TrainProgress("train", epoch, shown(cfg.epoch_limit), step, len(loader), {"loss": total / n}))
        if t.schedule.done:
            break
    return total / max(n, 1), n


@torch.no_grad()
def validate(cfg: TrainConfig, data: PreparedData, locs: list[ChipLocation], t: Trainer, epoch: int,
              progress: ProgressCallback | None) -> tuple[float, ConfusionMatrix]:
    net = t.kept.eval()
    loader = chip_loader(cfg, data, locs, None, epoch, t.device)
    cm = ConfusionMatrix(len(cfg.classes))
    total, n = 0.0, 0
    for step, (image, target) in enumerate(loader, start=1):
        image, target = image.to(t.device), target.to(t.device)
        with torch.autocast(device_type=t.device.type, dtype=t.amp_dtype, enabled=t.use_amp):
            logits = net(image)
        total += float(t.criterion(logits, target)) * image.shape[0]
        n += image.shape[0]
        cm.update(target, predict_indexes(logits.float(), cfg.model.activation))
        if progress:
            progress(TrainProgress("val", epoch, shown(cfg.epoch_limit), step, len(loader), {"val_loss": total / n}))
    return total / max(n, 1), cm


def get_rng() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state.get("python")
    if py is not None:
        random.setstate((py[0], tuple(py[1]), py[2]))


