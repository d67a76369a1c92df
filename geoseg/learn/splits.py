"""Spatial splits: every square *split block* of every scene goes to train, val or test.

Blocks are pooled over the scenes whose split is ``auto`` and shuffled with the run's seed. When the label
counts per block are known (:func:`block_class_counts`, one streamed pass over the labels), the split is
*stratified*: only labelled blocks are shared out (so ``val_fraction`` is a share of the labelled area, which
matters for sparse polygons), and validation first takes, rarest class first, one block holding each class
that has at least two labelled blocks, so the best checkpoint is chosen on every class rather than on the
classes a random draw happened to keep (a road set whose validation blocks held no road pixel did exactly
that). Test blocks are drawn the same way from what is left. Training always keeps a block of every class.

A ``val_fraction`` left at its default is a share, never more: when the labelled blocks are too few for one
block to be within it (fewer than ``1 / val_fraction``: 4 or fewer at the default 0.2), there is no
validation split and every labelled block trains. On such sets one held-out block was a third or more of
the labels, which cost more held-out IoU than the validation scores were worth (benchmarks/RESULTS.md:
Slovenia land use, mean IoU 0.178 with one validation block of three, 0.244 without).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
from rasterio.windows import Window, subdivide

from geoseg.learn.labels import IGNORE_INDEX, ClassMap, TrainScene

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_SCAN = 1024  # side of the windows read when counting labels (bounded memory)


def split_cell(chip: int, block: int) -> int:
    """Side of the coverage cells: divides both the chip and the split block, and about chip/8."""
    cell = math.gcd(chip, block)
    while cell > max(8, chip // 8) and cell % 2 == 0:
        cell //= 2
    return cell


def block_windows(width: int, height: int, block: int) -> list[Window]:
    """The split blocks of a ``width`` x ``height`` scene, row by row."""
    return subdivide(Window(0, 0, width, height), block, block)


def block_class_counts(scene: TrainScene, class_map: ClassMap, block: int) -> np.ndarray:
    """Labelled pixels of each class in each split block: int64 ``(blocks, classes)``, blocks row by row.

    Labels are read in windows of whole blocks about ``_SCAN`` pixels wide, so memory stays bounded.
    """
    info = scene.info
    rows, cols = math.ceil(info.height / block), math.ceil(info.width / block)
    n = len(class_map)
    counts = np.zeros((rows * cols, n), dtype=np.int64)
    step = max(1, _SCAN // block) * block
    for win in subdivide(Window(0, 0, info.width, info.height), step, step):
        target = class_map.to_index(scene.labels.read(win)).astype(np.int64)
        h, w = target.shape
        br = (int(win.row_off) + np.arange(h)) // block
        bc = (int(win.col_off) + np.arange(w)) // block
        cell = (br[:, None] * cols + bc[None, :])
        keep = target != IGNORE_INDEX
        counts += np.bincount(cell[keep] * n + target[keep], minlength=rows * cols * n).reshape(-1, n)
    return counts


def _quota(fraction: float, n: int, fixed: bool) -> int:
    k = int(round(fraction * n))
    if fraction > 0 and k == 0 and not fixed and n > 1:
        k = 1
    return k


def _stratified(order: list[int], has: np.ndarray, quota: int, taken: np.ndarray) -> list[int]:
    """Choose up to ``quota`` blocks (more only to cover a class) among ``order`` (shuffled pool positions).

    ``has`` is bool ``(pool, classes)``; ``taken`` marks blocks already given to another split. A block is
    chosen only if every class keeps at least one block outside the chosen and taken ones.
    """
    free = ~taken
    chosen: list[int] = []
    left = has[free].sum(axis=0)  # blocks of each class still in train
    covered = np.zeros(has.shape[1], dtype=bool)

    def take(k: int) -> bool:
        nonlocal left
        after = left - has[k]
        if ((after < 1) & (left >= 1)).any():
            return False
        chosen.append(k)
        free[k] = False
        left = after
        covered[:] |= has[k]
        return True

    for c in np.argsort(left, kind="stable"):
        if left[c] < 2 or covered[c]:
            continue
        for k in order:
            if free[k] and has[k, c] and take(k):
                break
    for k in order:
        if len(chosen) >= quota:
            break
        if free[k]:
            take(k)
    return chosen


def assign_splits(scenes: Sequence[TrainScene], block: int, val_fraction: float, test_fraction: float,
                  seed: int, counts: Sequence[np.ndarray] | None = None,
                  chip: int | None = None, val_default: bool = False) -> list[list[tuple[Window, str]]]:
    """Give every split block of every scene a split.

    Scenes with a fixed ``split`` give all their blocks to it; the blocks of ``auto`` scenes are pooled and
    shuffled with ``seed``, then the first ``val_fraction`` go to val, the next ``test_fraction`` to test.
    At least one block goes to val (when ``val_fraction > 0``) and one stays in train.

    Args:
        counts: per scene, :func:`block_class_counts`; given, the split is stratified over the labelled
            blocks (see the module's text) and unlabelled blocks stay in train.
        chip: with ``counts``, blocks narrower or shorter than a chip (at the scene's right and bottom
            edges) stay in train, where chips may span blocks: a val block that can hold no chip is lost.

    Returns:
        Per scene, its blocks (windows) with their split names.
    """
    out: list[list[tuple[Window, str]]] = []
    pool: list[tuple[int, int]] = []
    for s in scenes:
        wins = block_windows(s.info.width, s.info.height, block)
        out.append([(w, s.split if s.split != "auto" else "train") for w in wins])
        if s.split == "auto":
            pool.extend((s.index, i) for i in range(len(wins)))
    fixed = {s.split for s in scenes if s.split != "auto"}
    if not pool:
        return out
    has = np.zeros((len(pool), 0), dtype=bool)
    if counts is not None:
        has = np.stack([counts[si][bi] > 0 for si, bi in pool])
        fits = np.array([chip is None or min(out[si][bi][0].width, out[si][bi][0].height) >= chip
                         for si, bi in pool], dtype=bool)
        labelled = np.flatnonzero(has.any(axis=1) & fits)
        pool, has = [pool[k] for k in labelled], has[labelled]
        if not pool:
            return out
    rng = np.random.default_rng(seed)
    order = [int(k) for k in rng.permutation(len(pool))]
    n = len(pool)
    n_val = min(_quota(val_fraction, n, "val" in fixed), n - 1)
    if val_default and n_val and n * val_fraction < 1:
        log.warning("no validation split: %d labelled block(s) of %d px, too few to hold %.0f%% out (the last "
                    "epoch is kept; set data.val_fraction to hold one out anyway)", n, block, 100 * val_fraction)
        n_val = 0
    n_test = min(_quota(test_fraction, n, True), n - 1 - n_val)
    if counts is None:
        val, test = order[:n_val], order[n_val:n_val + n_test]
    else:
        taken = np.zeros(n, dtype=bool)
        val = _stratified(order, has, n_val, taken) if n_val else []
        taken[val] = True
        test = _stratified(order, has, n_test, taken) if n_test else []
        missing = [c for c in range(has.shape[1]) if has[:, c].any() and not has[val, c].any()]
        if val and missing:
            log.info("validation blocks hold no pixel of class index(es) %s (too few labelled blocks of them)",
                     missing)
    for name, ks in (("val", val), ("test", test)):
        for k in ks:
            si, bi = pool[k]
            out[si][bi] = (out[si][bi][0], name)
    return out


__all__ = ["SPLITS", "split_cell", "block_windows", "block_class_counts", "assign_splits"]
