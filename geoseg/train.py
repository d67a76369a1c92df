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
import csv
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geoseg import augment as augment_mod
from geoseg.backends import first_output
from geoseg.bundle import ArchSpec, ClassInfo, Contract, InputSpec, save_bundle, staged_file
from geoseg.config import LOSS_NAMES, TrainConfig, config_from_dict, dump_config, load_config
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
from geoseg.errors import ConfigError, InputError, OutputExistsError, unknown_name
from geoseg.inference import resolve_device
from geoseg.metrics import ConfusionMatrix, scores
from geoseg.models import create_network, input_divisor
from geoseg.remote import storage_error

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


# ---------------------------------------------------------------------------------------------- losses


class _MaskedBCE(nn.Module):
    """Binary cross-entropy on one logit channel, ignoring ``ignore_index`` targets."""

    def __init__(self, ignore_index: int, pos_weight: float | None = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logit = logits[:, 0]
        keep = target != self.ignore_index
        if not keep.any():
            return logit.sum() * 0.0
        pw = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=logit.device)
        return F.binary_cross_entropy_with_logits(logit[keep], target[keep].float(), pos_weight=pw)


class _SafeCE(nn.Module):
    """Cross-entropy that returns 0 (not NaN) for a batch without any labelled pixel."""

    def __init__(self, weight: torch.Tensor | None, ignore_index: int, **params: Any):
        super().__init__()
        self.ce = nn.CrossEntropyLoss(weight=weight, ignore_index=ignore_index, **params)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if not (target != self.ignore_index).any():
            return logits.sum() * 0.0
        return self.ce(logits, target)  # type: ignore[no-any-return]


def _cross_entropy(mode: str, ignore: int, class_weights: list[float] | None, **params: Any) -> nn.Module:
    if mode == "binary":
        pw = None if class_weights is None else class_weights[1] / max(class_weights[0], 1e-12)
        return _MaskedBCE(ignore, params.pop("pos_weight", pw))
    w = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
    return _SafeCE(w, ignore, **params)


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
    in_ch = len(cfg.data.bands) if cfg.data.bands else None
    out_ch = 1 if cfg.model.activation == "sigmoid" else len(cfg.classes)
    chip = cfg.data.chip_size
    try:
        net = create_network(spec, in_ch or 3, out_ch, None).eval()
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


def build_model(cfg: TrainConfig, in_channels: int) -> nn.Module:
    """The network of a config, with pretrained encoder weights when ``model.encoder_weights`` is set.

    Raises:
        ConfigError: the chip size does not fit the network, or the encoder cannot be built.
    """
    spec = arch_spec(cfg)  # checked by check_network before the run started
    out_ch = 1 if cfg.model.activation == "sigmoid" else len(cfg.classes)
    net = create_network(spec, in_channels, out_ch, cfg.model.encoder_weights)
    if cfg.model.dropout > 0:
        _add_dropout(net, cfg.model.dropout)
    return net


def arch_spec(cfg: TrainConfig) -> ArchSpec:
    return ArchSpec(architecture=cfg.model.architecture, encoder=cfg.model.encoder,
                    params=dict(cfg.model.params), activation=cfg.model.activation)


def _class_weights(cfg: TrainConfig, counts: np.ndarray) -> list[float] | None:
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


