"""Training: a config in, a model bundle out.

:func:`train` prepares the data (:mod:`geoseg.learn.data`), builds any architecture of :mod:`geoseg.model.networks`,
trains it with a weighted sum of named losses, validates on chips of the validation split every epoch,
keeps the best and the last checkpoint, and finally writes the best weights as a model bundle
(:func:`geoseg.model.bundle.save_bundle`) whose contract carries everything ``predict`` needs.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoseg.errors import ConfigError, InputError, OutputExistsError
from geoseg.io.remote import storage_error
from geoseg.io.staging import sweep_dead_temporaries
from geoseg.io.store import staged_file
from geoseg.learn.config import (
    TrainConfig,
    config_from_dict,
    dump_config,
    load_config,
)
from geoseg.learn.data import (
    ChipRules,
    GridChipSampler,
    RandomChipSampler,
    prepare_data,
)
from geoseg.learn.finetune import use_pretrained_normalization
from geoseg.learn.loop import (
    Progress,
    ProgressCallback,
    Samples,
    Trainer,
    TrainProgress,
    shown,
    train_epoch,
    used_weights,
    validate,
)
from geoseg.learn.losses import LOSSES, build_loss  # re-exported
from geoseg.learn.metrics import scores
from geoseg.learn.network import (
    build_model,  # re-exported
    check_network,
)
from geoseg.learn.outputs import (
    TensorBoard,
    make_contract,  # re-exported
    plots,
    write_bundle,
    write_csv,
)
from geoseg.learn.sizing import fit_to_data
from geoseg.predict.hardware import resolve_device

log = logging.getLogger(__name__)

OUTPUTS = ("config.yaml", "split", "checkpoints", "metrics.csv", "tensorboard", "model", "plots")
MIN_BATCHES_PER_EPOCH = 16
MONITOR_MODE = {"miou": "max", "accuracy": "max", "f1": "max", "loss": "min"}




@dataclass
class TrainResult:
    """What a run produced.

    ``metrics`` holds the validation scores of the best epoch (see :func:`geoseg.learn.metrics.scores`) plus
    ``val_loss`` and ``epoch``; it is empty when there was no validation split.
    """

    bundle_path: Path
    output_dir: Path
    metrics: dict[str, Any]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]]
    chips_seen: int = 0
    seconds: float = 0.0
    stopped_by: str = "epochs"  # epochs, max_seconds or early_stopping
    kept: str = "last"  # which epoch's weights the bundle holds (best_epoch): the config's ``keep``


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
    for key in ("epochs", "passes", "max_seconds", "device", "threads", "plots", "tensorboard", "preview_chips",
                "early_stopping", "keep"):
        d.pop(key, None)
    d["data"].pop("workers", None)
    # keys at their defaults: the hash of a run begun before the keys existed
    for section, key, default in _LATER_KEYS:
        if d[section].get(key) == default:
            d[section].pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_LATER_KEYS = (("optimizer", "ema", None), ("optimizer", "encoder_lr_scale", 1.0), ("optimizer", "warmup", None),
               ("model", "normalization", "data"), ("model", "pretrained_scale", None), ("model", "freeze_bn", False),
               ("model", "freeze_encoder_fraction", 0.0), ("augment", "rotate", 0.0), ("augment", "shift", 0.0),
               ("augment", "shear", 0.0), ("augment", "affine_p", 0.5))


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
        config: a :class:`geoseg.learn.config.TrainConfig`, a mapping of the same keys, or a YAML file path.
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
    cfg = fit_to_data(_as_config(config))
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


def _samples(cfg: TrainConfig, out: Path, progress: ProgressCallback | None) -> Samples:
    """Scan the scenes, write the split and make the training and validation chip samplers."""
    def scan_progress(stage: str, k: int, n: int) -> None:
        if progress:
            progress(TrainProgress(stage, 0, shown(cfg.epoch_limit), k, n))

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
        # at least 16 batches: an epoch (one validation, one checkpoint) is not a few steps on a small scene
        samples = max(len(grid_train), MIN_BATCHES_PER_EPOCH * cfg.batch_size)
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
    if data.has_val_blocks and not val_locs:
        log.warning("no validation chip fits the val blocks; the last epoch's weights become the model "
                    "(raise data.val_fraction or data.split_block, or lower chip_size)")
    log.info("%d training chips per epoch, %d validation chips", len(train_sampler), len(val_locs))
    return Samples(data, train_sampler, val_locs, cfg.batch_size)


def _run(cfg: TrainConfig, out: Path, resume: bool, progress: ProgressCallback | None) -> TrainResult:
    """The body of :func:`train` once its output folder is ready."""
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    last_path, best_path = ckpt_dir / "last.ckpt", ckpt_dir / "best.ckpt"
    for path in (last_path, best_path):  # a run killed while it saved one (a resumed run may never save again)
        sweep_dead_temporaries(ckpt_dir, path.name)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    _seed_all(cfg.seed)
    samples = _samples(cfg, out, progress)
    if "val_fraction" not in cfg.data.model_fields_set and not samples.data.has_val_blocks:
        # the split rule left a small set without validation (geoseg.learn.splits): record it, so that config.yaml
        # reproduces the run (and resumes it) as it was
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"val_fraction": 0.0})})
    dump_config(cfg, out / "config.yaml")
    data = samples.data
    data.mean, data.std = use_pretrained_normalization(cfg, data.band_names, data.dtype, data.mean, data.std)
    trainer = Trainer.build(cfg, device, samples)
    cfg_hash = _config_hash(cfg)
    done = Progress()
    if resume and last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if state.get("config_hash") != cfg_hash or "progress" not in state:
            raise ConfigError(f"{out / 'config.yaml'}: the config differs from the interrupted run's (other than "
                              "epochs, passes, max_seconds, device or early stopping); resume with the same config or "
                              "start a new run")
        done = trainer.restore(state)
        ended = done.epoch >= cfg.epoch_limit or trainer.schedule.done or (
            cfg.early_stopping.patience is not None and done.bad_epochs >= cfg.early_stopping.patience)
        if ended:  # (killed before its bundle was written): the bundle from the best checkpoint
            log.warning("%s: the run already ended (%d epochs, %.0f s, stopped by %s); writing its bundle. Raise "
                        "epochs, passes or max_seconds to train on", out, done.epoch, done.seconds, done.stopped_by)
        else:
            log.info("resuming %s at epoch %d", out, done.epoch + 1)
            done.stopped_by = "epochs"
            _fit(cfg, samples, trainer, done, out, cfg_hash, progress)
    else:
        if resume:
            log.warning("%s: no checkpoint to resume from; starting a new run", last_path)
        _fit(cfg, samples, trainer, done, out, cfg_hash, progress)
    if not best_path.exists():
        raise InputError(f"{out}: no epoch was trained; raise epochs")
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    trainer.net.load_state_dict(used_weights(trainer.net, best["model"]))
    done.best_scores = dict(best.get("scores") or {})
    passes = samples.passes(done.chips)
    _say_what_the_budget_bought(cfg, done, passes)
    bundle_path = write_bundle(cfg, samples.data, trainer.net, done.best_scores, done.history,
                               _summary(cfg, done, passes), out)
    if cfg.plots:
        plots(cfg, samples.data, samples.val, trainer.net, device, done.history, done.best_scores, out / "plots")
    return TrainResult(bundle_path, out, done.best_scores, int(best["epoch"]), len(done.history),
                       done.stopped_by != "epochs", done.history, chips_seen=done.chips, seconds=done.seconds,
                       stopped_by=done.stopped_by, kept=cfg.keep)


def _fit(cfg: TrainConfig, samples: Samples, trainer: Trainer, done: Progress, out: Path, cfg_hash: str,
         progress: ProgressCallback | None) -> None:
    """Epochs until ``epochs``, the time budget (the schedule's end) or early stopping; a checkpoint each."""
    tb = TensorBoard(out / "tensorboard", cfg.tensorboard)
    mode = MONITOR_MODE[cfg.monitor]
    session_start, carried = time.perf_counter(), done.seconds
    clock = lambda: carried + time.perf_counter() - session_start  # noqa: E731
    try:
        while done.epoch < cfg.epoch_limit:
            if cfg.early_stopping.patience and done.bad_epochs >= cfg.early_stopping.patience:
                log.info("early stopping: no improvement of %s for %d epochs", cfg.monitor, done.bad_epochs)
                done.stopped_by = "early_stopping"
                break
            epoch = done.epoch + 1
            t0 = time.perf_counter()
            torch.manual_seed(_epoch_seed(cfg.seed, epoch))
            locs = samples.train.locations(epoch)
            if isinstance(samples.train, GridChipSampler):
                order = np.random.default_rng([cfg.seed, epoch, 3]).permutation(len(locs))
                locs = [locs[i] for i in order]
            train_loss, chips = train_epoch(cfg, samples.data, locs, epoch, trainer, clock, progress)
            done.chips += chips
            row: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": trainer.schedule.rate(trainer.schedule.progress),
                                   "chips": done.chips}
            val_scores: dict[str, Any] = {}
            if samples.val:
                tv = time.perf_counter()
                val_loss, cm = validate(cfg, samples.data, samples.val, trainer, epoch, progress)
                trainer.schedule.reserve = 1.5 * (time.perf_counter() - tv) + 2.0  # the last validation's time
                val_scores = scores(cm.matrix, [c.name for c in cfg.classes])
                val_scores["val_loss"] = val_loss
                row.update(val_loss=val_loss, val_miou=val_scores["miou"], val_accuracy=val_scores["accuracy"],
                           val_mf1=val_scores["mf1"])
                for c in val_scores["classes"]:
                    row[f"val_iou_{c['name']}"] = c["iou"]
            row["seconds"] = round(time.perf_counter() - t0, 3)
            done.history.append(row)
            done.epoch, done.seconds = epoch, clock()
            _keep_epoch(cfg, trainer, done, row, val_scores, mode, out / "checkpoints" / "best.ckpt")
            if trainer.schedule.done and done.epoch < cfg.epoch_limit:  # the passes or the time budget
                done.stopped_by = "passes" if trainer.schedule.steps >= trainer.schedule.total_steps else "max_seconds"
            _atomic_save(trainer.checkpoint(done, cfg_hash), out / "checkpoints" / "last.ckpt")
            write_csv(out / "metrics.csv", done.history)
            tb.log(row, epoch)
            log.info("epoch %d%s: %s", epoch, f"/{shown(cfg.epoch_limit)}" if shown(cfg.epoch_limit) else "",
                     ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))
            if done.stopped_by in ("passes", "max_seconds"):
                break
    finally:
        tb.close()


