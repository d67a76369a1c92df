"""Pipeline efficiency, speed-up over the earlier defaults, and peak memory of `geoseg predict` with a real network.

One synthetic 3-band uint8 scene (default 4096 x 4096), one U-Net resnet18 with random weights (6 classes,
512 px chips, 128 px overlap: the figures of issue 8). Every run is its own process, so its peak memory
(ru_maxrss) is its own; they run in turn, ``--repeats`` times, and the table shows medians:

- ``bare forward``: the model alone on exactly the chips predict computes (read from the scene and
  normalised before the clock starts), at the precision, batch size and threads predict resolves, through
  the same :class:`~geoseg.predict.inference.Predictor` (network + softmax). The yardstick of the pipeline.
- ``predict (defaults)``: :func:`geoseg.predict.api.predict_scene` in-process, ``--no-vector``: reading,
  normalising, model, blending, strips, VRT and COG. Efficiency = its wall time / the bare forward's.
- ``predict fp32 batch 8``: the defaults before issue 8 (``--precision fp32 --batch-size 8``).
- ``predict onnxruntime``: the defaults with ``--backend onnxruntime`` (PyTorch bundle, converted in-process).
- ``onnx fp32`` / ``onnx int8`` (and ``openvino fp32`` / ``openvino int8`` where the openvino package is
  installed: ``--backend openvino``): the bundle exported with ``geoseg export --format onnx`` (and ``--int8``,
  calibrated on the scene), predicted through the torch-free path (numpy + ONNX Runtime; the child
  records whether torch was loaded), each with its own bare forward through the same
  :class:`~geoseg.predict.onnx_predictor.OnnxPredictor`, and the class map's arg-max agreement with the
  fp32 PyTorch run (``predict fp32 batch 8``). int8 on a network with random weights may refuse itself
  (agreement below 99.5 % on the first batch): ``--model`` and ``--scene`` take a trained bundle and its scene.
- ``CLI with polygons``: the whole command a user types, start-up and GeoPackage included.
- start-up: a new interpreter importing what ``geoseg predict`` imports (torch, smp, rasterio), and what
  the torch-free path imports for an ONNX bundle.

``--memory-sizes`` adds predict at defaults on larger scenes (peak memory as the scene grows).

    python benchmarks/bench_pipeline.py                       # ~6 min on 2 cores
    python benchmarks/bench_pipeline.py --size 2048 --repeats 1
    python benchmarks/bench_pipeline.py --memory-sizes 8192 16384 --workdir /tmp/gs-bench
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

N_CLASSES = 6

# ----------------------------------------------------------------------------------- children


def child_make(workdir: str, sizes: list[int], encoder: str, chip: int, overlap: int) -> None:
    from bench_cluster import make_bundle

    from geoseg.learn.synthetic import make_scene

    tmp = Path(workdir)
    make_bundle(tmp / f"unet-{encoder}-{chip}-{overlap}", encoder, chip, overlap)
    for n in sizes:
        if not (tmp / f"scene{n}.tif").exists():
            t0 = time.perf_counter()
            make_scene(tmp / f"scene{n}.tif", tmp / f"labels{n}.tif", n, seed=n)
            print(f"generated a {n} x {n} scene in {time.perf_counter() - t0:.0f} s", flush=True)


def child_export(bundle: str, scene: str, out: str, int8: bool) -> dict[str, Any]:
    from geoseg.model.bundle import read_bundle
    from geoseg.model.export import export

    if not Path(out).exists():
        export(bundle, "onnx", out, int8=int8, calibration=scene if int8 else None)
    meta = read_bundle(out).contract.metadata.get("export") or {}
    return {"folder": out, "int8": meta.get("int8")}  # int8: calibration chips, agreement there, float32 kept


def child_predict(scene: str, bundle: str, out: str, options: dict[str, Any]) -> dict[str, Any]:
    from geoseg.io.workers import share_one_heap

    share_one_heap()  # as `geoseg predict` does, before any thread
    from geoseg.errors import InputError
    from geoseg.predict.api import predict_scenes
    from geoseg.predict.report import peak_memory_mb

    t0 = time.perf_counter()
    try:
        run = predict_scenes([scene], bundle, out, overwrite=True, vector_format=None, **options)
    except InputError as exc:  # int8 refusing itself
        return {"refused": str(exc), "seconds": float("nan"), "peak_memory_mb": peak_memory_mb(), "chips": 0,
                "precision": options.get("precision", "?"), "batch_size": 0}
    seconds = time.perf_counter() - t0
    s = run.scenes[0]
    return {"seconds": seconds, "peak_memory_mb": peak_memory_mb(), "chips": s.chips_computed,
            "precision": run.options.precision, "batch_size": run.options.batch_size, "machine": run.machine,
            "stages": {k: round(v, 2) for k, v in run.stage_seconds.items()}, "classes": str(s.classes_path),
            "torch_loaded": "torch" in sys.modules}


def child_bare_onnx(scene: str, bundle: str, options: dict[str, Any]) -> dict[str, Any]:
    """The bare forward of an ONNX bundle: the same OnnxPredictor predict runs, on the same chips, no torch."""
    import numpy as np
    import rasterio

    from geoseg.io.raster import SceneReader
    from geoseg.model.bundle import read_bundle
    from geoseg.model.onnxrt import load_onnx_model
    from geoseg.predict.onnx_predictor import OnnxPredictor
    from geoseg.predict.report import peak_memory_mb
    from geoseg.predict.runtime import resolve_settings
    from geoseg.predict.tiling import ChipGrid
    from geoseg.predict.units import PredictOptions

    loaded = load_onnx_model(read_bundle(bundle))
    c = loaded.contract
    opts = PredictOptions(**options)
    settings = resolve_settings(opts, c.chip_size, len(c.input.bands), bundle=loaded.bundle)
    pred = OnnxPredictor(loaded, "cpu", settings.precision,
                         backend="openvino" if opts.backend == "openvino" else "onnxruntime")
    with rasterio.open(scene) as ds:
        grid = ChipGrid(ds.width, ds.height, c.chip_size, c.overlap if opts.overlap is None else opts.overlap)
    reader = SceneReader(scene, list(range(1, len(c.input.bands) + 1)), c.input.mean, c.input.std)
    chips = [reader.read(ch.window, (c.chip_size, c.chip_size))[0] for ch in grid]
    reader.close()
    b = settings.batch_size
    batches = []
    for i in range(0, len(chips), b):
        group = chips[i:i + b]
        group += [np.zeros_like(chips[0])] * (b - len(group))
        batches.append(np.stack(group))
    session = pred.session or pred.fp32  # the network predict runs (an int8 bundle's own; no agreement check here)
    assert session is not None
    pred._checked, pred.session = True, session
    pred.run_batch(batches[0])
    t0 = time.perf_counter()
    for x in batches:
        pred.run_batch(x)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "chips": len(chips), "peak_memory_mb": peak_memory_mb(),
            "precision": settings.precision, "batch_size": b, "torch_loaded": "torch" in sys.modules}


def child_bare(scene: str, bundle: str, options: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import rasterio
    import torch

    from geoseg.io.raster import SceneReader
    from geoseg.model.weights import load_model
    from geoseg.predict.inference import Predictor, resolve_settings
    from geoseg.predict.report import peak_memory_mb
    from geoseg.predict.tiling import ChipGrid
    from geoseg.predict.units import PredictOptions

    loaded = load_model(bundle)
    c = loaded.contract
    opts = PredictOptions(**options)
    settings = resolve_settings(opts, c.chip_size, len(c.input.bands), load=lambda: loaded)
    pred = Predictor(loaded, opts.device, settings.precision)
    with rasterio.open(scene) as ds:
        grid = ChipGrid(ds.width, ds.height, c.chip_size, c.overlap if opts.overlap is None else opts.overlap)
    reader = SceneReader(scene, list(range(1, len(c.input.bands) + 1)), c.input.mean, c.input.std)
    chips = [reader.read(ch.window, (c.chip_size, c.chip_size))[0] for ch in grid]
    reader.close()
    b = settings.batch_size
    batches = []
    for i in range(0, len(chips), b):
        group = chips[i:i + b]
        group += [np.zeros_like(chips[0])] * (b - len(group))  # predict pads short batches the same way
        batches.append(torch.from_numpy(np.stack(group)).contiguous(memory_format=torch.channels_last))
    with torch.inference_mode():
        pred.forward(batches[0])  # what predict's first batch pays is in predict's figure, not here
        t0 = time.perf_counter()
        for x in batches:
            pred.forward(x)
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "chips": len(chips), "peak_memory_mb": peak_memory_mb(),
            "precision": settings.precision, "batch_size": b}


# ----------------------------------------------------------------------------------- parent


def _child(fn: str, *args: Any) -> dict[str, Any]:
    code = (f"import sys, json; sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]; import bench_pipeline as b; "
            f"r = b.{fn}(*json.loads(sys.argv[1])); print('RESULT ' + json.dumps(r))")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], check=True, capture_output=True,
                         text=True)
    line = next(ln for ln in res.stdout.splitlines()[::-1] if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _cli(scene: Path, bundle: Path, out: Path) -> dict[str, Any]:
    report = out / "report.json"
    cmd = [sys.executable, "-m", "geoseg.cli", "-q", "predict", str(scene), "--model", str(bundle),
           "--output-dir", str(out), "--report", str(report), "--overwrite"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    rep = json.loads(report.read_text())
    return {"seconds": time.perf_counter() - t0, "peak_memory_mb": rep["peak_memory_mb"]}


def _startup(torch_free: bool = False) -> dict[str, Any]:
    mods = ("onnxruntime, rasterio, geoseg.predict.api, geoseg.predict.engine, geoseg.predict.onnx_predictor"
            if torch_free else "torch, segmentation_models_pytorch, rasterio, geoseg.predict.api, geoseg.predict.engine")
    code = f"import resource, sys; import {mods}; print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    rss = float(next(ln for ln in out.splitlines() if ln.startswith("RSS")).split()[1]) / 1024
    return {"seconds": time.perf_counter() - t0, "peak_memory_mb": rss}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _agreement(a: str, b: str) -> float:
    import numpy as np
    import rasterio

    with rasterio.open(a) as x, rasterio.open(b) as y:
        return float(np.mean(x.read(1) == y.read(1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--chip", type=int, default=512)
    ap.add_argument("--overlap", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--memory-sizes", type=int, nargs="*", default=[], help="also predict these sizes (memory)")
    ap.add_argument("--no-cli", action="store_true", help="skip the CLI run with polygons")
    ap.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) the scenes and bundle here")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--model", type=Path, default=None, help="a trained bundle instead of the random U-Net")
    ap.add_argument("--scene", type=Path, default=None, help="the scene for --model")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX fp32 / int8 rows")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="geoseg-pipeline-") as d:
        tmp = args.workdir or Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        sizes = sorted({args.size, *args.memory_sizes})
        if args.model is None:
            _child("child_make", str(tmp), sizes, args.encoder, args.chip, args.overlap)
        bundle = args.model or tmp / f"unet-{args.encoder}-{args.chip}-{args.overlap}"
        scene = args.scene or tmp / f"scene{args.size}.tif"
        runs: dict[str, list[dict[str, Any]]] = {}
        plan = [("bare forward", "child_bare", (str(scene), str(bundle), {"device": "cpu"})),
                ("predict (defaults)", "child_predict", (str(scene), str(bundle), str(tmp / "out"), {"device": "cpu"})),
                ("predict fp32 batch 8", "child_predict",
                 (str(scene), str(bundle), str(tmp / "out8"), {"device": "cpu", "precision": "fp32", "batch_size": 8})),
                ("predict onnxruntime", "child_predict",
                 (str(scene), str(bundle), str(tmp / "outo"), {"device": "cpu", "backend": "onnxruntime"}))]
        backends = ["onnxruntime"] + (["openvino"] if _has("openvino") else [])
        if not args.no_onnx:
            for precision in ("fp32", "int8"):
                folder = tmp / f"{bundle.name}-onnx-{precision}-{scene.stem}"
                _child("child_export", str(bundle), str(scene), str(folder), precision == "int8")
                for backend in backends:
                    tag = "onnx" if backend == "onnxruntime" else backend
                    opts = {"device": "cpu", "precision": precision, "backend": backend}
                    plan += [(f"bare {tag} {precision}", "child_bare_onnx", (str(scene), str(folder), opts)),
                             (f"predict {tag} {precision}", "child_predict",
                              (str(scene), str(folder), str(tmp / f"out-{tag}-{precision}"), opts))]
        for rep in range(args.repeats):
            for name, fn, a in plan:
                r = _child(fn, *a)
                runs.setdefault(name, []).append(r)
                print(f"[{rep + 1}/{args.repeats}] {name}: {r['seconds']:.1f} s, {r['peak_memory_mb']:.0f} MB "
                      f"({r['precision']}, batch {r['batch_size']}, {r['chips']} chips)"
                      + (f" REFUSED: {r['refused']}" if r.get("refused") else "")
                      + (" [torch loaded]" if r.get("torch_loaded") else ""), flush=True)
            runs.setdefault("start-up (imports)", []).append(_startup())
            if not args.no_onnx:
                runs.setdefault("start-up torch-free", []).append(_startup(torch_free=True))
            if not args.no_cli:
                runs.setdefault("CLI with polygons", []).append(_cli(scene, bundle, tmp / "cli"))
        for n in args.memory_sizes:
            r = _child("child_predict", str(tmp / f"scene{n}.tif"), str(bundle), str(tmp / f"out{n}"),
                       {"device": "cpu"})
            runs[f"predict {n} x {n}"] = [r]
            print(f"{n} x {n}: {r['seconds']:.1f} s, {r['peak_memory_mb']:.0f} MB", flush=True)
        report(runs, args)


def report(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    med = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    mem = {k: max(r.get("peak_memory_mb", 0.0) for r in v) for k, v in runs.items()}
    first = runs["predict (defaults)"][0]
    print(f"\nmachine: {first['machine']}; scene {args.size} x {args.size} 3-band uint8, U-Net {args.encoder}, "
          f"{args.chip} px chips, {args.overlap} px overlap; medians of {args.repeats}")
    print(f"{'run':<24} {'wall s':>8} {'peak MB':>8}")
    for k in runs:
        print(f"{k:<24} {med[k]:>8.1f} {mem[k] or float('nan'):>8.0f}")
    ref = runs["predict fp32 batch 8"][0].get("classes")
    pairs = [("PyTorch " + runs["predict (defaults)"][0]["precision"] + " (defaults)", "predict (defaults)",
              "bare forward")]
    pairs += [(f"{name} {p} (no torch)", f"predict {tag} {p}", f"bare {tag} {p}")
              for tag, name in (("onnx", "ONNX Runtime"), ("openvino", "OpenVINO")) for p in ("fp32", "int8")
              if f"predict {tag} {p}" in runs]
    print(f"\n{'backend / precision':<32} {'wall s':>7} {'peak MB':>8} {'bare s':>7} {'efficiency':>10} "
          f"{'agree fp32 PyTorch':>18}")
    for label, run_key, bare_key in pairs:
        r0 = runs[run_key][0]
        agree = _agreement(r0["classes"], ref) if ref and r0.get("classes") else float("nan")
        eff = med[run_key] / med[bare_key] if med.get(bare_key) else float("nan")
        print(f"{label:<32} {med[run_key]:>7.1f} {mem[run_key]:>8.0f} {med[bare_key]:>7.1f} {eff:>10.3f} "
              f"{100 * agree:>17.2f}%" + ("  (refused)" if r0.get("refused") else ""))
    bare, default, before = med["bare forward"], med["predict (defaults)"], med["predict fp32 batch 8"]
    print(f"\npipeline efficiency (predict / bare forward, same chips, settings, threads): {default / bare:.3f}")
    print(f"speed-up of the defaults over fp32 batch 8: {before / default:.2f}x; "
          f"memory {mem['predict fp32 batch 8'] / mem['predict (defaults)']:.2f}x less")
    print(f"--backend onnxruntime against the defaults: {default / med['predict onnxruntime']:.2f}x; "
          f"memory {mem['predict onnxruntime'] / mem['predict (defaults)']:.2f}x")
    print(f"stage busy seconds (defaults, summed over threads): {first['stages']}")
    sized = [(args.size, mem["predict (defaults)"])] + [(n, mem[f"predict {n} x {n}"]) for n in args.memory_sizes]
    if len(sized) > 1:
        sized.sort()
        print(f"peak memory {sized[-1][0]} vs {sized[0][0]}: {sized[-1][1] / sized[0][1]:.2f}x "
              f"({sized[0][1]:.0f} -> {sized[-1][1]:.0f} MB)")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median_seconds": med, "peak_memory_mb": mem}, indent=1))


if __name__ == "__main__":
    main()
