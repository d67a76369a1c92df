"""What a training run writes besides checkpoints: metrics.csv, TensorBoard scalars, the bundle with its
contract and validation metrics, and the plots."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from geoseg.io.store import staged_file
from geoseg.learn.config import TrainConfig, dump_config
from geoseg.learn.data import IGNORE_INDEX, ChipDataset, ChipLocation, PreparedData
from geoseg.learn.network import arch_spec
from geoseg.model.bundle import save_bundle
from geoseg.model.contract import ClassInfo, Contract, InputSpec, PretrainedSource

log = logging.getLogger(__name__)


def predict_indexes(logits: torch.Tensor, activation: str) -> torch.Tensor:
    """Logits ``(N, K, H, W)`` -> training indexes ``(N, H, W)``."""
    if activation == "sigmoid":
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def write_csv(path: Path, history: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for row in history:
        keys.extend(k for k in row if k not in keys)
    with staged_file(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


class TensorBoard:
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


def make_contract(cfg: TrainConfig, data: PreparedData, metadata: dict[str, Any] | None = None,
                  unused: list[str] | None = None, pretrained: PretrainedSource | None = None) -> Contract:
    """The bundle contract of a trained config: architecture (and the modules it never calls), bands,
    normalisation, classes, chip, overlap, and where the encoder's weights came from."""
    colors = cfg.class_colors()
    return Contract(
        name=cfg.name,
        model=arch_spec(cfg).model_copy(update={"unused": list(unused or [])}),
        input=InputSpec(bands=data.band_names, band_indexes=data.scenes[0].bands, mean=data.mean, std=data.std,
                        dtype=data.dtype, pixel_size=data.pixel_size,
                        scene_bands=max(s.info.count - (1 if s.info.alpha_band else 0) for s in data.scenes)),
        classes=[ClassInfo(id=c.id, name=c.name, color=colors[i]) for i, c in enumerate(cfg.classes)],
        chip_size=cfg.data.chip_size,
        overlap=cfg.overlap,
        background_class=cfg.background_class,
        pretrained=pretrained,
        metadata=metadata or {},
    )


def write_bundle(cfg: TrainConfig, data: PreparedData, net: nn.Module, best_scores: dict[str, Any],
                  history: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> Path:
    """The bundle of the best weights; its metadata says what the run did (``summary``: epochs run, chips
    seen, seconds, best epoch, what stopped it) and its validation scores."""
    from geoseg.learn.metrics import markdown_table

    split = data.split_summary()
    meta = {
        "training": {
            "config": cfg.model_dump(mode="json"),
            **summary,
            "stopped_early": summary.get("stopped_by", "epochs") != "epochs",
            "class_counts": data.class_counts.tolist(),
            "split": {"block": split["block"],
                      "scenes": [{"image": s["image"], "pixels": s["pixels"]} for s in split["scenes"]]},
        },
        "validation": best_scores,
    }
    contract = make_contract(cfg, data, meta, getattr(net, "geoseg_unused", None), getattr(net, "geoseg_pretrained", None))
    path = out / "model"
    save_bundle(path, contract, net, overwrite=True)
    write_calibration_chips(cfg, data, path)
    dump_config(cfg, path / "config.yaml")
    (path / "metrics.json").write_text(json.dumps(best_scores, indent=2) + "\n")
    if best_scores.get("classes"):
        (path / "metrics.md").write_text(markdown_table(best_scores))
    log.info("bundle written to %s", path)
    return path


def write_calibration_chips(cfg: TrainConfig, data: PreparedData, folder: Path) -> Path | None:
    """``calibration.npz`` in the bundle: up to :data:`~geoseg.model.quantize.CALIBRATION_CHIPS` training chips,
    evenly spread over the train blocks' chip grid, normalised as the network sees them and cut to at most
    :data:`~geoseg.model.quantize.CALIBRATION_SIZE` px, for int8 quantisation (``geoseg export --int8``,
    ``geoseg predict --precision int8``). ``None`` when no training chip fits."""
    from geoseg.learn.data import ChipRules, GridChipSampler
    from geoseg.model.quantize import CALIBRATION_CHIPS, CALIBRATION_FILE, CALIBRATION_SIZE, write_calibration

    rules = ChipRules(cfg.data.chip_size, cfg.data.min_valid_fraction, cfg.data.min_labelled_fraction)
    locs = GridChipSampler(data.scenes, data.coverages, rules, "train").locations()
    if not locs:
        return None
    picks = np.unique(np.linspace(0, len(locs) - 1, min(CALIBRATION_CHIPS, len(locs))).round().astype(int))
    ds = ChipDataset(data.scenes, [locs[i] for i in picks], data.class_map, data.mean, data.std, cfg.data.chip_size)
    side = min(CALIBRATION_SIZE, cfg.data.chip_size)
    at = (cfg.data.chip_size - side) // 2
    chips = np.stack([ds.read(loc)[0][:, at:at + side, at:at + side] for loc in ds.locations])
    with staged_file(folder / CALIBRATION_FILE) as tmp:
        write_calibration(tmp, chips)
    return folder / CALIBRATION_FILE


def plots(cfg: TrainConfig, data: PreparedData, val_locs: list[ChipLocation], net: nn.Module,
           device: torch.device, history: list[dict[str, Any]], best_scores: dict[str, Any], folder: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; skipping plots (pip install matplotlib)")
        return
    from geoseg.learn.metrics import plot_confusion

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
        pred = predict_indexes(logits, cfg.model.activation)[0].cpu().numpy()
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
