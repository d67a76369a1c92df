"""Segmentation metrics from a confusion matrix accumulated window by window (bounded memory).

The confusion matrix ``cm[true, pred]`` (int64 ``(K, K)``) is the only state; per-class true/false
positives and negatives are read from it and handed to ``segmentation_models_pytorch.metrics`` (the same
``get_stats`` -> ``iou_score`` functions smp uses), so the numbers match smp's definitions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


class ConfusionMatrix:
    """Accumulates ``cm[true, pred]`` over ``K`` classes; values outside ``0..K-1`` are left out."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, true: Any, pred: Any) -> None:
        """Add pixels: ``true`` and ``pred`` are integer arrays (numpy or torch) of the same shape."""
        t = _np(true).reshape(-1).astype(np.int64, copy=False)
        p = _np(pred).reshape(-1).astype(np.int64, copy=False)
        k = self.num_classes
        keep = (t >= 0) & (t < k) & (p >= 0) & (p < k)
        self.matrix += np.bincount(t[keep] * k + p[keep], minlength=k * k).reshape(k, k)

    def merge(self, other: ConfusionMatrix) -> None:
        self.matrix += other.matrix

    @property
    def total(self) -> int:
        return int(self.matrix.sum())


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().to("cpu").numpy()  # type: ignore[no-any-return]
    return np.asarray(x)


def stats_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class ``(tp, fp, fn, tn)`` int64 ``(K,)`` from ``cm[true, pred]`` (smp's ``get_stats`` layout)."""
    tp = np.diag(cm).astype(np.int64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = cm.sum() - tp - fp - fn
    return tp, fp, fn, tn


def scores(cm: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-class IoU, F1, precision, recall and support; overall accuracy, mean IoU and mean F1.

    Classes that never occur in the labels nor the predictions have undefined scores (``None``). The means
    (``miou``, ``mf1``) are over the classes with reference pixels only: a class the labels never show
    (building polygons scored by a land-cover model) has IoU 0 wherever it is predicted, which says nothing
    of the model's skill on it; such classes are listed in ``left_out`` and still shown per class.
    """
    import torch
    from segmentation_models_pytorch import metrics as smpm

    cm = np.asarray(cm, dtype=np.int64)
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    tp, fp, fn, tn = (torch.from_numpy(a)[None] for a in stats_from_confusion(cm))
    per = {
        "iou": smpm.iou_score(tp, fp, fn, tn, reduction="none", zero_division=math.nan)[0],
        "f1": smpm.f1_score(tp, fp, fn, tn, reduction="none", zero_division=math.nan)[0],
        "precision": smpm.precision(tp, fp, fn, tn, reduction="none", zero_division=math.nan)[0],
        "recall": smpm.recall(tp, fp, fn, tn, reduction="none", zero_division=math.nan)[0],
    }
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    classes = []
    for i in range(k):
        row: dict[str, Any] = {"index": i, "name": names[i], "support": int(cm[i].sum())}
        for key, vals in per.items():
            v = float(vals[i])
            row[key] = None if (not present[i] or math.isnan(v)) else v
        classes.append(row)

    def mean_of(key: str) -> float | None:
        vals = [c[key] for c in classes if c[key] is not None and c["support"] > 0]
        return float(np.mean(vals)) if vals else None

    total = int(cm.sum())
    return {
        "pixels": total,
        "accuracy": float(np.trace(cm) / total) if total else None,
        "miou": mean_of("iou"),
        "mf1": mean_of("f1"),
        "classes": classes,
        "left_out": [c["name"] for c in classes if c["support"] == 0],
        "confusion_matrix": cm.tolist(),
    }


def markdown_table(result: dict[str, Any]) -> str:
    """The scores of :func:`scores` as a Markdown table, with the overall numbers below."""

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = ["| class | IoU | F1 | precision | recall | pixels |", "|---|---:|---:|---:|---:|---:|"]
    for c in result["classes"]:
        lines.append(f"| {c['name']} | {f(c['iou'])} | {f(c['f1'])} | {f(c['precision'])} | "
                     f"{f(c['recall'])} | {c['support']} |")
    lines.append("")
    lines.append(f"mean IoU {f(result['miou'])}, mean F1 {f(result['mf1'])}, overall accuracy "
                 f"{f(result['accuracy'])}, {result['pixels']} labelled pixels")
    if result.get("left_out"):
        lines.append("")
        lines.append(f"Left out of the means (no reference pixels): {', '.join(result['left_out'])}.")
    return "\n".join(lines) + "\n"


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: Any, title: str = "") -> bool:
    """Write the row-normalised confusion matrix (with counts) as a PNG; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cm = np.asarray(cm, dtype=np.int64)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(2.5 + 0.7 * k, 2 + 0.6 * k))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{norm[i, j]:.2f}\n{cm[i, j]}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set(xlabel="predicted", ylabel="label", title=title or "confusion matrix (rows sum to 1)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


__all__ = ["ConfusionMatrix", "stats_from_confusion", "scores", "markdown_table", "plot_confusion"]
