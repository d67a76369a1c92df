"""``geoseg demo``: the whole flow offline on the CPU in a few minutes.

1. Make a georeferenced synthetic training scene with exact labels, and a larger scene to map.
2. Train a small U-Net on the first for a fixed number of steps, seeded, so every run gives the same
   model (``geoseg train``'s library call); about a minute on 2 idle cores.
3. Predict the larger scene through the full tiled path (``geoseg predict``'s library call).
4. Score the class map against the truth, per class, and report every path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from geoseg.errors import OutputExistsError
from geoseg.learn.synthetic import CLASSES, make_scene
from geoseg.predict.api import ProgressCallback, predict_scene

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    """Paths the demo wrote, and the per-class IoU of its class map against the truth."""

    train_scene: Path
    train_labels: Path
    scene: Path
    truth: Path
    bundle: Path
    classes: Path
    polygons: Path | None
    scores: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        lines = ["", "per-class IoU of the predicted class map against the truth:"]
        for c in self.scores["classes"]:
            iou = "n/a" if c["iou"] is None else f"{c['iou']:.3f}"
            lines.append(f"  {c['name']:<12} {iou}")
        lines.append(f"  {'mean IoU':<12} {self.scores['miou']:.3f}   overall accuracy {self.scores['accuracy']:.3f}")
        lines.append("")
        for label, p in (("training scene", self.train_scene), ("training labels", self.train_labels),
                         ("scene", self.scene), ("truth", self.truth), ("model bundle", self.bundle),
                         ("class map", self.classes), ("polygons", self.polygons)):
            lines.append(f"  {label:<16} {p}")
        lines.append("  seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in self.seconds.items()))
        lines.append(f"\nnext: geoseg predict {self.scene} --model {self.bundle} --output-dir out/")
        return "\n".join(lines)


def compare_class_maps(pred: Path, truth: Path, class_ids: list[int]) -> dict[str, Any]:
    """Per-class scores of a class map against a truth raster on the same grid (``geoseg evaluate``'s
    windowed comparison); pixels that are nodata in the truth or in the prediction are left out."""
    from geoseg.io.raster import inspect_scene
    from geoseg.learn.evaluate import compare
    from geoseg.learn.labels import ClassMap, open_labels
    from geoseg.learn.metrics import scores

    info = inspect_scene(truth)
    cm = compare(pred, open_labels(str(truth), info), ClassMap(class_ids), info)
    return scores(cm.matrix, [c.name for c in CLASSES if c.id in class_ids])


def run_demo(
    output_dir: str | Path = "demo", *, size: int = 2048, train_size: int = 1024, epochs: int = 12,
    train_seconds: float | None = None,
    device: str = "auto", overwrite: bool = False, progress: ProgressCallback | None = None,
    log: Callable[[str], None] | None = None, train_progress: Callable[[Any], None] | None = None,
) -> DemoResult:
    """Run the demo into ``output_dir`` (see the module docstring).

    ``progress`` follows the prediction (:class:`geoseg.predict.api.ProgressEvent`), ``train_progress`` the
    training (:class:`geoseg.learn.train.TrainProgress`).

    Raises:
        OutputExistsError: ``output_dir`` already holds a demo and ``overwrite`` is false.
    """
    from geoseg.learn.config import TrainConfig
    from geoseg.learn.train import train

    say = log or (lambda _msg: None)
    out = Path(output_dir)
    if (out / "model").exists() and not overwrite:
        raise OutputExistsError(f"{out}: already holds a demo; pass --overwrite or choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    say(f"making synthetic scenes in {out}/ ...")
    tr = make_scene(out / "train_scene.tif", out / "train_labels.tif", train_size, seed=1)
    sc = make_scene(out / "scene.tif", out / "scene_truth.tif", size, seed=2)
    seconds["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"training a small U-Net for {epochs} epochs of 15 batches"
        + (f" (at most {train_seconds:.0f} s)" if train_seconds else "") + " ...")
    cfg = TrainConfig.model_validate(dict(
        name="demo-landcover",
        classes=[{"id": c.id, "name": c.name, "color": c.color} for c in CLASSES],
        data={"scenes": [{"image": str(tr.image), "labels": str(tr.labels)}], "chip_size": 128, "overlap": 32,
              "val_fraction": 0.2, "split_block": 256},
        # a light timm encoder (no download: random init) learns this scene in under a minute on 2 cores
        model={"architecture": "unet", "encoder": "tu-mobilenetv3_small_100",
               "params": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}},
        loss=[{"name": "cross_entropy"}, {"name": "dice", "weight": 0.5}], class_weights="auto",
        optimizer={"lr": 3e-3, "schedule": "none"},
        epochs=epochs, steps_per_epoch=15, batch_size=8, max_seconds=train_seconds, val_batches=3,
        device=device, plots=False, tensorboard=False, preview_chips=0, seed=0,
    ))
    res = train(cfg, out / "training", overwrite=True, progress=train_progress)
    bundle = out / "model"
    _replace_dir(res.bundle_path, bundle)
    seconds["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    say(f"predicting {sc.image} ({size}x{size}) through the tiled path ...")
    r = predict_scene(sc.image, bundle, out / "predictions", overwrite=True, device=device, progress=progress,
                      vector_format="gpkg")
    seconds["predict"] = time.perf_counter() - t0

    classes = Path(str(r.classes_path))  # local outputs are paths
    vector = Path(str(r.vector_path)) if r.vector_path is not None else None
    scores = compare_class_maps(classes, sc.labels, [c.id for c in CLASSES])
    return DemoResult(tr.image, tr.labels, sc.image, sc.labels, bundle, classes, vector, scores, seconds)


def _replace_dir(src: Path, dst: Path) -> None:
    import shutil

    from geoseg.io.store import staged_directory

    if src.resolve() == dst.resolve():
        return
    with staged_directory(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
