"""Training data: scenes and their labels, spatial splits, coverage, statistics and chip samplers.

The words follow the glossary: a *scene* is one image file, a *chip* the model-sized window. Labels come
as a raster of class ids or as polygons; either way they are read window by window onto the image's pixel
grid (a raster on another grid is warped with nearest-neighbour resampling, polygons are reprojected and
rasterised), so memory never depends on the scene size.

Each scene is cut into square *split blocks*, and every block belongs to one split (train, val or test);
a chip is used by a split only when all of it lies in that split's blocks, so chips of different splits
never share a pixel. A coarse *coverage* grid (cells of a few pixels) records the valid-image and labelled
fractions; samplers consult it to skip chips that are mostly nodata or unlabelled. Samplers yield
:class:`ChipLocation` values (scene and window), never pixels; :class:`ChipDataset` reads them.

Unlabelled pixels, label nodata, ids that are not a configured class, and pixels without valid imagery all
become :data:`IGNORE_INDEX` in the training targets.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window, subdivide

from geoseg.errors import InputError
from geoseg.io.raster import (
    SceneInfo,
    SceneReader,
    _mask_kind,
    band_validity,
    gdal_env,
    inspect_scene,
    open_scene,
)
from geoseg.learn.labels import IGNORE_INDEX, UNLABELLED, ClassMap, TrainScene, open_labels
from geoseg.learn.splits import SPLITS, assign_splits, block_class_counts, split_cell
from geoseg.predict.tiling import ChipGrid

log = logging.getLogger(__name__)

_SCAN = 1024  # side of the windows read when scanning a scene (bounded memory)


# ---------------------------------------------------------------------------------------------- scenes


@dataclass
class SceneCoverage:
    """Coarse per-cell grids of a scene: split code, valid-image fraction and labelled fraction.

    ``split`` holds the index of the cell's split in :data:`SPLITS`; cells are ``cell`` pixels square.
    """

    cell: int
    split: np.ndarray
    valid: np.ndarray
    labelled: np.ndarray
    blocks: list[tuple[Window, str]] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return self.split.shape  # type: ignore[return-value]


@dataclass
class BandStats:
    """Per-band statistics of the training pixels in raw units, combined window by window (Chan et al.)."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, bands: int) -> BandStats:
        return cls(np.zeros(bands), np.zeros(bands), np.zeros(bands))

    def update(self, data: np.ndarray, valid: np.ndarray) -> None:
        """Add the valid values of ``data`` ``(bands, rows, cols)``."""
        for b in range(data.shape[0]):
            v = data[b][valid[b]].astype(np.float64)
            n = v.size
            if n == 0:
                continue
            mean = float(v.mean())
            m2 = float(((v - mean) ** 2).sum())
            tot = self.count[b] + n
            delta = mean - self.mean[b]
            self.mean[b] += delta * n / tot
            self.m2[b] += m2 + delta**2 * self.count[b] * n / tot
            self.count[b] = tot

    @property
    def std(self) -> np.ndarray:
        var = np.where(self.count > 1, self.m2 / np.maximum(self.count - 1, 1), 1.0)
        return np.sqrt(np.maximum(var, 1e-12))


