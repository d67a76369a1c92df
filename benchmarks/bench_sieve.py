"""Benchmark: geoseg's streamed sieve (``--mmu``) against rasterio's whole-map sieve, time and peak memory.

Builds a ``size`` x ``size`` land-cover map from real data: the Slovenian land-use map of the shared data
(``slovenia_lulc/LULC_from_npy.tif``, 5 classes, 10 m, nodata 0) cut into 100 x 100 tiles that are laid
side by side with random turns and flips (seeded), optionally with classifier-like speckle (``--speckle``:
that share of pixels set to a random class), written as a tiled, deflated GeoTIFF (EPSG:32633, 10 m).
Each method then runs in its own process, so that its peak memory (``ru_maxrss``) is its own:

- ``streamed``: :func:`geoseg.gis.sieve.sieve_raster`, file to file, in strips;
- ``whole``: read the whole band and its mask, ``rasterio.features.sieve(band, n, mask=valid)``, write the
  whole band (what peers do: the map in memory).

Both outputs are compared pixel for pixel. ``--predict-seconds S`` prints the streamed sieve's time as a
share of a predict run of ``S`` seconds on a scene of this size. ``--predict`` also times ``geoseg predict``
with and without ``--mmu`` (its own processes): on a scene whose bands are the map's classes one-hot, with a
1x1-convolution identity model (so that the predicted map *is* the land-cover map, and predict's time is the
engine's, a lower bound on a real network's), and checks that ``predict --mmu`` equals rasterio's sieve of
the plain prediction; ``--vector`` keeps the polygons in both runs.

Usage::

    python benchmarks/bench_sieve.py                      # 10000 x 10000, 0.5ha (50 px), 4-connected
    python benchmarks/bench_sieve.py --size 4000 --speckle 0.02 --connectivity 8
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GEOSEG_REAL_DATA", REPO.parent / "shared" / "data"))


def make_map(path: Path, size: int, speckle: float, seed: int = 0) -> None:
    """The tiled Slovenian land-use map, ``size`` x ``size``, written in strips of 512 rows."""
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(DATA / "slovenia_lulc" / "LULC_from_npy.tif") as ds:
        tile = ds.read(1)[:100, :100]
    rng = np.random.default_rng(seed)
    n = -(-size // 100)
    profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs="EPSG:32633",
                   transform=from_origin(500_000.0, 5_100_000.0, 10.0, 10.0), nodata=0, tiled=True,
                   blockxsize=512, blockysize=512, compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        for r0 in range(0, n * 100, 500):
            rows = []
            for _ in range(5):
                row = []
                for _ in range(n):
                    t = np.rot90(tile, int(rng.integers(4)))
                    row.append(t[:, ::-1] if rng.random() < 0.5 else t)
                rows.append(np.hstack(row))
            block = np.vstack(rows)[:, :size]
            if speckle:
                hit = rng.random(block.shape) < speckle
                block[hit & (block != 0)] = rng.choice([1, 2, 3, 4, 8], int((hit & (block != 0)).sum()))
            h = min(500, size - r0)
            if h > 0:
                dst.write(block[:h], 1, window=rasterio.windows.Window(0, r0, size, h))


def make_scene(src: Path, scene: Path, bundle: Path) -> None:
    """A 5-band one-hot scene of the map's classes (1, 2, 3, 4, 8; nodata 0) and an identity model."""
    import rasterio

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import make_bundle

    make_bundle(bundle, n_bands=5, n_classes=5, chip=512, overlap=128)
    with rasterio.open(src) as ds:
        profile = dict(ds.profile, count=5, compress="deflate")
        with rasterio.open(scene, "w", **profile) as dst:
            for r0 in range(0, ds.height, 512):
                win = rasterio.windows.Window(0, r0, ds.width, min(512, ds.height - r0))
                m = ds.read(1, window=win)
                bands = np.stack([np.where(m == k, 200, 10) for k in (1, 2, 3, 4, 8)]).astype(np.uint8)
                bands[:, m == 0] = 0
                dst.write(bands, window=win)


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def run_predict(scene: Path, bundle: Path, out: Path, mmu: str | None, connectivity: int,
                vector: bool) -> tuple[float, float, float, float]:
    """Wall and CPU seconds (the process and its worker processes) of one ``geoseg predict``, and of its
    sieve (from its log; 0 without ``mmu``)."""
    cmd = [sys.executable, "-m", "geoseg.cli", "-v", "predict", str(scene), "--model", str(bundle),
           "--output-dir", str(out), "--no-quicklook", "--overwrite", "--connectivity", str(connectivity)]
    cmd += [] if vector else ["--no-vector"]
    cmd += ["--mmu", mmu] if mmu else []
    t0, c0 = time.perf_counter(), _cpu(resource.RUSAGE_CHILDREN)
    run = subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    m = re.search(r"sieved .* ([0-9.]+) s \(([0-9.]+) s CPU\)", run.stderr)
    sieve = (float(m.group(1)), float(m.group(2))) if m else (0.0, 0.0)
    return time.perf_counter() - t0, _cpu(resource.RUSAGE_CHILDREN) - c0, *sieve


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_method(method: str, src: str, dst: str, mmu: str, connectivity: int, workers: int | None
               ) -> dict[str, float]:
    """One method in this process: seconds and peak memory (MB, and MB after the imports)."""
    import rasterio
    import rasterio.features

    from geoseg.gis.sieve import mmu_pixels, sieve_raster

    base = _peak_mb()
    t0, c0 = time.perf_counter(), _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN)
    if method == "streamed":
        res = sieve_raster(src, dst, mmu, connectivity, overwrite=True, workers=workers)
        threshold = res.threshold
    else:
        with rasterio.open(src) as ds:
            threshold = mmu_pixels(mmu, crs=ds.crs, transform=ds.transform, bounds=tuple(ds.bounds))
            band, valid = ds.read(1), ds.read_masks(1) > 0
            profile = ds.profile
        out = rasterio.features.sieve(band, threshold, mask=valid, connectivity=connectivity)
        with rasterio.open(dst, "w", **profile) as o:
            o.write(out, 1)
    return {"seconds": time.perf_counter() - t0, "peak_mb": _peak_mb(), "import_mb": base, "threshold": threshold,
            "cpu_s": _cpu(resource.RUSAGE_SELF) + _cpu(resource.RUSAGE_CHILDREN) - c0}


