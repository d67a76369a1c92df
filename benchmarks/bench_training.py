"""Training with little data: `geoseg train` at its defaults against a per-pixel random forest, same split.

Every labelled set of ``$GEOSEG_REAL_DATA`` (default ``../shared/data``) is split spatially; both methods
learn from the same training side and are scored on the same held-out pixels, in one run:

- ``buildings``: SpaceNet Atlanta, 900 x 900 panchromatic uint16, 0/255 footprint mask (classes 0
  background, 1 building, as ``configs/buildings-unet.yaml``). Trains on the left half, scores the right.
- ``roads``: SpaceNet Las Vegas, 1300 x 1300 uint16, EPSG:4326, 0/255 road mask (0 background, 1 road).
  Left half / right half.
- ``slovenia``: eo-learn land use, 100 x 101 MAX_NDVI float32, classes 1 cultivated, 2 forest,
  3 grassland, 4 shrubland, 8 artificial (0 = nodata). Left half / right half.
- ``slovenia-sparse``: the same scene, trained from a few polygons of ``LULC.gpkg`` per class (``--sparse-
  polygons``, chosen with ``--seed`` among those with 4+ pixels in the left half, clipped to it, each cut to
  a ``--sparse-size`` px square around its inner point, as a user digitises a few small patches; all else
  unlabelled, ``background_class: null``), scored on every other labelled pixel of the whole scene.

- ``amazon``: Bragagnolo et al.'s Amazon forest tiles (``amazon_forest``: 30 RGB uint8 tiles of 512 x 512 px,
  classes 1 forest, 2 non-forest). A split of tiles, fixed by id: the tiles sorted by their id's two numbers,
  every third one (positions 2, 5, 8...) held out, so 20 train and 10 are scored. geoseg trains on the 20 tiles
  (one scene each, its defaults split them into train and validation blocks) and ``geoseg predict`` maps the
  10 held-out tiles; the score is the paper's (John & Zhang 2022): accuracy per held-out tile, then their mean,
  beside IoU per class over all held-out pixels. The published table (their 15 validation tiles, which we do
  not have): U-Net 0.947, Attention U-Net 0.953, ResNet50-SegNet 0.947, FCN32-VGG16 0.898.

Pretrained encoders: ``--weights FILE...`` runs every case from scratch and once with each file named as
``model.encoder_weights`` (the encoder comes from the file's metadata); a file that shares no band with a case
(an RGB encoder on Slovenia's NDVI) is reported as such. The single-band SpaceNet scenes are named ``pan``
(``data.band_names``), so an RGB encoder serves them with smp's one-band rule. ``--seeds 0 1 2`` repeats each
run per seed (the config seed, the forest's and the sparse polygon choice) and reports the median and the
spread (min-max) over seeds.

The halves are written as GeoTIFFs (each window's own transform; label masks get the image's CRS) into
``--work``, so geoseg sees ordinary files. geoseg runs as a user runs it, in subprocesses:
``geoseg train CONFIG -o RUN`` with a config that names only the classes, the scene, the seed and
``max_seconds`` (everything else is the config defaults a user gets; ``--set KEY=VALUE`` overrides any
key, dotted paths, YAML values, after those), then ``geoseg evaluate`` of ``RUN/model`` on
the held-out image, whose ``*.evaluation.json`` gives the per-class IoU.

The baseline is scikit-learn's ``RandomForestClassifier`` (100 trees, ``n_jobs=-1``, ``random_state
--seed``) on per-pixel features from scipy.ndimage: each band normalised (mean/std of the training side),
and at sigma 1, 2, 4, 8 its Gaussian smoothing, gradient magnitude (Sobel of the Gaussian) and local
standard deviation (Gaussian window). It fits on at most ``--rf-samples`` labelled training pixels
(stratified: each class keeps its share, and at least 1000 pixels or all it has), predicts the held-out
side, and is scored with geoseg's own ``ConfusionMatrix`` and ``scores`` (geoseg.learn.metrics): the same IoU
definition; nodata and unlabelled pixels are left out on both sides (the "pixels" column shows the two
agree). Its seconds are fit + predict (features excluded).

The table: per case and class, geoseg IoU, RF IoU and the margin (geoseg - RF); per case the mean IoU
over classes with reference pixels, geoseg's train seconds (the epochs' own, from RUN/metrics.csv, and the
whole command's) and epochs run. The issue's aim is 20 CPU-minutes for SpaceNet buildings
(``--max-seconds 1200``).

    python benchmarks/bench_training.py                                  # ~15 min on 2 cores (300 s a case)
    python benchmarks/bench_training.py --cases slovenia --max-seconds 20   # a quick look (~1 min)
    python benchmarks/bench_training.py --cases buildings --max-seconds 1200 --json /tmp/b.json
    python benchmarks/bench_training.py --set loss=dice --set epochs=50 --work /tmp/gs-train
    python benchmarks/bench_training.py --cases amazon --max-seconds 1200 --seeds 0 1 2 \
        --weights /path/mobilenet_v2-imagenet.safetensors /path/csmask-4b-l2a.safetensors
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from pixel_features import features, stratified_sample  # noqa: E402  (the forest's features, beside this file)

REAL = Path(os.environ.get("GEOSEG_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
UNLABELLED = -1


@dataclass(frozen=True)
class Case:
    name: str
    folder: str
    image: str
    labels: str
    classes: tuple[tuple[int, str], ...]  # (class id, name), the model's class order
    label_values: dict[int, int] | None = None  # raw label value -> class id (None: the values are the ids)
    label_nodata: int | None = None  # raw label value meaning unlabelled
    background_class: int | None = None
    sparse: bool = False
    needs: tuple[tuple[str, Any], ...] = ()  # config keys the defaults cannot do without here (before --set)
    tiles: bool = False  # a folder of tiles <stem>.tif + <stem>.labels.tif, split by tile (AMAZON_HELD_OUT)


SPACENET = dict(label_values={0: 0, 255: 1}, background_class=0, needs=(("data.band_names", ["pan"]),))
PAPER_AMAZON = {"U-Net": 0.947, "Attention U-Net": 0.953, "ResNet50-SegNet": 0.947, "FCN32-VGG16": 0.898}
SLOVENIA_CLASSES = ((1, "cultivated"), (2, "forest"), (3, "grassland"), (4, "shrubland"), (8, "artificial"))
# the default 256 px chip cannot fit a 50 x 101 half ("no training chip of 256 px passes the rules"); 32 is the
# smallest chip the default encoder depth (5: a multiple of 32) allows
CASES = {c.name: c for c in [
    Case("buildings", "spacenet_buildings", "sample_geotiff.tif", "sample_fp_mask_from_geojson.tif",
         ((0, "background"), (1, "building")), **SPACENET),  # type: ignore[arg-type]
    Case("roads", "spacenet_roads", "road_mask_input.tif", "sample_road_raster_mask.tif",
         ((0, "background"), (1, "road")), **SPACENET),  # type: ignore[arg-type]
    Case("slovenia", "slovenia_lulc", "MAX_NDVI_from_npy.tif", "LULC_from_npy.tif", SLOVENIA_CLASSES, label_nodata=0),
    Case("slovenia-sparse", "slovenia_lulc", "MAX_NDVI_from_npy.tif", "LULC_from_npy.tif", SLOVENIA_CLASSES,
         label_nodata=0, sparse=True),
    Case("amazon", "amazon_forest", "Amazon_*.tif", "*.labels.tif", ((1, "forest"), (2, "non-forest")),
         label_nodata=0, tiles=True),
]}


# ----------------------------------------------------------------------------------- data


@dataclass
class Split:
    """The files geoseg sees and the arrays the baseline sees (class indices, -1 = left out)."""

    train_image: Path
    train_labels: Path
    label_column: str | None
    test_image: Path
    test_labels: Path
    train_x: np.ndarray  # (bands, rows, cols) float32
    train_y: np.ndarray  # (rows, cols) int64 class index
    test_x: np.ndarray
    test_y: np.ndarray
    train_valid: np.ndarray  # valid imagery
    test_valid: np.ndarray
    note: str


def _write(path: Path, data: np.ndarray, crs: Any, transform: Any, nodata: float | None) -> Path:
    import rasterio

    if data.ndim == 2:
        data = data[None]
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype.name, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(data)
    return path


def _class_index(ids: np.ndarray, case: Case) -> np.ndarray:
    """Class ids -> index in the model's class order; anything else -1."""
    out = np.full(ids.shape, UNLABELLED, dtype=np.int64)
    for i, (cid, _) in enumerate(case.classes):
        out[ids == cid] = i
    return out


