"""Peak memory and throughput of `geoseg predict` as the scene grows, against a whole-scene baseline.

Each run is a separate process (so peak memory is its own), on synthetic 3-band uint8 scenes, with a tiny
model (a 1x1 convolution, 5 classes, 512 px chips, 128 px overlap), so that the figures measure the engine
(reads, blending, writing, COG) rather than the network. The baseline is what several peers do: read the
whole scene, predict the same chips, blend in whole-scene arrays, write once.

    python benchmarks/bench_predict_memory.py                 # 4096 and 16384
    python benchmarks/bench_predict_memory.py --sizes 2048 4096 --no-baseline-above 4096
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

BASELINE = r'''
import sys, json, resource, time
import numpy as np, rasterio, torch
from geoseg.model.bundle import load_model
from geoseg.predict.blend import chip_weights
from geoseg.predict.tiling import ChipGrid
scene, bundle, out = sys.argv[1:4]
t0 = time.perf_counter()
m = load_model(bundle); c = m.contract
with rasterio.open(scene) as ds:
    data = ds.read().astype(np.float32); prof = ds.profile
mean = np.asarray(c.input.mean, np.float32)[:, None, None]; std = np.asarray(c.input.std, np.float32)[:, None, None]
data = (data - mean) / std
k = len(c.classes); h, w = data.shape[1:]
acc = np.zeros((k, h, w), np.float32); ws = np.zeros((h, w), np.float32)
g = ChipGrid(w, h, c.chip_size, c.overlap)
with torch.inference_mode():
    for ch in g:
        x0, y0, s = int(ch.window.col_off), int(ch.window.row_off), c.chip_size
        p = torch.softmax(m.module(torch.from_numpy(data[None, :, y0:y0+s, x0:x0+s].copy())), 1)[0].numpy()
        wt = chip_weights("cosine", s, c.overlap, ch.ramps)
        acc[:, y0:y0+s, x0:x0+s] += p * wt; ws[y0:y0+s, x0:x0+s] += wt
cls = (np.argmax(acc / ws, 0) + 1).astype(np.uint8)
prof.update(count=1, dtype="uint8", nodata=255, tiled=True, blockxsize=512, blockysize=512, compress="deflate")
with rasterio.open(out, "w", **prof) as dst:
    dst.write(cls[None])
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def make_inputs(tmp: Path, sizes: list[int]) -> tuple[Path, dict[int, Path]]:
    """Generate the bundle and scenes in a child process.

    On Linux a child's ru_maxrss starts from its parent's peak (exec keeps the high-water mark), so the
    parent must stay small: it never imports torch nor holds a scene.
    """
    code = (f"import sys; sys.path[:0] = [{str(HERE)!r}]; from bench_predict_memory import _make_inputs; "
            f"_make_inputs({str(tmp)!r}, {sizes!r})")
    subprocess.run([sys.executable, "-c", code], check=True)
    return tmp / "tiny", {n: tmp / f"scene{n}.tif" for n in sizes}


def _make_inputs(tmp_dir: str, sizes: list[int]) -> None:
    tmp = Path(tmp_dir)
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import make_bundle

    from geoseg.learn.synthetic import make_scene

    make_bundle(tmp / "tiny", n_bands=3, n_classes=5, chip=512, overlap=128, identity=False,
                         input={"bands": ["red", "green", "blue"], "mean": [120.0] * 3, "std": [50.0] * 3})
    scenes = {}
    for n in sizes:
        t0 = time.perf_counter()
        if (tmp / f"scene{n}.tif").exists():  # --workdir of an earlier run
            scenes[n] = tmp / f"scene{n}.tif"
            continue
        scenes[n] = make_scene(tmp / f"scene{n}.tif", tmp / f"labels{n}.tif", n, seed=n).image
        print(f"generated {n}x{n} in {time.perf_counter() - t0:.0f} s", flush=True)


def run_geoseg(scene: Path, bundle: Path, out: Path, workers: int | None) -> dict:
    report = out / "report.json"
    cmd = [sys.executable, "-m", "geoseg.cli", "-q", "predict", str(scene), "--model", str(bundle),
           "--output-dir", str(out), "--report", str(report), "--overwrite", "--no-vector"]
    if workers:
        cmd += ["--workers", str(workers)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    rep = json.loads(report.read_text())
    return {"seconds": time.perf_counter() - t0, "peak_memory_mb": rep["peak_memory_mb"],
            "stages": rep["stage_seconds"]}


def run_baseline(scene: Path, bundle: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", BASELINE, str(scene), str(bundle), str(out / "baseline.tif")],
                         check=True, capture_output=True, text=True)
    d = json.loads(res.stdout.strip().splitlines()[-1])
    d["seconds"] = time.perf_counter() - t0
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--no-baseline-above", type=int, default=16384,
                    help="skip the whole-scene baseline for larger scenes (it needs ~40 bytes per pixel)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) the generated scenes here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="geoseg-bench-") as d:
        tmp = args.workdir or Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        bundle, scenes = make_inputs(tmp, args.sizes)
        for n in args.sizes:
            out = tmp / f"out{n}"
            out.mkdir(exist_ok=True)
            g = run_geoseg(scenes[n], bundle, out, args.workers)
            b = run_baseline(scenes[n], bundle, out) if n <= args.no_baseline_above else None
            rows.append((n, g, b))
            print(f"{n}: geoseg {g['seconds']:.1f} s {g['peak_memory_mb']:.0f} MB stages {g['stages']}"
                  + (f"; baseline {b['seconds']:.1f} s {b['peak_memory_mb']:.0f} MB" if b else ""), flush=True)
    print()
    print(f"{'size':>7} {'MPix':>7} {'geoseg s':>9} {'MPix/s':>7} {'peak MB':>8} | {'baseline s':>10} "
          f"{'peak MB':>8} | {'mem ratio':>9} {'speed ratio':>11}")
    for n, g, b in rows:
        mp = n * n / 1e6
        line = f"{n:>7} {mp:>7.1f} {g['seconds']:>9.1f} {mp / g['seconds']:>7.2f} {g['peak_memory_mb']:>8.0f} | "
        if b:
            line += (f"{b['seconds']:>10.1f} {b['peak_memory_mb']:>8.0f} | "
                     f"{b['peak_memory_mb'] / g['peak_memory_mb']:>9.2f} {b['seconds'] / g['seconds']:>11.2f}")
        else:
            line += f"{'-':>10} {'-':>8} | {'-':>9} {'-':>11}"
        print(line)
    if len(rows) > 1:
        (n0, g0, _), (n1, g1, _) = rows[0], rows[-1]
        print(f"\npixels x{(n1 / n0) ** 2:.0f} -> geoseg peak memory x{g1['peak_memory_mb'] / g0['peak_memory_mb']:.2f}")
    print("ratios: baseline / geoseg (higher = geoseg better); peak = ru_maxrss of each process")


if __name__ == "__main__":
    main()