def scan_scene(scene: TrainScene, class_map: ClassMap, blocks: list[tuple[Window, str]], cell: int,
               stats: BandStats | None, class_counts: np.ndarray | None, stats_step: int = 1,
               progress: Callable[[int, int], None] | None = None) -> SceneCoverage:
    """Stream over a scene once: coverage grids, and (for train blocks) band statistics and class counts.

    Args:
        stats: accumulator of raw-unit band statistics over train pixels (None to skip).
        class_counts: int64 ``(classes,)`` counts of train pixels per class (None to skip).
        stats_step: read every ``stats_step``-th row and column for the statistics (bounded cost).
    """
    info = scene.info
    rows, cols = math.ceil(info.height / cell), math.ceil(info.width / cell)
    split = np.zeros((rows, cols), dtype=np.int8)
    for win, name in blocks:
        r0, c0 = int(win.row_off) // cell, int(win.col_off) // cell
        r1 = math.ceil((win.row_off + win.height) / cell)
        c1 = math.ceil((win.col_off + win.width) / cell)
        split[r0:r1, c0:c1] = SPLITS.index(name)
    valid_frac = np.zeros((rows, cols), dtype=np.float32)
    lab_frac = np.zeros((rows, cols), dtype=np.float32)
    step = (_SCAN // cell) * cell or cell
    wins = subdivide(Window(0, 0, info.width, info.height), step, step)
    uniq = sorted(set(scene.bands))
    pos = [uniq.index(b) for b in scene.bands]
    with gdal_env(), open_scene(info.path) as ds:
        kind = _mask_kind(ds)[0]
        for k, win in enumerate(wins):
            raw = ds.read(uniq, window=win)
            bvalid = band_validity(raw, ds, uniq, win, kind)
            raw, bvalid = raw[pos], bvalid[pos]
            valid = np.asarray(bvalid.any(axis=0), dtype=bool)
            target = class_map.to_index(scene.labels.read(win))
            labelled = (target != IGNORE_INDEX) & valid
            r0, c0 = int(win.row_off) // cell, int(win.col_off) // cell
            vc = _cell_mean(valid, cell)
            lc = _cell_mean(labelled, cell)
            valid_frac[r0:r0 + vc.shape[0], c0:c0 + vc.shape[1]] = vc
            lab_frac[r0:r0 + lc.shape[0], c0:c0 + lc.shape[1]] = lc
            if stats is not None or class_counts is not None:
                in_train = np.repeat(np.repeat(split[r0:r0 + vc.shape[0], c0:c0 + vc.shape[1]] == 0, cell, 0),
                                     cell, 1)[: valid.shape[0], : valid.shape[1]]
                if in_train.any():
                    if stats is not None:
                        s = slice(None, None, stats_step)
                        stats.update(raw[:, s, s], bvalid[:, s, s] & in_train[s, s][None])
                    if class_counts is not None:
                        t = target[labelled & in_train]
                        class_counts += np.bincount(t, minlength=len(class_counts))[: len(class_counts)]
            if progress:
                progress(k + 1, len(wins))
    return SceneCoverage(cell, split, valid_frac, lab_frac, blocks)


def _cell_mean(mask: np.ndarray, cell: int) -> np.ndarray:
    h, w = mask.shape
    rows, cols = math.ceil(h / cell), math.ceil(w / cell)
    pad = np.zeros((rows * cell, cols * cell), dtype=np.float32)
    pad[:h, :w] = mask
    return pad.reshape(rows, cell, cols, cell).mean(axis=(1, 3))


# ---------------------------------------------------------------------------------------------- samplers


@dataclass(frozen=True)
class ChipLocation:
    """Where a chip is: the scene's index in the dataset and the window in that scene."""

    scene: int
    window: Window


@dataclass
class ChipRules:
    """Which chips a split may use: all cells in the split, enough valid imagery and labels."""

    chip: int
    min_valid: float
    min_labelled: float

    @staticmethod
    def cells(cov: SceneCoverage, window: Window) -> tuple[slice, slice]:
        """The coverage cells a window covers (within the scene; empty slices for a window outside it)."""
        c = cov.cell
        rows, cols = cov.shape
        r0, c0 = max(int(window.row_off) // c, 0), max(int(window.col_off) // c, 0)
        r1 = min(math.ceil((window.row_off + window.height) / c), rows)
        c1 = min(math.ceil((window.col_off + window.width) / c), cols)
        return slice(r0, max(r1, r0)), slice(c0, max(c1, c0))

    def window_ok(self, cov: SceneCoverage, window: Window, split: str) -> bool:
        rs, cs = self.cells(cov, window)
        if rs.stop <= rs.start or cs.stop <= cs.start:
            return False
        if not (cov.split[rs, cs] == SPLITS.index(split)).all():
            return False
        # cells past the scene edge (small scenes) count as invalid
        n_cells = math.ceil(window.height / cov.cell) * math.ceil(window.width / cov.cell)
        valid = float(cov.valid[rs, cs].sum()) / n_cells
        labelled = float(cov.labelled[rs, cs].sum()) / n_cells
        return valid >= self.min_valid and labelled >= max(self.min_labelled, 1e-9)

    def _window_sum(self, cov: SceneCoverage, a: np.ndarray) -> np.ndarray:
        """The sum of a per-cell grid over the chip at each cell-aligned origin."""
        rows, cols = cov.shape
        k = self.chip // cov.cell
        kr, kc = min(k, rows), min(k, cols)
        s = np.zeros((rows + 1, cols + 1), dtype=np.float64)
        s[1:, 1:] = a.cumsum(0).cumsum(1)
        return s[kr:, kc:] - s[:-kr, kc:] - s[kr:, :-kc] + s[:-kr, :-kc]

    def candidates(self, cov: SceneCoverage, split: str) -> np.ndarray:
        """Bool ``(rows, cols)``: cell-aligned chip origins (in cells) that the split may use."""
        rows, cols = cov.shape
        k = self.chip // cov.cell
        n_cells = k * k
        in_split = self._window_sum(cov, (cov.split == SPLITS.index(split)).astype(np.float64)) \
            == min(k, rows) * min(k, cols)
        valid = self._window_sum(cov, cov.valid) / n_cells >= self.min_valid
        labelled = self._window_sum(cov, cov.labelled) / n_cells >= max(self.min_labelled, 1e-9)
        return in_split & valid & labelled

    def labelled_pixels(self, cov: SceneCoverage) -> np.ndarray:
        """Float ``(rows, cols)``: labelled pixels (with valid imagery) in the chip at each cell-aligned origin."""
        return self._window_sum(cov, cov.labelled) * cov.cell * cov.cell


class RandomChipSampler:
    """Random chip locations of one split, drawn anew each epoch from ``(seed, epoch)`` (repeatable).

    Origins are drawn among the cell-aligned positions whose chip lies wholly in the split and passes the
    coverage rules; every usable position is equally likely, across all scenes.
    """

    def __init__(self, coverages: Sequence[SceneCoverage], rules: ChipRules, split: str, samples: int, seed: int):
        self.samples = samples
        self.seed = seed
        self._origins: list[np.ndarray] = []
        self._cells: list[int] = []
        labelled = 0.0
        for cov in coverages:
            usable = rules.candidates(cov, split)
            self._origins.append(np.argwhere(usable))
            self._cells.append(cov.cell)
            labelled += float(rules.labelled_pixels(cov)[usable].sum())
        self.chip = rules.chip
        self.total = sum(len(o) for o in self._origins)
        self.labelled_per_chip = labelled / self.total if self.total else 0.0
        """Labelled pixels in a chip, on average over the usable origins (every one is equally likely)."""

    def __len__(self) -> int:
        return self.samples if self.total else 0

    def locations(self, epoch: int) -> list[ChipLocation]:
        if not self.total:
            return []
        rng = np.random.default_rng([self.seed, epoch, 7])
        picks = rng.integers(0, self.total, size=self.samples)
        offsets = np.cumsum([0] + [len(o) for o in self._origins])
        out = []
        for p in picks.tolist():
            si = int(np.searchsorted(offsets, p, side="right") - 1)
            r, c = self._origins[si][p - offsets[si]]
            cell = self._cells[si]
            out.append(ChipLocation(si, Window(int(c) * cell, int(r) * cell, self.chip, self.chip)))
        return out


class GridChipSampler:
    """The chips of each scene's global chip grid (:class:`geoseg.predict.tiling.ChipGrid`) that the split may use."""

    def __init__(self, scenes: Sequence[TrainScene], coverages: Sequence[SceneCoverage], rules: ChipRules,
                 split: str, overlap: int = 0):
        self._locations: list[ChipLocation] = []
        labelled = 0.0
        for s, cov in zip(scenes, coverages, strict=True):
            grid = ChipGrid(s.info.width, s.info.height, rules.chip, overlap)
            chips = [ch.window for ch in grid if rules.window_ok(cov, ch.window, split)]
            self._locations.extend(ChipLocation(s.index, w) for w in chips)
            labelled += sum(float(cov.labelled[rules.cells(cov, w)].sum()) for w in chips) * cov.cell * cov.cell
        self.labelled_per_chip = labelled / len(self._locations) if self._locations else 0.0
        """Labelled pixels in a chip, on average over the grid's chips."""

    def locations(self, epoch: int = 0) -> list[ChipLocation]:
        return list(self._locations)

    def __len__(self) -> int:
        return len(self._locations)

    def __iter__(self) -> Iterator[ChipLocation]:
        return iter(self._locations)


# ---------------------------------------------------------------------------------------------- dataset


class ChipDataset:
    """Reads chip locations into ``(image, target)`` tensors; a map-style dataset for DataLoader.

    ``image`` is float32 ``(C, chip, chip)`` normalised with the training statistics, ``target`` int64
    ``(chip, chip)`` training indexes with :data:`IGNORE_INDEX` where unlabelled or without imagery.
    ``augment(image, target, generator)`` is applied with a generator seeded from ``(seed, epoch, i)``,
    so a run is repeatable whatever the number of workers.
    """

    def __init__(self, scenes: Sequence[TrainScene], locations: Sequence[ChipLocation], class_map: ClassMap,
                 mean: Sequence[float], std: Sequence[float], chip: int,
                 augment: Callable[..., tuple[Any, Any]] | None = None, seed: int = 0, epoch: int = 0):
        self.scenes = list(scenes)
        self.locations = list(locations)
        self.class_map = class_map
        self.mean, self.std = list(mean), list(std)
        self.chip = chip
        self.augment = augment
        self.seed, self.epoch = seed, epoch
        self._readers: dict[int, SceneReader] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.locations)

    def _reader(self, i: int) -> SceneReader:
        if self._pid != os.getpid():
            self._readers, self._pid = {}, os.getpid()
        if i not in self._readers:
            s = self.scenes[i]
            self._readers[i] = SceneReader(s.path, s.bands, self.mean, self.std)
        return self._readers[i]

    def read(self, loc: ChipLocation) -> tuple[np.ndarray, np.ndarray]:
        """``(image float32 (C, chip, chip), target int64 (chip, chip))`` at ``loc``, without augmentation."""
        data, valid = self._reader(loc.scene).read(loc.window, size=(self.chip, self.chip))
        labels = self.scenes[loc.scene].labels.read(loc.window)
        target = self.class_map.to_index(labels)
        target[~valid] = IGNORE_INDEX
        return data, target

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        import torch

        data, target = self.read(self.locations[i])
        image = torch.from_numpy(data)
        mask = torch.from_numpy(target)
        if self.augment is not None:
            g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0]))
            image, mask = self.augment(image, mask, g)
        return image, mask