def _valid(img: np.ndarray, nodata: float | None) -> np.ndarray:
    ok = np.ones(img.shape[1:], dtype=bool)
    for b in img:
        if b.dtype.kind == "f":
            ok &= np.isfinite(b)
        if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
            ok &= b != np.asarray(nodata).astype(b.dtype)
    return ok


def make_split(case: Case, folder: Path, sparse_polygons: int, sparse_size: int, seed: int) -> Split:
    """Write the train and held-out GeoTIFFs of ``case`` into ``folder``; return them and their arrays."""
    import rasterio
    import rasterio.errors
    from rasterio.windows import Window
    from rasterio.windows import transform as window_transform

    folder.mkdir(parents=True, exist_ok=True)
    src = REAL / case.folder
    with rasterio.open(src / case.image) as ds:
        image, crs, tf, nodata = ds.read(), ds.crs, ds.transform, ds.nodata
    with warnings.catch_warnings():  # the SpaceNet building mask has no CRS nor transform: the image's grid
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(src / case.labels) as ds:
            raw = ds.read(1)
    if raw.shape != image.shape[1:]:
        raise SystemExit(f"{case.labels}: {raw.shape} is not the image's grid {image.shape[1:]}")
    ids = raw.astype(np.int64)
    if case.label_values is not None:
        ids = np.full(raw.shape, -1, dtype=np.int64)
        for v, cid in case.label_values.items():
            ids[raw == v] = cid
    if case.label_nodata is not None:
        ids[raw == case.label_nodata] = -1
    lab_dtype = np.uint8 if max(c for c, _ in case.classes) < 255 else np.uint16
    lab_nodata = case.label_nodata
    labels = np.where(ids < 0, lab_nodata if lab_nodata is not None else 0, ids).astype(lab_dtype)

    h, w = ids.shape
    half = w // 2
    left, right = Window(0, 0, half, h), Window(half, 0, w - half, h)
    tf_left, tf_right = window_transform(left, tf), window_transform(right, tf)
    train_x, train_lab = image[:, :, :half], labels[:, :half]
    train_image = _write(folder / "train_image.tif", train_x, crs, tf_left, nodata)
    valid_all = _valid(image, nodata)
    idx_all = _class_index(ids, case)
    if not case.sparse:
        test_x = image[:, :, half:]
        train_labels = _write(folder / "train_labels.tif", train_lab, crs, tf_left, lab_nodata)
        test_image = _write(folder / "test_image.tif", test_x, crs, tf_right, nodata)
        test_labels = _write(folder / "test_labels.tif", labels[:, half:], crs, tf_right, lab_nodata)
        return Split(train_image, train_labels, None, test_image, test_labels,
                     train_x.astype(np.float32), idx_all[:, :half], test_x.astype(np.float32), idx_all[:, half:],
                     valid_all[:, :half], valid_all[:, half:], "left half / right half")

    # sparse: a few polygons per class, lying in the left half (clipped to it); scored on every other pixel
    import geopandas as gpd
    from rasterio.features import rasterize
    from shapely.geometry import box

    gdf = gpd.read_file(src / "LULC.gpkg")
    if gdf.crs is not None and crs is not None and gdf.crs != crs:
        gdf = gdf.to_crs(crs)
    x0, y0 = tf_left * (0, 0)
    x1, y1 = tf_left * (half, h)
    left_box = box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    px_area = abs(tf.a * tf.e)
    clipped = gdf.geometry.intersection(left_box)
    rng = np.random.default_rng(seed)
    chosen = []
    for cid, _ in case.classes:  # polygons with at least 4 pixels of area in the left half
        cand = [i for i, (g, v) in enumerate(zip(clipped, gdf["LULC_ID"], strict=True))
                if int(v) == cid and g is not None and g.area >= 4 * px_area]
        pick = sorted(rng.choice(cand, size=min(sparse_polygons, len(cand)), replace=False).tolist()) if cand else []
        chosen.extend(pick)
    chosen.sort()  # file order, as geoseg rasterises them
    sel = gdf.iloc[chosen][["LULC_ID", "geometry"]].copy()
    sel["geometry"] = clipped.iloc[chosen]
    if sparse_size > 0:  # what a user digitises: a small patch inside each polygon, around its inner point
        r = sparse_size / 2 * abs(tf.a)
        sel["geometry"] = [g.intersection(box(p.x - r, p.y - r, p.x + r, p.y + r))
                           for g, p in zip(sel.geometry, sel.geometry.representative_point(), strict=True)]
    sel = sel[~sel.geometry.is_empty]
    sel["LULC_ID"] = sel["LULC_ID"].astype("int32")
    train_labels = folder / "train_polygons.gpkg"
    if train_labels.exists():
        train_labels.unlink()
    sel.to_file(train_labels, driver="GPKG")
    shapes = [(g, int(v)) for g, v in zip(sel.geometry, sel["LULC_ID"], strict=True)]
    sparse_ids = rasterize(shapes, out_shape=(h, half), transform=tf_left, fill=0, dtype="int32") if shapes \
        else np.zeros((h, half), np.int32)
    trained = np.zeros((h, w), dtype=bool)
    trained[:, :half] = sparse_ids > 0
    held = np.where(trained, lab_nodata if lab_nodata is not None else 0, labels).astype(lab_dtype)
    test_labels = _write(folder / "heldout_labels.tif", held, crs, tf, lab_nodata)
    test_y = idx_all.copy()
    test_y[trained] = UNLABELLED
    per_class = {cid: int((sel["LULC_ID"] == cid).sum()) for cid, _ in case.classes}
    note = (f"{len(sel)} polygon patches in the left half ({', '.join(f'{c}: {n}' for c, n in per_class.items())}), "
            f"{int(trained.sum())} labelled pixels; scored on the rest of the scene")
    return Split(train_image, train_labels, "LULC_ID", src / case.image, test_labels, train_x.astype(np.float32),
                 _class_index(sparse_ids.astype(np.int64), case), image.astype(np.float32), test_y,
                 valid_all[:, :half], valid_all, note)


