"""int8 against fp32 on a trained bundle: class agreement, IoU against the truth, speed and memory.

The bundle (safetensors, what ``geoseg train`` or ``geoseg demo`` write) is exported to ONNX twice, fp32 and
``--int8`` (calibrated on the bundle's ``calibration.npz``, else on ``--calibration``, default the scene),
then the scene is predicted four ways, each in its own process: PyTorch fp32 (the reference), PyTorch at
``--precision auto``, ONNX fp32 and ONNX int8 (both through the torch-free path). For each: wall seconds,
peak memory, whether torch was loaded, the share of pixels with the reference's class, and, with
``--labels`` (a class-id raster on the scene's grid), per-class IoU and mean IoU against it.

``--scene`` takes several scenes (and ``--labels`` as many rasters, in the same order): they are predicted as
one job, and agreement and IoU are counted over all their pixels together (the Amazon case's held-out tiles).

    python benchmarks/bench_int8.py --model demo/model --scene demo/scene.tif --labels demo/labels.tif
    python benchmarks/bench_int8.py --model RUN/model --scene T1.tif T2.tif --labels T1.labels.tif T2.labels.tif
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def peak_memory_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent across exec,
    and the parent here holds torch)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_predict(scenes: list[str], bundle: str, out: str, options: dict[str, Any]) -> dict[str, Any]:
    import time

    from geoseg.errors import InputError
    from geoseg.predict.api import predict_scenes

    t0 = time.perf_counter()
    try:
        run = predict_scenes(scenes, bundle, out, overwrite=True, vector_format=None, device="cpu", **options)
    except InputError as exc:
        return {"refused": str(exc), "seconds": float("nan"), "peak_memory_mb": peak_memory_mb()}
    return {"seconds": time.perf_counter() - t0, "peak_memory_mb": peak_memory_mb(),
            "classes": [str(s.classes_path) for s in run.scenes], "precision": run.options.precision,
            "torch_loaded": "torch" in sys.modules}


def _child(fn: str, *args: Any) -> dict[str, Any]:
    code = (f"import sys, json; sys.path[:0] = [{str(HERE)!r}, {str(HERE.parent)!r}]; import bench_int8 as b; "
            f"r = b.{fn}(*json.loads(sys.argv[1])); print('RESULT ' + json.dumps(r))")
    res = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], check=True, capture_output=True,
                         text=True)
    line = next(ln for ln in res.stdout.splitlines()[::-1] if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _ious(pred: Any, truth: Any, ids: list[int]) -> dict[int, float]:
    import numpy as np

    valid = np.isin(truth, ids)
    out = {}
    for k in ids:
        p, t = (pred == k) & valid, (truth == k) & valid
        union = int((p | t).sum())
        if union:
            out[k] = float((p & t).sum() / union)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--scene", type=Path, nargs="+", required=True, help="one or more scenes, one job")
    ap.add_argument("--labels", type=Path, nargs="+", default=None,
                    help="truth class ids on each scene's grid, in --scene's order")
    ap.add_argument("--calibration", type=Path, default=None, help="scene for calibration [default: the bundle's "
                    "calibration.npz, else --scene]")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    if args.labels and len(args.labels) != len(args.scene):
        ap.error(f"--labels: {len(args.labels)} rasters for {len(args.scene)} scenes; give one per scene")
    import numpy as np
    import rasterio

    from geoseg.model.bundle import read_bundle
    from geoseg.model.export import export
    from geoseg.model.quantize import bundle_calibration

    with tempfile.TemporaryDirectory(prefix="geoseg-int8-") as d:
        tmp = args.workdir or Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        b = read_bundle(args.model)
        cal = None if bundle_calibration(b) is not None else (args.calibration or args.scene[0])
        onnx32 = tmp / "onnx-fp32"
        onnx8 = tmp / "onnx-int8"
        if not onnx32.exists():
            export(b, "onnx", onnx32)
        if not onnx8.exists():
            export(b, "onnx", onnx8, int8=True, calibration=cal)
        meta8 = read_bundle(onnx8).contract.metadata["export"]["int8"]
        plan = [("PyTorch fp32", str(args.model), {"precision": "fp32"}),
                ("PyTorch auto", str(args.model), {}),
                ("ONNX fp32 (no torch)", str(onnx32), {"precision": "fp32"}),
                ("ONNX int8 (no torch)", str(onnx8), {"precision": "int8"})]
        runs = {}
        for i, (name, bundle, opts) in enumerate(plan):
            runs[name] = r = _child("child_predict", [str(s) for s in args.scene], bundle, str(tmp / f"out{i}"),
                                    opts)
            print(f"{name}: {r['seconds']:.1f} s, {r['peak_memory_mb']:.0f} MB"
                  + (f" REFUSED {r['refused']}" if r.get("refused") else ""), flush=True)
        def read_all(paths: list[Any]) -> Any:  # the scenes' pixels, one after another
            parts = []
            for path in paths:
                with rasterio.open(path) as ds:
                    parts.append(ds.read(1).ravel())
            return np.concatenate(parts)

        ref = read_all(runs["PyTorch fp32"]["classes"])
        truth = read_all(args.labels) if args.labels else None
        ids = [c.id for c in b.contract.classes]
        print(f"\nmodel {args.model} ({b.contract.model.architecture} {b.contract.model.encoder}), scene(s) {', '.join(str(s) for s in args.scene)}; "
              f"int8 calibrated on {meta8['calibration_chips']} chips of {meta8['calibration']}, agreement there "
              f"{100 * meta8['agreement']:.2f} %, float32 kept: {meta8.get('float32', 'stem')}")
        print(f"{'run':<24} {'wall s':>7} {'peak MB':>8} {'torch':>6} {'agree fp32':>10} {'mean IoU':>9}")
        base_iou = None
        for name, r in runs.items():
            if r.get("refused"):
                print(f"{name:<24} refused: {r['refused']}")
                continue
            got = read_all(r["classes"])
            agree = float((got == ref).mean())
            miou = float("nan")
            if truth is not None:
                ious = _ious(got, truth, ids)
                miou = float(np.mean(list(ious.values())))
                base_iou = miou if base_iou is None else base_iou
            print(f"{name:<24} {r['seconds']:>7.1f} {r['peak_memory_mb']:>8.0f} {str(r['torch_loaded']):>6} "
                  f"{100 * agree:>9.2f}% {miou:>9.4f}")
        if args.workdir:
            (tmp / "int8.json").write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