def _same(a: str, b: str) -> bool:
    import rasterio

    with rasterio.open(a) as x, rasterio.open(b) as y:
        for _, win in x.block_windows(1):
            if not np.array_equal(x.read(1, window=win), y.read(1, window=win)):
                return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=10000)
    ap.add_argument("--mmu", default="0.5ha")
    ap.add_argument("--connectivity", type=int, default=4, choices=[4, 8])
    ap.add_argument("--speckle", type=float, default=0.0, help="share of pixels set to a random class")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--predict-seconds", type=float, default=None)
    ap.add_argument("--predict", action="store_true", help="also time geoseg predict with and without --mmu")
    ap.add_argument("--vector", action="store_true", help="with --predict: write polygons too")
    ap.add_argument("--repeats", type=int, default=1, help="with --predict: runs of each, medians")
    ap.add_argument("--workers", type=int, default=None, help="the streamed sieve's worker processes")
    ap.add_argument("--run", nargs=3, metavar=("METHOD", "SRC", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        print(json.dumps(run_method(args.run[0], args.run[1], args.run[2], args.mmu, args.connectivity,
                                    args.workers)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gs-sieve-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"lulc_{args.size}_{args.speckle:g}.tif"
    if not src.exists():
        t0 = time.perf_counter()
        make_map(src, args.size, args.speckle)
        print(f"map: {src} ({time.perf_counter() - t0:.1f} s to build)", file=sys.stderr)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    results = {}
    for method in ("streamed", "whole"):
        extra = ["--workers", str(args.workers)] if args.workers else []
        out = subprocess.run([sys.executable, __file__, "--mmu", args.mmu, "--connectivity", str(args.connectivity),
                              *extra, "--run", method, str(src), str(work / f"{method}.tif")],
                             env=env, capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    same = _same(str(work / "streamed.tif"), str(work / "whole.tif"))
    mpix = args.size * args.size / 1e6
    print(f"{args.size} x {args.size} land-cover map (Slovenia LULC tiles, speckle {args.speckle:g}), --mmu "
          f"{args.mmu} = {results['streamed']['threshold']} px, {args.connectivity}-connected; identical: {same}")
    print(f"{'method':<10} {'seconds':>8} {'CPU s':>6} {'MPix/s':>7} {'peak MB':>8} {'imports MB':>10} {'work MB':>8}")
    for method, r in results.items():
        print(f"{method:<10} {r['seconds']:>8.1f} {r['cpu_s']:>6.1f} {mpix / r['seconds']:>7.1f} {r['peak_mb']:>8.0f} "
              f"{r['import_mb']:>10.0f} {r['peak_mb'] - r['import_mb']:>8.0f}")
    print("peak MB: the method's own process (ru_maxrss); CPU s: with its worker processes, if any")
    if args.predict:
        import rasterio
        import rasterio.features

        scene, bundle = work / f"scene_{args.size}_{args.speckle:g}.tif", work / "identity5"
        if not scene.exists():
            make_scene(src, scene, bundle)
        times: dict[str, list[tuple[float, float, float, float]]] = {"plain": [], "mmu": []}
        for _ in range(args.repeats):  # interleaved: a shared machine's load falls on both alike
            times["plain"].append(run_predict(scene, bundle, work / "plain", None, args.connectivity, args.vector))
            times["mmu"].append(run_predict(scene, bundle, work / "mmu", args.mmu, args.connectivity, args.vector))
        plain, mmu = (statistics.median(t[0] for t in times[k]) for k in ("plain", "mmu"))
        plain_cpu, mmu_cpu = (statistics.median(t[1] for t in times[k]) for k in ("plain", "mmu"))
        for wall, cpu, s_wall, s_cpu in times["mmu"]:
            print(f"predict --mmu run: {wall:.1f} s ({cpu:.1f} s CPU), of which the sieve {s_wall:.1f} s ({s_cpu:.1f} s "
                  f"CPU): {s_wall / (wall - s_wall):.1%} over the rest of the run ({s_cpu / (cpu - s_cpu):.1%} in CPU)")
        stem = scene.stem
        with rasterio.open(work / "plain" / f"{stem}.classes.tif") as a, \
                rasterio.open(work / "mmu" / f"{stem}.classes.tif") as b:
            raw = a.read(1)
            expected = rasterio.features.sieve(raw, results["streamed"]["threshold"], mask=a.read_masks(1) > 0,
                                               connectivity=args.connectivity)
            del raw
            same_predict = bool(np.array_equal(b.read(1), expected))
        print(f"geoseg predict (identity 1x1 model{', polygons' if args.vector else ', no polygons'}, median of "
              f"{args.repeats}): "
              f"{plain:.1f} s; with --mmu {args.mmu}: {mmu:.1f} s (+{mmu - plain:.1f} s, "
              f"{(mmu - plain) / plain:+.1%}); CPU {plain_cpu:.1f} s against {mmu_cpu:.1f} s "
              f"({(mmu_cpu - plain_cpu) / plain_cpu:+.1%}); equal to rasterio's sieve of the plain map: {same_predict}")
    if args.predict_seconds:
        print(f"streamed sieve / predict: {results['streamed']['seconds'] / args.predict_seconds:.1%} "
              f"of {args.predict_seconds:.0f} s")


if __name__ == "__main__":
    main()