# ---------------------------------------------------------------------------------------------- the whole dataset


@dataclass
class PreparedData:
    """Everything training needs from the data, computed once per run."""

    scenes: list[TrainScene]
    coverages: list[SceneCoverage]
    class_map: ClassMap
    mean: list[float]
    std: list[float]
    class_counts: np.ndarray
    cell: int
    block: int
    band_names: list[str]
    dtype: str
    pixel_size: float | None

    @property
    def has_val_blocks(self) -> bool:
        """Whether the split holds validation blocks (whether or not a chip fits in them)."""
        return any(name == "val" for cov in self.coverages for _, name in cov.blocks)

    def split_summary(self) -> dict[str, Any]:
        """A JSON-able record of the split: blocks per scene with their split names."""
        return {
            "cell": self.cell,
            "block": self.block,
            "scenes": [
                {
                    "image": s.path, "labels": s.labels.path, "split": s.split,
                    "blocks": [{"col_off": int(w.col_off), "row_off": int(w.row_off), "width": int(w.width),
                                "height": int(w.height), "split": name} for w, name in cov.blocks],
                    "pixels": {sp: int(sum(w.width * w.height for w, n in cov.blocks if n == sp)) for sp in SPLITS},
                }
                for s, cov in zip(self.scenes, self.coverages, strict=True)
            ],
        }

    def write_split(self, folder: Path) -> list[Path]:
        """Write ``split.json`` and, per scene and split, the union of its blocks as GeoJSON in the scene CRS."""
        import geopandas as gpd
        from shapely.geometry import box
        from shapely.ops import unary_union

        folder.mkdir(parents=True, exist_ok=True)
        written = [folder / "split.json"]
        (folder / "split.json").write_text(json.dumps(self.split_summary(), indent=2) + "\n")
        for s, cov in zip(self.scenes, self.coverages, strict=True):
            tf = s.info.transform
            for sp in SPLITS:
                geoms = []
                for w, name in cov.blocks:
                    if name != sp:
                        continue
                    x0, y0 = tf * (w.col_off, w.row_off)
                    x1, y1 = tf * (w.col_off + w.width, w.row_off + w.height)
                    geoms.append(box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
                if not geoms:
                    continue
                gdf = gpd.GeoDataFrame({"split": [sp], "image": [s.path]}, geometry=[unary_union(geoms)],
                                       crs=s.info.crs)
                path = folder / f"{s.index}_{Path(s.path).stem}_{sp}.geojson"
                if path.exists():
                    path.unlink()
                gdf.to_file(path, driver="GeoJSON")
                written.append(path)
        return written


def input_band_names(data: Any, first: SceneInfo | None = None) -> list[str]:
    """The names of a config's input bands (a :class:`geoseg.learn.config.DataConfig`): ``band_names``, else
    the first scene's band descriptions, else ``band<N>``. ``first``: that scene's header, if already read."""
    if data.band_names:
        return list(data.band_names)
    info = first or inspect_scene(data.scenes[0].image)
    bands = list(data.bands) if data.bands else list(range(1, info.count + 1))
    names = [info.descriptions[b - 1] if b - 1 < len(info.descriptions) else None for b in bands]
    return [name or f"band{b}" for name, b in zip(names, bands, strict=True)]


def prepare_data(cfg: Any, progress: Callable[[str, int, int], None] | None = None) -> PreparedData:
    """Open the scenes of a :class:`geoseg.learn.config.TrainConfig`, split them and compute statistics.

    One streamed pass per scene computes the coverage grids, the per-band mean and std of the training
    pixels (raw units) and the class counts of the training labels.

    Raises:
        InputError: scenes that cannot be read, band numbers the scenes do not have, labels that do not fit.
    """
    d = cfg.data
    class_ids = [c.id for c in cfg.classes]
    class_map = ClassMap(class_ids)
    names = {c.name: c.id for c in cfg.classes}
    block = d.split_block or d.chip_size
    cell = split_cell(d.chip_size, block)
    scenes: list[TrainScene] = []
    first: SceneInfo | None = None
    for i, sc in enumerate(d.scenes):
        info = inspect_scene(sc.image)
        bands = list(d.bands) if d.bands else list(range(1, info.count + 1))
        bad = [b for b in bands if not 1 <= b <= info.count]
        if bad:
            raise InputError(f"{sc.image}: has {info.count} band(s); data.bands asks for {bad}")
        if first is None:
            first = info
        elif len(bands) != len(scenes[0].bands):
            raise InputError(f"{sc.image}: feeds {len(bands)} band(s) but {first.path} feeds "
                             f"{len(scenes[0].bands)}; set data.bands")
        if first is not info and info.dtype != first.dtype:
            log.warning("%s: dtype %s differs from %s (%s); normalisation is shared", sc.image, info.dtype,
                        first.path, first.dtype)
        labels = open_labels(sc.labels, info, column=sc.label_column, value=sc.label_value,
                             background=cfg.background_class, names=names, nodata=d.label_nodata)
        scenes.append(TrainScene(i, info, labels, bands, sc.split))
    assert first is not None  # DataConfig requires at least one scene
    counts_per_block = [block_class_counts(s, class_map, block) if s.split == "auto" else np.zeros((0, 0))
                        for s in scenes]
    blocks = assign_splits(scenes, block, d.val_fraction, d.test_fraction, cfg.seed, counts_per_block,
                           d.chip_size, val_default="val_fraction" not in d.model_fields_set)
    n_bands = len(scenes[0].bands)
    stats = BandStats.empty(n_bands) if d.mean is None else None
    counts = np.zeros(len(class_ids), dtype=np.int64)
    train_pixels = sum(w.width * w.height for bl in blocks for w, n in bl if n == "train")
    step = max(1, math.ceil(math.sqrt(train_pixels / d.stats_max_pixels)))
    coverages = []
    for s, bl in zip(scenes, blocks, strict=True):
        cb = None if progress is None else (lambda k, n, s=s: progress(f"scan {Path(s.path).name}", k, n))
        coverages.append(scan_scene(s, class_map, bl, cell, stats, counts, step, cb))
    if stats is not None:
        if (stats.count == 0).any():
            raise InputError(f"{first.path}: no valid training pixels in some band(s); check nodata and the split")
        mean, std = stats.mean.tolist(), stats.std.tolist()
    else:
        mean, std = list(d.mean), list(d.std or [])
        if len(mean) != n_bands:
            raise InputError(f"data.mean has {len(mean)} values for {n_bands} band(s)")
    if counts.sum() == 0:
        raise InputError(f"{first.path}: no labelled training pixels; check the labels, label_column and the classes")
    band_names = input_band_names(d, first)
    log.info("training statistics: mean %s std %s; class counts %s", mean, std, counts.tolist())
    return PreparedData(scenes, coverages, class_map, mean, std, counts, cell, block, band_names, first.dtype,
                        first.pixel_size_m)


__all__ = [
    "IGNORE_INDEX", "UNLABELLED", "ClassMap", "open_labels", "TrainScene",
    "SceneCoverage", "BandStats", "assign_splits", "scan_scene", "ChipLocation", "ChipRules",
    "RandomChipSampler", "GridChipSampler", "ChipDataset", "PreparedData", "input_band_names", "prepare_data",
]
