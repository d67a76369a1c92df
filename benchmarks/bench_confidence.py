"""What ``--confidence`` costs `geoseg predict`: wall time and peak memory with and without it, side by side.

The scene and model of :mod:`bench_pipeline` (a synthetic 3-band uint8 scene, a U-Net resnet18 with random
weights, 6 classes, 512 px chips, 128 px overlap), the defaults otherwise (quicklook on). Each run is its own
process, so its peak memory (ru_maxrss) is its own; the two runs alternate, ``--repeats`` times, and the
table shows medians of the wall time and of the process's CPU time (user + system: steadier than the wall
time on a machine shared with other work). ``--polygons`` adds the same pair with the GeoPackage (then the polygons also get
``confidence_mean``).

    python benchmarks/bench_confidence.py --size 2048 --repeats 3
    python benchmarks/bench_confidence.py --size 4096 --repeats 3 --polygons --workdir /tmp/gs-bench
    python benchmarks/bench_confidence.py --size 4096 --repeats 3 --engine     # the worst case
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def child_tiny(workdir: str) -> None:
    """The 1x1-convolution bundle of :mod:`bench_predict_memory` (5 classes, 512 px chips, 128 px overlap)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from conftest import make_bundle

    if not (Path(workdir) / "tiny").exists():
        make_bundle(Path(workdir) / "tiny", n_bands=3, n_classes=5, chip=512, overlap=128, identity=False,
                    input={"bands": ["red", "green", "blue"], "mean": [120.0] * 3, "std": [50.0] * 3})


def _cpu_seconds() -> float:
    import resource

    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def child_predict(scene: str, bundle: str, out: str, options: dict[str, Any]) -> dict[str, Any]:
    from geoseg.predict.api import predict_scenes
    from geoseg.predict.report import peak_memory_mb

    t0, c0 = time.perf_counter(), _cpu_seconds()
    run = predict_scenes([scene], bundle, out, overwrite=True, **options)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_memory_mb": peak_memory_mb(),
            "precision": run.options.precision,
            "batch_size": run.options.batch_size, "machine": run.machine,
            "stages": {k: round(v, 2) for k, v in run.stage_seconds.items()}}


def _child(fn: str, *args: Any) -> dict[str, Any]:
    code = (f"import sys, json; sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]; "
            f"import bench_confidence as b, bench_pipeline as p; f = getattr(b, {fn!r}, None) or getattr(p, {fn!r}); "
            "r = f(*json.loads(sys.argv[1])); print('RESULT ' + json.dumps(r))")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], check=True, capture_output=True,
                         text=True)
    line = next(ln for ln in res.stdout.splitlines()[::-1] if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]) or {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--chip", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--polygons", action="store_true", help="also the pair with polygons (GeoPackage)")
    ap.add_argument("--engine", action="store_true",
                    help="a 1x1-convolution model instead of the U-Net: the engine's own work dominates, the "
                         "worst case for the relative overhead (as a fast GPU would make it); its noisy map makes "
                         "millions of polygons, so leave --polygons out with it")
    ap.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) the scene and bundle here")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="geoseg-confidence-") as d:
        tmp = args.workdir or Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        _child("child_make", str(tmp), [args.size], args.encoder, args.chip, args.overlap)
        bundle = str(tmp / f"unet-{args.encoder}-{args.chip}-{args.overlap}")
        if args.engine:
            _child("child_tiny", str(tmp))
            bundle = str(tmp / "tiny")
        scene = str(tmp / f"scene{args.size}.tif")
        base = {"device": "cpu", "vector_format": None}
        plan = [("predict", base), ("predict --confidence", base | {"confidence": True})]
        if args.polygons:
            gpkg = {"device": "cpu", "vector_format": "gpkg"}
            plan += [("predict + polygons", gpkg), ("predict + polygons --confidence", gpkg | {"confidence": True})]
        runs: dict[str, list[dict[str, Any]]] = {}
        for rep in range(args.repeats):
            for i, (name, opts) in enumerate(plan):
                r = _child("child_predict", scene, bundle, str(tmp / f"out{i}"), opts)
                runs.setdefault(name, []).append(r)
                print(f"[{rep + 1}/{args.repeats}] {name}: {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s CPU), "
                      f"{r['peak_memory_mb']:.0f} MB "
                      f"({r['precision']}, batch {r['batch_size']}) stages {r['stages']}", flush=True)
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    cpu = {k: statistics.median(r["cpu_seconds"] for r in v) for k, v in runs.items()}
    mem = {k: max(r["peak_memory_mb"] for r in v) for k, v in runs.items()}
    first = next(iter(runs.values()))[0]
    model = "a 1x1 convolution (5 classes)" if args.engine else f"U-Net {args.encoder} (6 classes)"
    print(f"\nmachine: {first['machine']}; scene {args.size} x {args.size} 3-band uint8, {model}, "
          f"{args.chip} px chips, {args.overlap} px overlap; medians of {args.repeats}")
    print(f"{'run':<34} {'wall s':>8} {'CPU s':>8} {'peak MB':>8}  all runs (wall s)")
    for k, v in runs.items():
        each = ", ".join(f"{r['seconds']:.1f}" for r in v)
        print(f"{k:<34} {med[k]:>8.1f} {cpu[k]:>8.1f} {mem[k]:>8.0f}  {each}")
    for a, b in (("predict", "predict --confidence"), ("predict + polygons", "predict + polygons --confidence")):
        if a in med:
            print(f"--confidence overhead ({a}): {100 * (med[b] / med[a] - 1):+.1f} % wall time, "
                  f"{100 * (cpu[b] / cpu[a] - 1):+.1f} % CPU time, {100 * (mem[b] / mem[a] - 1):+.1f} % peak memory")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median_seconds": med, "peak_memory_mb": mem}, indent=1))


if __name__ == "__main__":
    main()
