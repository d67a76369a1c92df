"""Helpers shared by the training tests: a tiny labelled scene and a fast config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from rasterio.transform import from_origin

from tests.conftest import write_raster

CLASSES = [
    {"id": 1, "name": "water", "color": [0, 0, 255]},
    {"id": 2, "name": "vegetation", "color": [0, 160, 0]},
    {"id": 3, "name": "buildings", "color": [220, 0, 0]},
]
TRANSFORM = from_origin(500_000.0, 5_100_000.0, 2.0, 2.0)


def label_array(size: int = 128) -> np.ndarray:
    """Class ids 1..3 in bands of rows and a square, 0 (nodata) in the top-left corner."""
    lab = np.full((size, size), 1, dtype=np.uint8)
    lab[:, size // 2:] = 2
    lab[size // 4: size // 2, size // 4: 3 * size // 4] = 3
    lab[: size // 8, : size // 8] = 0
    return lab


def image_from_labels(lab: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 3-band uint8 image whose colour tells the class (with noise); 0 (nodata) where the label is 0."""
    rng = np.random.default_rng(seed)
    palette = np.array([[0, 0, 0], [40, 60, 200], [60, 180, 50], [200, 60, 50]], dtype=np.int32)
    img = palette[lab].transpose(2, 0, 1) + rng.integers(-20, 20, (3, *lab.shape))
    img = np.clip(img, 1, 255).astype(np.uint8)
    img[:, lab == 0] = 0
    return img


def write_scene(folder: Path, size: int = 128, name: str = "scene", seed: int = 0) -> tuple[Path, Path]:
    lab = label_array(size)
    img = image_from_labels(lab, seed)
    image = write_raster(folder / f"{name}.tif", img, nodata=0, transform=TRANSFORM)
    labels = write_raster(folder / f"{name}_labels.tif", lab, nodata=0, transform=TRANSFORM)
    return image, labels


def tiny_config(image: Path, labels: Path, **overrides: Any) -> dict[str, Any]:
    """A config dict that trains in about a second: a small U-Net (or conv1x1) on 32 px chips."""
    cfg: dict[str, Any] = {
        "name": "tiny",
        "classes": CLASSES,
        "data": {"scenes": [{"image": str(image), "labels": str(labels)}], "chip_size": 32, "split_block": 64,
                 "val_fraction": 0.25},
        "model": {"architecture": "unet", "encoder": "resnet18",
                  "params": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}},
        "epochs": 2, "steps_per_epoch": 2, "batch_size": 4, "plots": False, "tensorboard": False,
        "threads": 1,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg
