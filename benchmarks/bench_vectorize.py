"""Benchmark: geoseg's streaming vectorisation against gdal_polygonize and one whole-raster shapes call.

Generates a six-class raster of land-cover-like blobs (a smoothed random field, quantised; EPSG:32633,
10 m, tiled 512, deflate) in a temporary folder, then runs each method in its own subprocess so that the
peak memory belongs to that method alone. geoseg polygonises in worker processes, so peak memory is that
of the method's whole process tree: the largest sum of its processes' resident sets (sampled every 20 ms;
shared library pages count in every process that maps them, so several processes are not flattered), and
never less than its largest process's ``ru_maxrss``:

- ``geoseg``: :func:`geoseg.gis.vectorize.vectorize_raster` to GeoPackage (worker processes);
- ``gdal_polygonize``: GDAL's command line tool (Debian: ``apt-get install gdal-bin``) to GeoPackage;
  skipped with a message when it is not installed;
- ``shapes+pyogrio``: one ``rasterio.features.shapes`` call over the whole raster, then one batched
  ``pyogrio.write_dataframe`` to GeoPackage;
- ``geoseg, GEOS union`` (``--union``): geoseg with its seam stitch (:func:`geoseg.gis.vectorize.stitch.stitch`,
  a rectilinear ring relink) replaced by one ``shapely.coverage_union_all`` per group of pieces, to measure
  whether the hand-written stitch earns its place; the script also checks that both give the same polygons
  (count, total area, and each group's area).

Usage::

    python benchmarks/bench_vectorize.py            # 8192 x 8192 (minutes)
    python benchmarks/bench_vectorize.py --size 2048 --workers 2
    python benchmarks/bench_vectorize.py --repeats 3   # methods interleaved, medians (noisy shared machines)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]


def make_raster(path: Path, size: int, seed: int = 0) -> None:
    """A ``size`` x ``size`` uint8 raster of six classes in blobs, written in strips of 512 rows."""
    import rasterio
    from rasterio.transform import from_origin
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    # a coarse field upsampled then smoothed: blobs of ~100-300 px without a size^2 float64 filter pass
    coarse = ndimage.gaussian_filter(rng.normal(size=(size // 8 + 2, size // 8 + 2)), 2.0)
    field = ndimage.zoom(coarse, 8, order=1)[:size, :size].astype(np.float32)
    field += 0.15 * ndimage.gaussian_filter(rng.normal(size=(size, size)).astype(np.float32), 2.0)
    edges = np.quantile(field[:: max(1, size // 1024), :: max(1, size // 1024)], np.linspace(0, 1, 7)[1:-1])
    classes = np.digitize(field, edges).astype(np.uint8) + 1  # 1..6
    profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs="EPSG:32633",
                   transform=from_origin(500_000.0, 5_100_000.0, 10.0, 10.0), nodata=0, tiled=True,
                   blockxsize=512, blockysize=512, compress="deflate")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(classes, 1)


# ------------------------------------------------------------------------------ methods (children)


def run_geoseg(src: str, dst: str, workers: int | None, block_size: int | None) -> int:
    from geoseg.gis.vectorize import BLOCK_SIZE, vectorize_raster

    result = vectorize_raster(src, dst, workers=workers, block_size=block_size or BLOCK_SIZE)
    return result.features


def run_shapes(src: str, dst: str) -> int:
    import geopandas as gpd
    import pyogrio
    import rasterio
    import rasterio.features
    import shapely

    with rasterio.open(src) as ds:
        data = ds.read(1)
        mask = data != ds.nodata
        transform, crs = ds.transform, ds.crs
    geoms, values = [], []
    for geom, value in rasterio.features.shapes(data, mask=mask, transform=transform):
        geoms.append(shapely.geometry.shape(geom))
        values.append(int(value))
    gdf = gpd.GeoDataFrame({"class_id": values}, geometry=geoms, crs=crs)
    pyogrio.write_dataframe(gdf, dst, driver="GPKG")  # one call: GDAL writes it in one transaction
    return len(gdf)


def run_gdal(src: str, dst: str) -> int:
    import pyogrio

    tool = shutil.which("gdal_polygonize.py") or shutil.which("gdal_polygonize")
    assert tool is not None
    subprocess.run([tool, "-q", src, "-f", "GPKG", dst, "polygons", "class_id"], check=True)
    return int(pyogrio.read_info(dst)["features"])


def union_stitch(groups: list[list[object]], connectivity: int, block: int, width: int, height: int) -> object:
    """The stitch's job done by GEOS: each group's pieces unioned as a coverage. GDAL drops collinear vertices,
    so the two sides of a seam are not noded alike: the pieces are split at every pixel corner first (as
    coverage union requires), and collinear vertices dropped from the result (as the stitch does)."""
    import shapely

    out = np.empty(len(groups), dtype=object)
    for i, pieces in enumerate(groups):
        noded = shapely.segmentize(np.asarray(pieces, dtype=object), 1.0)
        out[i] = shapely.simplify(shapely.coverage_union_all(noded), 0.0)
    return out


def child(method: str, src: str, dst: str, workers: int | None, block_size: int | None) -> None:
    t0 = time.perf_counter()
    if method == "union":
        import geoseg.gis.vectorize.merge as merge

        merge.stitch = union_stitch  # type: ignore[assignment]  (the merge runs in this process)
        n = run_geoseg(src, dst, workers, block_size)
    elif method == "geoseg":
        n = run_geoseg(src, dst, workers, block_size)
    elif method == "shapes":
        n = run_shapes(src, dst)
    else:
        n = run_gdal(src, dst)
    seconds = time.perf_counter() - t0
    print(json.dumps({"features": n, "seconds": seconds}))


# ---------------------------------------------------------------------------------------- parent


def same_polygons(a: Path, b: Path) -> str:
    """Whether two vectorisations hold the same polygons: counts, total area, and per-polygon areas."""
    import pyogrio
    import shapely

    ga, gb = pyogrio.read_dataframe(a), pyogrio.read_dataframe(b)
    key = ["class_id", "area_m2"]
    sa, sb = ga.sort_values(key).reset_index(drop=True), gb.sort_values(key).reset_index(drop=True)
    same_count = len(ga) == len(gb)
    same_areas = same_count and bool(np.allclose(sa.area_m2, sb.area_m2, rtol=0, atol=1e-6))
    verts = (int(shapely.get_num_coordinates(ga.geometry.values).sum()),
             int(shapely.get_num_coordinates(gb.geometry.values).sum()))
    return (f"stitch vs GEOS union: {len(ga)} vs {len(gb)} polygons, per-polygon areas "
            f"{'equal' if same_areas else 'DIFFER'}, vertices {verts[0]} vs {verts[1]}")


def _tree_rss_mb(root: psutil.Process) -> float:
    """Resident memory of ``root``'s descendants (not ``root`` itself), in MB."""
    total = 0
    for proc in root.children(recursive=True):
        try:
            total += proc.memory_info().rss
        except psutil.Error:  # ended between the listing and the reading
            continue
    return total / 2**20


def measure(method: str, src: Path, dst: Path, workers: int | None, block_size: int | None) -> dict[str, float]:
    """Run one method in a fresh interpreter; its peak memory is that of its whole process tree."""
    cmd = [sys.executable, __file__, "--child", method, "--src", str(src), "--dst", str(dst)]
    if workers:
        cmd += ["--workers", str(workers)]
    if block_size:
        cmd += ["--block-size", str(block_size)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # A shell-free middleman: RUSAGE_CHILDREN gives the largest process of this method only, and the
    # sampler sums the middleman's descendants (the method's processes) at each instant.
    wrapper = [sys.executable, "-c",
               "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(r.returncode)", *cmd]
    t0 = time.perf_counter()
    tree_mb = 0.0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(wrapper, stdout=out, stderr=err, text=True, env=env)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            tree_mb = max(tree_mb, _tree_rss_mb(root))
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{stderr[-2000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    rss_kb = max(int(line.split()[1]) for line in stderr.splitlines() if line.startswith("MAXRSS"))
    return {"seconds": result["seconds"], "wall": wall, "peak_mb": max(tree_mb, rss_kb / 1024),
            "largest_mb": rss_kb / 1024, "features": result["features"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=8192, help="raster side in pixels (default 8192)")
    ap.add_argument("--workers", type=int, default=None,
                    help="geoseg worker processes (default: geoseg's, min(4, cores))")
    ap.add_argument("--block-size", type=int, default=None, help="geoseg block size (default: geoseg's)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each method, interleaved; the table shows medians (default 1)")
    ap.add_argument("--keep", type=Path, default=None, help="write into this folder and keep the files")
    ap.add_argument("--union", action="store_true",
                    help="also run geoseg with its seam stitch replaced by shapely.coverage_union_all")
    ap.add_argument("--child", choices=["geoseg", "shapes", "gdal", "union"], help=argparse.SUPPRESS)
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--dst", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.src, args.dst, args.workers, args.block_size)
        return

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_vectorize-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / f"classes_{args.size}.tif"
        t0 = time.perf_counter()
        make_raster(src, args.size)
        print(f"raster: {args.size} x {args.size}, 6 classes, EPSG:32633 ({time.perf_counter() - t0:.1f} s to make)")
        print(f"cpus: {os.cpu_count()}, geoseg workers: {args.workers or 'default'}, "
              f"block size: {args.block_size or 'default'}, repeats: {args.repeats}")
        methods = [("geoseg", "geoseg vectorize_raster"), ("gdal", "gdal_polygonize"),
                   ("shapes", "shapes + pyogrio")]
        if args.union:
            methods.insert(1, ("union", "geoseg, GEOS union"))
        if not (shutil.which("gdal_polygonize.py") or shutil.which("gdal_polygonize")):
            print("gdal_polygonize: not installed, skipped (Debian: apt-get install -y gdal-bin)")
            methods = [m for m in methods if m[0] != "gdal"]
        runs: dict[str, list[dict[str, float]]] = {label: [] for _, label in methods}
        for i in range(args.repeats):
            for key, label in methods:
                dst = work / f"{key}.gpkg"
                dst.unlink(missing_ok=True)
                print(f"running {label} ({i + 1}/{args.repeats}) ...", flush=True)
                r = measure(key, src, dst, args.workers, args.block_size)
                print(f"  {r['seconds']:.1f} s, peak {r['peak_mb']:.0f} MB (largest process "
                      f"{r['largest_mb']:.0f} MB), {r['features']:.0f} features", flush=True)
                runs[label].append(r)
        rows = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in runs.items()}
        if args.union:
            print(same_polygons(work / "geoseg.gpkg", work / "union.gpkg"))
        base = rows["geoseg vectorize_raster"]
        print()
        print(f"{'method':<26}{'seconds':>10}{'peak MB':>10}{'features':>10}{'time/geoseg':>13}{'mem/geoseg':>12}")
        for label, r in rows.items():
            print(f"{label:<26}{r['seconds']:>10.1f}{r['peak_mb']:>10.0f}{r['features']:>10.0f}"
                  f"{r['seconds'] / base['seconds']:>13.2f}{r['peak_mb'] / base['peak_mb']:>12.2f}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