def _keep_epoch(cfg: TrainConfig, trainer: Trainer, done: Progress, row: dict[str, Any],
               val_scores: dict[str, Any], mode: str, best_path: Path) -> None:
    value = _monitor_value(row, cfg.monitor) if val_scores else None
    improved = not val_scores or (value is not None and _improved(value, done.best_score, mode,
                                                                  cfg.early_stopping.min_delta))
    if improved:  # what early stopping counts
        done.best_score = value if value is not None else done.best_score
        done.bad_epochs = 0
    else:
        done.bad_epochs += 1
    if improved or cfg.keep == "last":  # the kept checkpoint (best.ckpt): the weights the bundle gets
        done.best_epoch = row["epoch"]
        done.best_scores = {**val_scores, "epoch": row["epoch"]}
        _atomic_save({"model": trainer.kept.state_dict(), "epoch": row["epoch"], "scores": done.best_scores},
                     best_path)


def _summary(cfg: TrainConfig, done: Progress, passes: float) -> dict[str, Any]:
    return {"epochs_run": done.epoch, "chips_seen": done.chips, "passes": round(passes, 1),
            "seconds": round(done.seconds, 1),
            "best_epoch": done.best_epoch, "kept": cfg.keep, "stopped_by": done.stopped_by}


def _say_what_the_budget_bought(cfg: TrainConfig, done: Progress, passes: float) -> None:
    best = done.best_scores.get("miou")
    log.info("trained %d epoch(s), %d chips (%.0f passes over the labelled pixels) in %.0f s (stopped by %s); "
             "kept epoch %d (%s)%s", done.epoch, done.chips, passes, done.seconds, done.stopped_by.replace("_", " "),
             done.best_epoch, cfg.keep, f", validation mean IoU {best:.3f}" if isinstance(best, float) else "")

__all__ = ["train", "TrainResult", "TrainProgress", "LOSSES", "build_loss", "build_model", "make_contract"]
