"""Training: a config in, a model bundle out.

:func:`train` prepares the data (:mod:`geoseg.data`), builds any architecture of :mod:`geoseg.models`,
trains it with a weighted sum of named losses, validates on chips of the validation split every epoch,
keeps the best and the last checkpoint, and finally writes the best weights as a model bundle
(:func:`geoseg.bundle.save_bundle`) whose contract carries everything ``predict`` needs.

Output folder layout::

    config.yaml            the exact config used
    split/                 split.json (blocks per scene) and <scene>_<split>.geojson (areas of each split)
    checkpoints/           last.ckpt (resume) and best.ckpt
    metrics.csv            one row per epoch; tensorboard/ the same as TensorBoard scalars
    model/                 the bundle (model.json, weights.safetensors) + config.yaml, metrics.json, metrics.md
    plots/                 loss.png, metrics.png, confusion.png, val_chips.png

Repeatability: chip locations are drawn from ``(seed, epoch)``, augmentations from ``(seed, epoch, chip)``
and torch's global generator is reseeded from ``(seed, epoch)`` at every epoch, so a run with the same
config gives the same weights on the CPU, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from geoseg import augment as augment_mod
from geoseg.bundle import staged_file
from geoseg.config import TrainConfig, config_from_dict, dump_config, load_config
from geoseg.data import (
    IGNORE_INDEX,
    ChipDataset,
    ChipLocation,
    ChipRules,
    GridChipSampler,
    PreparedData,
    RandomChipSampler,
    prepare_data,
)
from geoseg.errors import ConfigError, InputError, OutputExistsError
from geoseg.inference import resolve_device
from geoseg.losses import LOSSES, build_loss, class_weights
from geoseg.metrics import ConfusionMatrix, scores
from geoseg.models import build_model, check_network
from geoseg.optim import optimizer, resumed_scheduler, scheduler
from geoseg.remote import storage_error
from geoseg.train_outputs import TensorBoard, make_contract, plots, predict_indexes, write_bundle, write_csv

log = logging.getLogger(__name__)

OUTPUTS = ("config.yaml", "split", "checkpoints", "metrics.csv", "tensorboard", "model", "plots")
MONITOR_MODE = {"miou": "max", "accuracy": "max", "f1": "max", "loss": "min"}


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


@dataclass
class TrainResult:
    """What a run produced.

    ``metrics`` holds the validation scores of the best epoch (see :func:`geoseg.metrics.scores`) plus
    ``val_loss`` and ``epoch``; it is empty when there was no validation split.
    """

    bundle_path: Path
    output_dir: Path
    metrics: dict[str, Any]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------- helpers


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, 11]).generate_state(1)[0])


def _config_hash(cfg: TrainConfig) -> str:
    d = cfg.model_dump(mode="json")
    # what may change between an interrupted run and its resumption
    for key in ("epochs", "max_seconds", "device", "threads", "plots", "tensorboard", "preview_chips", "early_stopping"):
        d.pop(key, None)
    d["data"].pop("workers", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_save(obj: Any, path: Path) -> None:
    with staged_file(path) as tmp:
        torch.save(obj, tmp)


def _prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder; choose another --output-dir")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not resume:
        if not overwrite:
            raise OutputExistsError(f"{out}: already holds a training run ({', '.join(existing)}); pass --resume "
                                    "to continue it, --overwrite to replace it, or choose another --output-dir")
        for name in existing:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(str(out), "write", exc, remote=False) from None


# ---------------------------------------------------------------------------------------------- the run


def _as_config(config: TrainConfig | dict[str, Any] | str | os.PathLike[str]) -> TrainConfig:
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, dict):
        return config_from_dict(config)
    return load_config(config)


def _monitor_value(row: dict[str, Any], monitor: str) -> float | None:
    key = {"miou": "val_miou", "accuracy": "val_accuracy", "f1": "val_mf1", "loss": "val_loss"}[monitor]
    v = row.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def train(config: TrainConfig | dict[str, Any] | str | os.PathLike[str], output_dir: str | os.PathLike[str], *,
          resume: bool = False, overwrite: bool = False, progress: ProgressCallback | None = None) -> TrainResult:
    """Train a segmentation model and write its bundle.

    Args:
        config: a :class:`geoseg.config.TrainConfig`, a mapping of the same keys, or a YAML file path.
        output_dir: folder for checkpoints, logs, plots and the bundle (``<output_dir>/model``).
        resume: continue the run in ``output_dir`` from its last checkpoint (same config required; the
            number of epochs may be raised). Without a checkpoint, a new run starts.
        overwrite: replace an earlier run's outputs in ``output_dir``.
        progress: called with a :class:`TrainProgress` after every scan window and every batch.

    Returns:
        The bundle path, the best epoch's validation metrics and the per-epoch history.

    Raises:
        ConfigError: an invalid config, device or a resumed run whose config changed.
        InputError: scenes or labels that cannot be used.
        OutputExistsError: ``output_dir`` holds a run and neither ``resume`` nor ``overwrite`` is given.
    """
    cfg = _as_config(config)
    out = Path(output_dir)
    check_network(cfg)
    existed = out.exists()
    _prepare_output(out, resume, overwrite)
    try:
        return _run(cfg, out, resume, progress)
    except BaseException:
        # a run that stopped before its first checkpoint leaves nothing behind (so the same command can run
        # again without --overwrite); one with a checkpoint keeps it for --resume
        if not (out / "checkpoints" / "last.ckpt").exists():
            for name in OUTPUTS:
                p = out / name
                with contextlib.suppress(OSError):
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            if not existed:
                with contextlib.suppress(OSError):
                    out.rmdir()
        raise


def _run(cfg: TrainConfig, out: Path, resume: bool, progress: ProgressCallback | None) -> TrainResult:
    """The body of :func:`train` once its output folder is ready."""
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    last_path, best_path = ckpt_dir / "last.ckpt", ckpt_dir / "best.ckpt"
    dump_config(cfg, out / "config.yaml")

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    _seed_all(cfg.seed)

    def scan_progress(stage: str, k: int, n: int) -> None:
        if progress:
            progress(TrainProgress(stage, 0, cfg.epochs, k, n))

    data = prepare_data(cfg, scan_progress)
    data.write_split(out / "split")
    rules = ChipRules(cfg.data.chip_size, cfg.data.min_valid_fraction, cfg.data.min_labelled_fraction)
    train_sampler: RandomChipSampler | GridChipSampler
    grid_train = GridChipSampler(data.scenes, data.coverages, rules, "train")
    if cfg.steps_per_epoch:
        samples = cfg.steps_per_epoch * cfg.batch_size
    elif cfg.data.samples_per_epoch:
        samples = cfg.data.samples_per_epoch
    else:
        samples = max(len(grid_train), cfg.batch_size)
    if cfg.data.sampler == "random":
        train_sampler = RandomChipSampler(data.coverages, rules, "train", samples, cfg.seed)
    else:
        train_sampler = grid_train
    if len(train_sampler) == 0:
        raise InputError(f"{data.scenes[0].path}: no training chip of {cfg.data.chip_size} px passes the rules "
                         f"(min_valid_fraction {cfg.data.min_valid_fraction}, min_labelled_fraction "
                         f"{cfg.data.min_labelled_fraction}) inside the train blocks; lower chip_size or the fractions")
    val_locs = GridChipSampler(data.scenes, data.coverages, rules, "val").locations()
    if cfg.val_batches:
        val_locs = val_locs[: cfg.val_batches * cfg.batch_size]
    if not val_locs:
        log.warning("no validation chip fits the val blocks; the last epoch's weights become the model "
                    "(raise data.val_fraction or data.split_block, or lower chip_size)")
    log.info("%d training chips per epoch, %d validation chips", len(train_sampler), len(val_locs))

    net = build_model(cfg, len(data.mean)).to(device)
    criterion = build_loss(cfg, class_weights(cfg, data.class_counts)).to(device)
    opt = optimizer(cfg, net)
    steps_per_epoch = math.ceil(len(train_sampler) / cfg.batch_size)
    sched = scheduler(cfg, opt, steps_per_epoch * cfg.epochs)
    use_amp, amp_dtype = _amp_settings(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    augment = augment_mod.from_config(cfg.augment, IGNORE_INDEX)
    cfg_hash = _config_hash(cfg)

    history: list[dict[str, Any]] = []
    start_epoch, best_score, best_epoch, bad_epochs = 1, None, 0, 0
    best_scores: dict[str, Any] = {}
    if resume and last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if state.get("config_hash") != cfg_hash:
            raise ConfigError(f"{out / 'config.yaml'}: the config differs from the interrupted run's (other than "
                              "epochs, device or early stopping); resume with the same config or start a new run")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if sched is not None and state.get("scheduler") is not None:
            sched = resumed_scheduler(cfg, opt, sched, state["scheduler"], steps_per_epoch * cfg.epochs)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = list(state["history"])
        start_epoch = int(state["epoch"]) + 1
        best_score, best_epoch, bad_epochs = state["best_score"], int(state["best_epoch"]), int(state["bad_epochs"])
        best_scores = dict(state.get("best_scores") or {})
        _set_rng(state["rng"])
        log.info("resuming %s at epoch %d", out, start_epoch)
    elif resume:
        log.warning("%s: no checkpoint to resume from; starting a new run", last_path)

    tb = TensorBoard(out / "tensorboard", cfg.tensorboard)
    mode = MONITOR_MODE[cfg.monitor]
    stopped_early = False
    run_start = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            if cfg.early_stopping.patience and bad_epochs >= cfg.early_stopping.patience:
                log.info("early stopping: no improvement of %s for %d epochs", cfg.monitor, bad_epochs)
                stopped_early = True
                break
            if cfg.max_seconds and history and epoch > start_epoch:
                elapsed = time.perf_counter() - run_start
                if elapsed + float(history[-1]["seconds"]) > cfg.max_seconds:
                    log.info("time budget of %.0f s reached after %d epoch(s)", cfg.max_seconds, epoch - 1)
                    stopped_early = True
                    break
            t0 = time.perf_counter()
            torch.manual_seed(_epoch_seed(cfg.seed, epoch))
            locs = train_sampler.locations(epoch)
            if isinstance(train_sampler, GridChipSampler):
                order = np.random.default_rng([cfg.seed, epoch, 3]).permutation(len(locs))
                locs = [locs[i] for i in order]
            train_loss = _train_epoch(cfg, data, locs, augment, epoch, net, criterion, opt, sched, scaler,
                                      device, use_amp, amp_dtype, progress)
            row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": opt.param_groups[0]["lr"]}
            val_scores: dict[str, Any] = {}
            if val_locs:
                val_loss, cm = _validate(cfg, data, val_locs, net, criterion, device, use_amp, amp_dtype, epoch, progress)
                val_scores = scores(cm.matrix, [c.name for c in cfg.classes])
                val_scores["val_loss"] = val_loss
                row.update(val_loss=val_loss, val_miou=val_scores["miou"], val_accuracy=val_scores["accuracy"],
                           val_mf1=val_scores["mf1"])
                for c in val_scores["classes"]:
                    row[f"val_iou_{c['name']}"] = c["iou"]
            row["seconds"] = round(time.perf_counter() - t0, 3)
            history.append(row)
            value = _monitor_value(row, cfg.monitor) if val_locs else None
            is_best = not val_locs or (value is not None and _improved(value, best_score, mode,
                                                                       cfg.early_stopping.min_delta))
            if is_best:
                best_score = value if value is not None else best_score
                best_epoch, bad_epochs = epoch, 0
                best_scores = {**val_scores, "epoch": epoch}
                _atomic_save({"model": net.state_dict(), "epoch": epoch, "scores": best_scores}, best_path)
            else:
                bad_epochs += 1
            _atomic_save({
                "model": net.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": None if sched is None else sched.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch, "bad_epochs": bad_epochs,
                "best_scores": best_scores, "history": history, "rng": _get_rng(), "config_hash": cfg_hash,
            }, last_path)
            write_csv(out / "metrics.csv", history)
            tb.log(row, epoch)
            log.info("epoch %d/%d: %s", epoch, cfg.epochs,
                     ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))
    finally:
        tb.close()

    if not best_path.exists():
        raise InputError(f"{out}: no epoch was trained; raise epochs")
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    net.load_state_dict(best["model"])
    best_scores = dict(best.get("scores") or {})
    bundle_path = write_bundle(cfg, data, net, best_scores, history, stopped_early, out)
    if cfg.plots:
        plots(cfg, data, val_locs, net, device, history, best_scores, out / "plots")
    return TrainResult(bundle_path, out, best_scores, int(best["epoch"]), len(history), stopped_early, history)


def _amp_settings(cfg: TrainConfig, device: torch.device) -> tuple[bool, torch.dtype]:
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


def _loader(cfg: TrainConfig, data: PreparedData, locs: list[ChipLocation], augment: Any, epoch: int,
            device: torch.device) -> torch.utils.data.DataLoader:
    ds = ChipDataset(data.scenes, locs, data.class_map, data.mean, data.std, cfg.data.chip_size, augment,
                     cfg.seed, epoch)
    # ChipDataset is a map-style dataset (len + getitem); data.py stays importable without torch
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=False,  # type: ignore[arg-type]
                                       num_workers=cfg.data.workers,
                                       pin_memory=device.type == "cuda", drop_last=False)


def _train_epoch(cfg: TrainConfig, data: PreparedData, locs: list[ChipLocation], augment: Any, epoch: int,
                 net: nn.Module, criterion: nn.Module, opt: torch.optim.Optimizer, sched: Any,
                 scaler: torch.amp.GradScaler, device: torch.device, use_amp: bool, amp_dtype: torch.dtype,
                 progress: ProgressCallback | None) -> float:
    net.train()
    loader = _loader(cfg, data, locs, augment, epoch, device)
    total, n = 0.0, 0
    for step, (image, target) in enumerate(loader, start=1):
        image = image.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            logits = net(image)
        loss = criterion(logits, target)
        scaler.scale(loss).backward()
        if cfg.optimizer.grad_clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optimizer.grad_clip)
        scaler.step(opt)
        scaler.update()
        if sched is not None:
            sched.step()
        total += float(loss.detach()) * image.shape[0]
        n += image.shape[0]
        if progress:
            progress(TrainProgress("train", epoch, cfg.epochs, step, len(loader), {"loss": total / n}))
    return total / max(n, 1)


@torch.no_grad()
def _validate(cfg: TrainConfig, data: PreparedData, locs: list[ChipLocation], net: nn.Module,
              criterion: nn.Module, device: torch.device, use_amp: bool, amp_dtype: torch.dtype, epoch: int,
              progress: ProgressCallback | None) -> tuple[float, ConfusionMatrix]:
    net.eval()
    loader = _loader(cfg, data, locs, None, epoch, device)
    cm = ConfusionMatrix(len(cfg.classes))
    total, n = 0.0, 0
    for step, (image, target) in enumerate(loader, start=1):
        image, target = image.to(device), target.to(device)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            logits = net(image)
        total += float(criterion(logits, target)) * image.shape[0]
        n += image.shape[0]
        cm.update(target, predict_indexes(logits.float(), cfg.model.activation))
        if progress:
            progress(TrainProgress("val", epoch, cfg.epochs, step, len(loader), {"val_loss": total / n}))
    return total / max(n, 1), cm


def _get_rng() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def _set_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state.get("python")
    if py is not None:
        random.setstate((py[0], tuple(py[1]), py[2]))


__all__ = ["train", "TrainResult", "TrainProgress", "LOSSES", "build_loss", "build_model", "make_contract"]
