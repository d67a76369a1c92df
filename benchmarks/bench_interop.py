"""The three weight formats side by side: a trained bundle, its ONNX export and its TorchScript export each
predict the whole scene (the tiled engine, through :func:`geoseg.learn.evaluate.evaluate`, fp32, CPU), and the
script prints each one's mean IoU against the labels, seconds, and the share of valid pixels whose class is
the same as the safetensors (PyTorch) bundle's. Aim (issue 12): at least 99.99 % agreement.

The default cases are the models the repository's own commands train:

    geoseg demo --output-dir demo/                                   # the demo's U-Net and scene
    python examples/spacenet_buildings.py --output-dir runs/spacenet # the SpaceNet buildings U-Net
    python benchmarks/bench_interop.py
    python benchmarks/bench_interop.py --case MODEL IMAGE LABELS     # any trained bundle (raster labels)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_precision import chosen_cases

FORMATS = ("safetensors", "onnx", "torchscript")


def run_case(case: dict[str, Any], tmp: Path) -> dict[str, Any]:
    import rasterio

    from geoseg.learn.evaluate import evaluate
    from geoseg.model.export import export

    models = {"safetensors": Path(case["model"])}
    for fmt in FORMATS[1:]:
        models[fmt] = export(case["model"], fmt, tmp / f"{case['name'][:8]}-{fmt}", overwrite=True).folder
    out: dict[str, Any] = {}
    maps = {}
    for fmt, model in models.items():
        t0 = time.perf_counter()
        ev = evaluate(model, case["image"], case["labels"], label_value=case["label_value"],
                      output_dir=tmp / f"{case['name'][:8]}-{fmt}-eval", precision="fp32", device="cpu",
                      keep_prediction=True, overwrite=True)
        out[fmt] = {"miou": ev.metrics["miou"], "seconds": time.perf_counter() - t0}
        assert ev.prediction_path is not None
        with rasterio.open(ev.prediction_path) as ds:
            maps[fmt] = (ds.read(1), ds.nodata)
    ref, nodata = maps["safetensors"]
    valid = ref != nodata
    for fmt in FORMATS:
        got = maps[fmt][0]
        out[fmt]["agreement"] = float((got[valid] == ref[valid]).mean())
        out[fmt]["pixels_differing"] = int((got[valid] != ref[valid]).sum())
    out["pixels"] = int(valid.sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs=3, action="append", metavar=("MODEL", "IMAGE", "LABELS"), default=None)
    args = ap.parse_args()
    import onnxruntime
    import torch

    from geoseg.predict.hardware import cpu_features

    cases = chosen_cases(args.case)
    print(f"CPU: {cpu_features().describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"onnxruntime {onnxruntime.__version__}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="geoseg-interop-") as d:
        for case in cases:
            rows.append((case["name"], run_case(case, Path(d))))
            print(f"{case['name']}: done", flush=True)
    print(f"\n{'case':<36} {'format':<12} {'mIoU':>7} {'agreement':>10} {'differ':>7} {'seconds':>8} {'vs torch':>8}")
    for name, r in rows:
        base = r["safetensors"]["seconds"]
        for fmt in FORMATS:
            f = r[fmt]
            print(f"{name if fmt == 'safetensors' else '':<36} {fmt:<12} {f['miou']:>7.4f} "
                  f"{100 * f['agreement']:>9.4f}% {f['pixels_differing']:>7} {f['seconds']:>8.1f} "
                  f"{f['seconds'] / base:>8.2f}")
        print(f"{'':<36} ({r['pixels']} valid pixels)")
    print("aim: agreement >= 99.99 % for every format")


if __name__ == "__main__":
    main()