@dataclass
class TileSplit:
    """A case of many tiles: (image, labels) pairs to train on and to score, held out by id."""

    train: list[tuple[Path, Path]]
    test: list[tuple[Path, Path]]
    note: str


def _tile_id(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.name.split(".")[0]))


def make_tile_split(case: Case) -> TileSplit:
    """The tiles sorted by id; every third one (positions 2, 5, 8...) held out."""
    src = REAL / case.folder
    images = sorted((p for p in src.glob(case.image) if not p.name.endswith(".labels.tif")), key=_tile_id)
    if not images:
        raise SystemExit(f"{src}: no tiles {case.image}")
    pairs = [(p, p.with_name(p.name[: -len(".tif")] + ".labels.tif")) for p in images]
    train = [t for i, t in enumerate(pairs) if i % 3 != 2]
    test = [t for i, t in enumerate(pairs) if i % 3 == 2]
    return TileSplit(train, test, f"{len(train)} tiles to train on, {len(test)} held out (every third by id: "
                                  f"{', '.join(p.stem for p, _ in test)})")


def _read_tile(image: Path, labels: Path, case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import rasterio

    with rasterio.open(image) as ds:
        x, nodata = ds.read().astype(np.float32), ds.nodata
    with rasterio.open(labels) as ds:
        raw = ds.read(1).astype(np.int64)
    if case.label_nodata is not None:
        raw[raw == case.label_nodata] = -1
    return x, _class_index(raw, case), _valid(x, nodata)


def _tile_scores(preds: list[np.ndarray], truths: list[np.ndarray], case: Case) -> dict[str, Any]:
    """IoU per class over all held-out pixels (geoseg's scores) and the paper's figure: accuracy per tile,
    then the mean over tiles."""
    from geoseg.learn.metrics import ConfusionMatrix, scores

    cm = ConfusionMatrix(len(case.classes))
    per_tile = []
    for pred, true in zip(preds, truths, strict=True):
        cm.update(true, pred)
        ok = true >= 0
        per_tile.append(float((pred[ok] == true[ok]).mean()) if ok.any() else math.nan)
    res = scores(cm.matrix, [n for _, n in case.classes])
    res["tile_accuracy"] = per_tile
    res["mean_tile_accuracy"] = float(np.nanmean(per_tile))
    return res


def random_forest_tiles(split: TileSplit, case: Case, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The forest on the training tiles (a stratified sample of each), scored per held-out tile."""
    from sklearn.ensemble import RandomForestClassifier

    tiles = [_read_tile(i, lab, case) for i, lab in split.train]
    pooled = np.concatenate([x[:, v] for x, _, v in tiles], axis=1)
    mean, std = pooled.mean(axis=1).astype(np.float64), np.maximum(pooled.std(axis=1), 1e-6).astype(np.float64)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    per_tile = max(1, args.rf_samples // len(tiles))
    for x, y, v in tiles:
        f = features(x, mean, std, v)
        yy = y.reshape(-1)
        keep = np.flatnonzero((yy >= 0) & v.reshape(-1))
        keep = keep[stratified_sample(yy[keep], per_tile, rng, floor=min(1000, per_tile))]
        xs.append(f[keep])
        ys.append(yy[keep])
    rf = RandomForestClassifier(n_estimators=args.rf_trees, n_jobs=-1, random_state=seed)
    t0 = time.perf_counter()
    rf.fit(np.concatenate(xs), np.concatenate(ys))
    preds, truths = [], []
    for image, labels in split.test:
        x, y, v = _read_tile(image, labels, case)
        preds.append(rf.predict(features(x, mean, std, v)).reshape(y.shape).astype(np.int64))
        truths.append(np.where(v, y, UNLABELLED))
    seconds = time.perf_counter() - t0
    n = int(sum(len(y) for y in ys))
    return {"metrics": _tile_scores(preds, truths, case), "seconds": seconds, "train_pixels": n,
            "labelled_train_pixels": int(sum(((y >= 0) & v).sum() for _, y, v in tiles)),
            "features": int(xs[0].shape[1])}


# ----------------------------------------------------------------------------------- baseline


def random_forest(split: Split, case: Case, args: argparse.Namespace, seed: int | None = None) -> dict[str, Any]:
    from sklearn.ensemble import RandomForestClassifier

    from geoseg.learn.metrics import ConfusionMatrix, scores

    v = split.train_valid
    mean = np.array([b[v].mean() for b in split.train_x], dtype=np.float64)
    std = np.array([max(float(b[v].std()), 1e-6) for b in split.train_x], dtype=np.float64)
    xtr = features(split.train_x, mean, std, v)
    ytr = split.train_y.reshape(-1)
    keep = np.flatnonzero((ytr >= 0) & v.reshape(-1))
    seed = args.seed if seed is None else seed
    keep = keep[stratified_sample(ytr[keep], args.rf_samples, np.random.default_rng(seed))]
    xte = features(split.test_x, mean, std, split.test_valid)
    rf = RandomForestClassifier(n_estimators=args.rf_trees, n_jobs=-1, random_state=seed)
    t0 = time.perf_counter()
    rf.fit(xtr[keep], ytr[keep])
    pred = rf.predict(xte).reshape(split.test_y.shape).astype(np.int64)
    seconds = time.perf_counter() - t0
    true = split.test_y.copy()
    true[~split.test_valid] = UNLABELLED
    cm = ConfusionMatrix(len(case.classes))
    cm.update(true, pred)
    res = scores(cm.matrix, [n for _, n in case.classes])
    return {"metrics": res, "seconds": seconds, "train_pixels": int(len(keep)),
            "labelled_train_pixels": int(((ytr >= 0) & v.reshape(-1)).sum()), "features": int(xtr.shape[1])}


# ----------------------------------------------------------------------------------- geoseg


def parse_value(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def set_key(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    """``cfg[a][b][c] = value`` for ``a.b.c`` (integers index lists; missing mappings are created)."""
    parts = dotted.split(".")
    cur: Any = cfg
    for p in parts[:-1]:
        if isinstance(cur, list):
            cur = cur[int(p)]
        else:
            if not isinstance(cur.get(p), (dict, list)):
                cur[p] = {}
            cur = cur[p]
    last = parts[-1]
    if isinstance(cur, list):
        cur[int(last)] = value
    else:
        cur[last] = value


def make_config(case: Case, split: Split | TileSplit, args: argparse.Namespace, seed: int | None = None,
                weights: str | None = None) -> dict[str, Any]:
    if isinstance(split, TileSplit):
        scenes: list[dict[str, Any]] = [{"image": str(i), "labels": str(lab)} for i, lab in split.train]
    else:
        scene: dict[str, Any] = {"image": str(split.train_image), "labels": str(split.train_labels)}
        if split.label_column:
            scene["label_column"] = split.label_column
        scenes = [scene]
    cfg: dict[str, Any] = {
        "name": f"bench-{case.name}",
        "classes": [{"id": cid, "name": n} for cid, n in case.classes],
        "background_class": None if case.sparse else case.background_class,
        "data": {"scenes": scenes},
        "max_seconds": args.max_seconds,
        "seed": args.seed if seed is None else seed,
    }
    if weights:  # the file alone: its metadata names the encoder
        cfg["model"] = {"encoder_weights": weights}
    for key, value in [*case.needs, *args.set]:
        set_key(cfg, key, value)
    return cfg


def _geoseg(cmd: list[str], log: Path) -> tuple[int, float, list[str]]:
    """Run ``geoseg -v CMD``; its output goes to ``log``. Returns the exit code, seconds and notable lines."""
    full = [sys.executable, "-m", "geoseg.cli", "-v", *cmd]
    t0 = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + shlex.join(full) + "\n")
        f.flush()
        rc = subprocess.run(full, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.perf_counter() - t0
    text = log.read_text()
    text = re.sub(r"(?<![A-Za-z])(INFO|WARNING|ERROR|Error):", r"\n\1:", text)  # bars share lines with records
    text = [ln.strip() for ln in text.replace("\r", "\n").splitlines()]
    keep = ("chips per epoch", "trained ", "time budget", "early stopping")
    notable = [ln for ln in text if ln.startswith(("WARNING", "ERROR", "Error", "internal error", "Traceback"))
               or (ln.startswith("INFO") and any(k in ln for k in keep))]
    if rc != 0 and not notable:
        notable = text[-5:]
    return rc, seconds, notable


def run_geoseg(case: Case, split: Split | TileSplit, folder: Path, args: argparse.Namespace, seed: int | None = None,
               weights: str | None = None) -> dict[str, Any]:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    cfg = make_config(case, split, args, seed, weights)
    cfg_path = folder / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run, ev = folder / "run", folder / "evaluation"
    for old in (run, ev):  # a rerun in the same --work never reads an earlier run's files
        shutil.rmtree(old, ignore_errors=True)
    out: dict[str, Any] = {"config": cfg}
    rc, secs, notes = _geoseg(["train", str(cfg_path), "-o", str(run), "--overwrite"], folder / "train.log")
    out.update(train_wall_seconds=secs, train_log=str(folder / "train.log"), train_notes=notes)
    if (run / "metrics.csv").exists():
        with (run / "metrics.csv").open() as f:
            rows = list(csv.DictReader(f))
        out["epochs_run"] = len(rows)
        out["train_seconds"] = sum(float(r["seconds"]) for r in rows if r.get("seconds"))
        out["history"] = rows
    if rc != 0:
        out["error"] = f"geoseg train exited {rc}: " + " | ".join(notes[-3:])
        if any("share none" in n for n in notes):
            out["no_shared_band"] = True
        return out
    if isinstance(split, TileSplit):  # every held-out tile mapped by one command, scored per tile
        cmd = ["predict", *[str(i) for i, _ in split.test], "-m", str(run / "model"), "-o", str(ev), "--no-vector",
               "--no-quicklook", "--overwrite"]
        rc, secs, notes = _geoseg(cmd, folder / "predict.log")
        out.update(evaluate_seconds=secs, evaluate_notes=notes)
        maps = [ev / f"{i.stem}.classes.tif" for i, _ in split.test]
        if rc != 0 or not all(m.exists() for m in maps):
            out["error"] = f"geoseg predict exited {rc}: " + " | ".join(notes[-3:])
            return out
        import rasterio

        preds, truths = [], []
        for m, (image, labels) in zip(maps, split.test, strict=True):
            with rasterio.open(m) as ds:
                ids = ds.read(1).astype(np.int64)
            _, y, v = _read_tile(image, labels, case)
            preds.append(_class_index(ids, case))
            truths.append(np.where(v, y, UNLABELLED))
        out["metrics"] = _tile_scores(preds, truths, case)
        return out
    cmd = ["evaluate", str(split.test_image), "-m", str(run / "model"), "-l", str(split.test_labels),
           "-o", str(ev), "--overwrite"]
    rc, secs, notes = _geoseg(cmd, folder / "evaluate.log")
    out.update(evaluate_seconds=secs, evaluate_notes=notes)
    found = sorted(ev.glob("*.evaluation.json"))
    if rc != 0 or not found:
        out["error"] = f"geoseg evaluate exited {rc}: " + " | ".join(notes[-3:])
        return out
    out["metrics"] = json.loads(found[0].read_text())
    return out


# ----------------------------------------------------------------------------------- report


def _mean_iou(metrics: dict[str, Any] | None) -> float | None:
    """Mean IoU over the classes with reference pixels (support > 0)."""
    if not metrics:
        return None
    vals = [c["iou"] or 0.0 for c in metrics["classes"] if c["support"] > 0]
    return float(np.mean(vals)) if vals else None


def _iou(metrics: dict[str, Any] | None, name: str) -> tuple[float | None, int | None]:
    if not metrics:
        return None, None
    c = next((c for c in metrics["classes"] if c["name"] == name), None)
    return (None, None) if c is None else (c["iou"], c["support"])


def _f(v: float | None, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def patience_replay(history: list[dict[str, str]], patiences: tuple[int, ...] = (5, 10, 20, 40)) -> str:
    """What early stopping at each patience would have done to this run: its stop epoch and best val mIoU.

    Replays the run's metrics.csv (the monitor is val_miou, as in the defaults); "full" is the whole run.
    """
    scores = [(int(r["epoch"]), float(r["val_miou"])) for r in history if r.get("val_miou")]
    if not scores:
        return "no validation scores"
    best_all = max(scores, key=lambda t: t[1])
    parts = [f"full run: best val mIoU {best_all[1]:.3f} at epoch {best_all[0]} of {scores[-1][0]}"]
    for p in patiences:
        best, best_epoch, stop = -1.0, 0, None
        for epoch, v in scores:
            if v > best:
                best, best_epoch = v, epoch
            elif epoch - best_epoch >= p:
                stop = epoch
                break
        parts.append(f"patience {p}: " + ("never stops" if stop is None else f"stops at {stop}, best {best:.3f}"))
    return "; ".join(parts)


def _spread(values: list[float]) -> str:
    """``median [min-max]`` of the seeds' values (the median alone for one seed)."""
    if not values:
        return "-"
    med = float(np.median(values))
    return f"{med:.4f}" if len(values) == 1 else f"{med:.4f} [{min(values):.3f}-{max(values):.3f}]"


def _summary(runs: dict[int, dict[str, Any]], case: Case, rf: bool = False) -> dict[str, Any]:
    """Median and spread over seeds of the mean IoU, each class's IoU and (tiles) the mean per-tile accuracy."""
    ok = {seed: (r if rf else r.get("metrics")) for seed, r in runs.items()}
    ok = {seed: (m["metrics"] if rf else m) for seed, m in ok.items() if m}
    mious = [v for m in ok.values() if (v := _mean_iou(m)) is not None]
    out: dict[str, Any] = {"seeds": sorted(ok), "mean_iou": mious,
                           "mean_iou_median": float(np.median(mious)) if mious else None,
                           "classes": {n: [v for m in ok.values() if (v := _iou(m, n)[0]) is not None]
                                       for _, n in case.classes}}
    if case.tiles:
        acc = [m["mean_tile_accuracy"] for m in ok.values() if "mean_tile_accuracy" in m]
        out.update(mean_tile_accuracy=acc, mean_tile_accuracy_median=float(np.median(acc)) if acc else None)
    return out


def report(results: dict[str, dict[str, Any]], header: dict[str, Any], json_path: Path | None) -> None:
    """Per case, one line per method: from scratch, with each pretrained encoder, and the forest; each figure
    the median over seeds with its spread, the margin the median mean IoU over the forest's."""
    seeds = header["seeds"]
    print(f"\nmedian over seeds {seeds} [min-max]; margin: median mean IoU - the forest's")
    print(f"{'case':<16} {'method':<34} {'mean IoU':>24} {'margin':>8}  per class IoU / mean tile accuracy")
    for name, r in results.items():
        case = CASES[name]
        rf = _summary(r["rf"], case, rf=True)
        r["summary"] = {"rf": rf}
        lines = []
        for variant, runs in r["runs"].items():
            sm = _summary(runs, case)
            r["summary"][variant] = sm
            failed = [f"seed {sd}: {g['error']}" for sd, g in runs.items() if "error" in g]
            if all(g.get("no_shared_band") for g in runs.values()):
                lines.append((variant, "shares no band with this case", "", ""))
                continue
            margin = None if sm["mean_iou_median"] is None or rf["mean_iou_median"] is None \
                else sm["mean_iou_median"] - rf["mean_iou_median"]
            sm["margin"] = margin
            lines.append((variant, _spread(sm["mean_iou"]), _f(margin, "+.4f"), _details(sm, case)
                          + ("; FAILED " + " | ".join(failed) if failed else "")))
        if r["rf"]:
            lines.append(("random forest", _spread(rf["mean_iou"]), "", _details(rf, case)))
        for i, (method, miou, margin, details) in enumerate(lines):
            print(f"{name if i == 0 else '':<16} {method:<34} {miou:>24} {margin:>8}  {details}")
        if case.tiles:
            print(f"{'':<16} the paper (its 15 validation tiles): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in PAPER_AMAZON.items()))
        for variant, runs in r["runs"].items():
            for seed, g in runs.items():
                print(f"{'':<16} {variant} seed {seed}: train {_f(g.get('train_seconds'), '.0f')} s over "
                      f"{g.get('epochs_run', '-')} epoch(s) (command {_f(g.get('train_wall_seconds'), '.0f')} s), "
                      f"evaluate {_f(g.get('evaluate_seconds'), '.0f')} s"
                      + (f"; early stopping replayed: {patience_replay(g['history'])}" if g.get("history") else ""))
        if r["rf"]:
            print(f"{'':<16} RF fit + predict " + ", ".join(f"{v['seconds']:.1f} s" for v in r["rf"].values())
                  + f" on {next(iter(r['rf'].values()))['train_pixels']} pixels")
        print(f"{'':<16} case {r['seconds']:.0f} s")
    if json_path:
        json_path.write_text(json.dumps({**header, "cases": results}, indent=1, default=str) + "\n")
        print(f"\nwrote {json_path}")


def _details(sm: dict[str, Any], case: Case) -> str:
    parts = [f"{n} {_spread(v)}" for n, v in sm["classes"].items()]
    if case.tiles:
        parts.append(f"tile accuracy {_spread(sm.get('mean_tile_accuracy') or [])}")
    return "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="cases to run (default all)")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="geoseg's time budget per case (max_seconds)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (dotted path, YAML value), e.g. --set loss=dice "
                         "--set model.encoder=resnet18 --set data.chip_size=64; repeatable")
    ap.add_argument("--weights", nargs="+", default=[], metavar="FILE",
                    help="pretrained weights files: every case also runs once with each as model.encoder_weights")
    ap.add_argument("--no-scratch", action="store_true", help="with --weights: skip the runs from scratch")
    ap.add_argument("--no-forest", action="store_true",
                    help="skip the random forest (recipe sweeps that compare geoseg runs with each other)")
    ap.add_argument("--work", type=Path, default=None, help="keep the halves, configs, runs and logs here")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--seed", type=int, default=0, help="config seed, RF seed, sparse polygon choice")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="run each case and method at each of these seeds; report the median and spread")
    ap.add_argument("--sparse-polygons", type=int, default=3, help="polygons per class of the sparse case")
    ap.add_argument("--sparse-size", type=int, default=10,
                    help="sparse case: keep a square of this many pixels a side of each polygon (0: whole polygons)")
    ap.add_argument("--rf-samples", type=int, default=200_000, help="at most this many RF training pixels")
    ap.add_argument("--rf-trees", type=int, default=100)
    args = ap.parse_args()
    sets = []
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            ap.error(f"--set {item!r}: give KEY=VALUE")
        sets.append((key.strip(), parse_value(value)))
    args.set = sets
    seeds = args.seeds or [args.seed]
    for w in args.weights:
        if not Path(w).is_file():
            ap.error(f"--weights {w}: no such file")
    variants: list[tuple[str, str | None]] = [] if args.no_scratch and args.weights else [("scratch", None)]
    variants += [(Path(w).stem, str(Path(w).resolve())) for w in args.weights]
    if not REAL.is_dir():
        raise SystemExit(f"real data folder {REAL} is absent; set GEOSEG_REAL_DATA to it")

    import sklearn
    import torch

    from geoseg.predict.hardware import cpu_features

    header = {"machine": cpu_features().describe(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "sklearn": sklearn.__version__, "command": shlex.join([sys.executable, *sys.argv]),
              "max_seconds": args.max_seconds, "set": {k: v for k, v in args.set}, "seeds": seeds,
              "weights": {name: w for name, w in variants if w}}
    print(f"machine: {header['machine']}; os.cpu_count() {header['cpus']}; torch {header['torch']}, "
          f"scikit-learn {header['sklearn']}")
    print(f"command: {header['command']}")
    print(f"data: {REAL}; geoseg max_seconds {args.max_seconds:g} per case; overrides: {header['set'] or 'none'}; "
          f"seeds {seeds}; methods: {', '.join(n for n, _ in variants)}")

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="geoseg-train-bench-") as d:
        work = args.work or Path(d)
        for name in args.cases:
            case = CASES[name]
            t0 = time.perf_counter()
            runs: dict[str, dict[int, dict[str, Any]]] = {v: {} for v, _ in variants}
            forest: dict[int, dict[str, Any]] = {}
            note = ""
            for seed in seeds:
                folder = work / name / f"seed{seed}"
                split: Split | TileSplit
                if case.tiles:
                    split = make_tile_split(case)
                    shape = f"{len(split.train)} tiles, held out {len(split.test)}"
                else:
                    split = make_split(case, folder / "data", args.sparse_polygons, args.sparse_size, seed)
                    shape = (f"train {split.train_image.name} {split.train_x.shape[2]}x{split.train_x.shape[1]}, "
                             f"held out {split.test_image.name} {split.test_x.shape[2]}x{split.test_x.shape[1]}")
                note = split.note
                needs = "".join(f"; needs {k}={v}" for k, v in case.needs)
                print(f"\n[{name} seed {seed}] {split.note}{needs}; {shape}", flush=True)
                for variant, weights in variants:
                    g = run_geoseg(case, split, folder / variant, args, seed, weights)
                    runs[variant][seed] = g
                    for ln in g.get("train_notes", []) + g.get("evaluate_notes", []):
                        print(f"  geoseg {variant}: {ln}")
                    print(f"  geoseg {variant}: {g.get('epochs_run', 0)} epoch(s), train "
                          f"{g.get('train_wall_seconds', 0):.0f} s, evaluate {g.get('evaluate_seconds', 0):.0f} s"
                          + (f"; {g['error']}" if "error" in g else ""), flush=True)
                if args.no_forest:
                    continue
                rf = random_forest_tiles(split, case, seed, args) if isinstance(split, TileSplit) \
                    else random_forest(split, case, args, seed)
                forest[seed] = rf
                print(f"  RF: {rf['features']} features, {rf['train_pixels']} of {rf['labelled_train_pixels']} "
                      f"labelled pixels, fit + predict {rf['seconds']:.1f} s", flush=True)
            results[name] = {"note": note, "runs": runs, "rf": forest, "seconds": time.perf_counter() - t0}
        report(results, header, args.json)


if __name__ == "__main__":
    main()
