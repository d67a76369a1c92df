"""Stratified spatial splits: validation sees every class that can spare a block; training keeps them all."""

from types import SimpleNamespace

import numpy as np
import pytest

from geoseg.learn.labels import ClassMap
from geoseg.learn.splits import assign_splits, block_class_counts, block_windows


def _scene(width=256, height=256, split="auto", index=0):
    return SimpleNamespace(info=SimpleNamespace(width=width, height=height), split=split, index=index)


def _counts(blocks: int, classes: int, where: dict[int, list[int]], background=True):
    c = np.zeros((blocks, classes), dtype=np.int64)
    if background:
        c[:, 0] = 100
    for cls, ks in where.items():
        c[ks, cls] = 5
    return c


@pytest.mark.parametrize("seed", range(25))
def test_validation_holds_every_class_that_has_two_blocks(seed):
    counts = _counts(16, 4, {1: [3, 12], 2: [7], 3: [0, 5, 9]})  # class 2 has a single block
    out = assign_splits([_scene()], 64, 0.2, 0.0, seed, [counts])[0]
    names = [n for _, n in out]
    val = [k for k, n in enumerate(names) if n == "val"]
    train = [k for k, n in enumerate(names) if n == "train"]
    assert any(k in val for k in (3, 12)) and any(k in val for k in (0, 5, 9))
    assert 7 in train  # the only block of class 2 stays in training
    assert any(k in train for k in (3, 12)) and any(k in train for k in (0, 5, 9))
    assert len(val) == 3  # round(0.2 * 16)


def test_sparse_labels_share_out_only_labelled_blocks():
    counts = np.zeros((64, 3), dtype=np.int64)
    counts[[2, 10, 20, 33, 41, 50, 60], 1] = 7
    counts[[5, 17, 44], 2] = 3
    out = assign_splits([_scene(512, 512)], 64, 0.3, 0.0, 1, [counts])[0]
    val = [k for k, (_, n) in enumerate(out) if n == "val"]
    assert set(val) <= {2, 10, 20, 33, 41, 50, 60, 5, 17, 44}
    assert len(val) == 3  # 30 % of the 10 labelled blocks, not of all 64
    assert counts[val, 1].any() and counts[val, 2].any()


def test_no_labelled_block_leaves_everything_in_training():
    out = assign_splits([_scene()], 64, 0.2, 0.1, 0, [np.zeros((16, 2), dtype=np.int64)])[0]
    assert {n for _, n in out} == {"train"}


def test_test_split_is_drawn_from_what_validation_left():
    counts = _counts(25, 3, {1: [1, 6, 11, 16, 21], 2: [2, 8, 14, 20]})
    out = assign_splits([_scene(320, 320)], 64, 0.2, 0.2, 4, [counts])[0]
    names = np.array([n for _, n in out])
    for split in ("val", "test", "train"):
        assert counts[names == split, 1].any() and counts[names == split, 2].any(), split
    assert (names == "val").sum() == 5 and (names == "test").sum() == 5


def test_block_class_counts_match_a_direct_count():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(300, 200)).astype(np.int32)  # id 3 is no class: ignored
    labels[:5] = 255

    class Labels:
        def read(self, window):
            r, c = int(window.row_off), int(window.col_off)
            return labels[r:r + int(window.height), c:c + int(window.width)]

    scene = SimpleNamespace(info=SimpleNamespace(width=200, height=300), labels=Labels())
    got = block_class_counts(scene, ClassMap([0, 1, 2]), 64)
    wins = block_windows(200, 300, 64)
    assert got.shape == (len(wins), 3)
    for k, w in enumerate(wins):
        part = labels[w.row_off:w.row_off + w.height, w.col_off:w.col_off + w.width]
        assert got[k].tolist() == [(part == i).sum() for i in range(3)]


def test_edge_blocks_too_small_for_a_chip_stay_in_training():
    # 160 px wide: blocks of 64 leave a 32 px column at the right edge, which holds no 64 px chip
    counts = np.zeros((9, 2), dtype=np.int64)
    counts[:, 0] = 10
    counts[[2, 5, 8], 1] = 4  # class 1 only in the edge column... and once inside
    counts[4, 1] = 4
    out = assign_splits([_scene(160, 160)], 64, 0.34, 0.0, 0, [counts], chip=64)[0]
    names = [n for _, n in out]
    assert all(names[k] == "train" for k in (2, 5, 6, 7, 8))  # the right column and the bottom row
    assert "val" in names


@pytest.mark.parametrize("blocks,val", [(2, 0), (3, 0), (4, 0), (5, 1), (10, 2)])
def test_a_default_val_fraction_holds_out_no_more_than_its_share(blocks, val):
    counts = _counts(blocks, 2, {1: list(range(blocks))})
    out = assign_splits([_scene(64 * blocks, 64)], 64, 0.2, 0.0, 0, [counts], chip=64, val_default=True)[0]
    assert sum(n == "val" for _, n in out) == val
    # a val_fraction the user gave is honoured as before: at least one block
    out = assign_splits([_scene(64 * blocks, 64)], 64, 0.2, 0.0, 0, [counts], chip=64)[0]
    assert sum(n == "val" for _, n in out) == max(1, val)