def _predict_indexes(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Logits ``(N, K, H, W)`` -> training indexes ``(N, H, W)``."""
    if activation == "sigmoid":
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


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


def _write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    with staged_file(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


class _TensorBoard:
    """TensorBoard scalars, or nothing (with one warning) when tensorboard is not installed."""

    def __init__(self, folder: Path, enabled: bool):
        self.writer: Any = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed; skipping TensorBoard logs (pip install tensorboard)")
            return
        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, row: dict[str, Any], epoch: int) -> None:
        if self.writer is None:
            return
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                group = "train" if k.startswith("train_") or k == "lr" else "val"
                self.writer.add_scalar(f"{group}/{k}", v, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
    class_weights = _class_weights(cfg, data.class_counts)
    criterion = build_loss(cfg, class_weights).to(device)
    opt = _optimizer(cfg, net)
    steps_per_epoch = math.ceil(len(train_sampler) / cfg.batch_size)
    sched = _scheduler(cfg, opt, steps_per_epoch * cfg.epochs)
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
            sched = _resumed_scheduler(cfg, opt, sched, state["scheduler"], steps_per_epoch * cfg.epochs)
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

    tb = _TensorBoard(out / "tensorboard", cfg.tensorboard)
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
            _write_csv(out / "metrics.csv", history)
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
    bundle_path = _write_bundle(cfg, data, net, best_scores, history, stopped_early, out)
    if cfg.plots:
        _plots(cfg, data, val_locs, net, device, history, best_scores, out / "plots")
    return TrainResult(bundle_path, out, best_scores, int(best["epoch"]), len(history), stopped_early, history)


def _optimizer(cfg: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optimizer
    # no weight decay on biases and normalisation parameters
    decay = [p for p in net.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0)
    return torch.optim.AdamW(groups, lr=o.lr)


def _resumed_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, sched: Any, saved: dict[str, Any],
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
    fresh = _scheduler(cfg, opt, total_steps)
    if done >= total_steps:
        raise ConfigError(f"epochs {cfg.epochs}: the run already took {done} optimiser steps of {total_steps}; "
                          "raise epochs to continue it")
    with warnings.catch_warnings():  # "scheduler stepped before the optimiser": on purpose here
        warnings.simplefilter("ignore")
        for _ in range(done):  # replay the steps taken, so the rate is where the longer schedule has it
            fresh.step()
    log.info("resumed with a %d-step schedule (was %d steps), at step %d", total_steps, old_total, done)
    return fresh


def _scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, total_steps: int) -> Any:
    s = cfg.optimizer.schedule
    if s == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1), eta_min=cfg.optimizer.lr * 0.01)
    if s == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.optimizer.lr, total_steps=max(total_steps, 2))
    return None


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
        cm.update(target, _predict_indexes(logits.float(), cfg.model.activation))
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


# ---------------------------------------------------------------------------------------------- outputs


def make_contract(cfg: TrainConfig, data: PreparedData, metadata: dict[str, Any] | None = None) -> Contract:
    """The bundle contract of a trained config: architecture, bands, normalisation, classes, chip, overlap."""
    colors = cfg.class_colors()
    return Contract(
        name=cfg.name,
        model=arch_spec(cfg),
        input=InputSpec(bands=data.band_names, band_indexes=data.scenes[0].bands, mean=data.mean, std=data.std,
                        dtype=data.dtype, pixel_size=data.pixel_size),
        classes=[ClassInfo(id=c.id, name=c.name, color=colors[i]) for i, c in enumerate(cfg.classes)],
        chip_size=cfg.data.chip_size,
        overlap=cfg.overlap,
        background_class=cfg.background_class,
        metadata=metadata or {},
    )


def _write_bundle(cfg: TrainConfig, data: PreparedData, net: nn.Module, best_scores: dict[str, Any],
                  history: list[dict[str, Any]], stopped_early: bool, out: Path) -> Path:
    from geoseg.metrics import markdown_table

    split = data.split_summary()
    meta = {
        "training": {
            "config": cfg.model_dump(mode="json"),
            "best_epoch": best_scores.get("epoch"),
            "epochs_run": len(history),
            "stopped_early": stopped_early,
            "class_counts": data.class_counts.tolist(),
            "split": {"block": split["block"],
                      "scenes": [{"image": s["image"], "pixels": s["pixels"]} for s in split["scenes"]]},
        },
        "validation": best_scores,
    }
    contract = make_contract(cfg, data, meta)
    path = out / "model"
    save_bundle(path, contract, net, overwrite=True)
    dump_config(cfg, path / "config.yaml")
    (path / "metrics.json").write_text(json.dumps(best_scores, indent=2) + "\n")
    if best_scores.get("classes"):
        (path / "metrics.md").write_text(markdown_table(best_scores))
    log.info("bundle written to %s", path)
    return path


def _plots(cfg: TrainConfig, data: PreparedData, val_locs: list[ChipLocation], net: nn.Module,
           device: torch.device, history: list[dict[str, Any]], best_scores: dict[str, Any], folder: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; skipping plots (pip install matplotlib)")
        return
    from geoseg.metrics import plot_confusion

    folder.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_loss"] for r in history], label="train")
    if any("val_loss" in r for r in history):
        ax.plot(epochs, [r.get("val_loss", math.nan) for r in history], label="validation")
    ax.set(xlabel="epoch", ylabel="loss", title="loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=100)
    plt.close(fig)
    if any("val_miou" in r for r in history):
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in (("val_miou", "mean IoU"), ("val_accuracy", "accuracy"), ("val_mf1", "mean F1")):
            ax.plot(epochs, [_nan(r.get(key)) for r in history], label=label, lw=2)
        for c in cfg.classes:
            ax.plot(epochs, [_nan(r.get(f"val_iou_{c.name}")) for r in history], label=f"IoU {c.name}", lw=1, ls="--")
        ax.set(xlabel="epoch", ylabel="score", title="validation", ylim=(0, 1))
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "metrics.png", dpi=100)
        plt.close(fig)
    if best_scores.get("confusion_matrix"):
        plot_confusion(np.asarray(best_scores["confusion_matrix"]), [c.name for c in cfg.classes],
                       folder / "confusion.png", title=f"validation, epoch {best_scores.get('epoch')}")
    if val_locs and cfg.preview_chips:
        _preview(cfg, data, val_locs, net, device, folder / "val_chips.png")


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


@torch.no_grad()
def _preview(cfg: TrainConfig, data: PreparedData, val_locs: list[ChipLocation], net: nn.Module,
             device: torch.device, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    step = max(1, len(val_locs) // cfg.preview_chips)
    locs = val_locs[::step][: cfg.preview_chips]
    ds = ChipDataset(data.scenes, locs, data.class_map, data.mean, data.std, cfg.data.chip_size)
    colors = np.asarray(cfg.class_colors() + [(255, 255, 255)], dtype=float) / 255
    cmap = ListedColormap(colors)
    k = len(cfg.classes)
    net.eval()
    fig, axes = plt.subplots(len(locs), 3, figsize=(9, 3 * len(locs)), squeeze=False)
    for i, loc in enumerate(locs):
        img, target = ds.read(loc)
        logits = net(torch.from_numpy(img)[None].to(device)).float()
        pred = _predict_indexes(logits, cfg.model.activation)[0].cpu().numpy()
        show = img[:3] if img.shape[0] >= 3 else img[:1]
        show = np.clip((show + 2.5) / 5, 0, 1)
        axes[i, 0].imshow(show.transpose(1, 2, 0) if show.shape[0] == 3 else show[0], cmap=None if show.shape[0] == 3 else "gray")
        tgt = np.where(target == IGNORE_INDEX, k, target)
        axes[i, 1].imshow(tgt, cmap=cmap, vmin=0, vmax=k, interpolation="nearest")
        axes[i, 2].imshow(pred, cmap=cmap, vmin=0, vmax=k, interpolation="nearest")
        for j, t in enumerate(("image", "label (white: ignored)", "prediction")):
            axes[i, j].set_title(f"{t}" if i == 0 else "", fontsize=9)
            axes[i, j].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


__all__ = ["train", "TrainResult", "TrainProgress", "LOSSES", "build_loss", "build_model", "make_contract"]
