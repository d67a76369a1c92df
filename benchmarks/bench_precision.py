"""bf16 against fp32 on trained models: class agreement and mean IoU against the labels, side by side.

Each case is a trained bundle, its scene and its labels. The scene is predicted whole (the tiled predict
engine, through :func:`geoseg.learn.evaluate.evaluate`) once per precision on the CPU; the script prints each
precision's mean IoU against the labels and seconds, the share of valid pixels whose class is the same in
both maps, and what ``--precision auto`` picks on this CPU (bf16 only with AMX, see ``geoseg/hardware.py``).
Aims (issue 8): mean IoU within 0.002 of fp32's, agreement at least 99.5 %.

The default cases are the models the repository's own commands train:

    geoseg demo --output-dir demo/                                   # the demo's U-Net and scene
    python examples/spacenet_buildings.py --output-dir runs/spacenet # the SpaceNet buildings U-Net
    python benchmarks/bench_precision.py
    python benchmarks/bench_precision.py --case MODEL IMAGE LABELS   # any trained bundle (raster labels)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("GEOSEG_REAL_DATA", ROOT.parent / "shared" / "data"))


def chosen_cases(case_args: list[list[str]] | None) -> list[dict[str, Any]]:
    """The ``--case MODEL IMAGE LABELS`` triples given, else the trained models found; exits when none."""
    cases = ([{"name": Path(m).name, "model": m, "image": i, "labels": lab, "label_value": None}
              for m, i, lab in case_args] if case_args else default_cases())
    if not cases:
        raise SystemExit("no trained model found: run `geoseg demo --output-dir demo/` and/or "
                         "`python examples/spacenet_buildings.py --output-dir runs/spacenet`, or pass --case")
    return cases


def default_cases() -> list[dict[str, Any]]:
    cases = []
    demo = ROOT / "demo"
    if (demo / "model").exists():
        cases.append({"name": "demo U-Net, demo scene", "model": demo / "model", "image": demo / "scene.tif",
                      "labels": demo / "scene_truth.tif", "label_value": None})
    spacenet = ROOT / "runs" / "spacenet" / "model"
    if spacenet.exists():
        d = DATA / "spacenet_buildings"
        cases.append({"name": "SpaceNet buildings U-Net, Atlanta", "model": spacenet,
                      "image": d / "sample_geotiff.tif", "labels": d / "geotiff_labels.geojson", "label_value": 1})
    return cases


def run_case(case: dict[str, Any], tmp: Path) -> dict[str, Any]:
    import rasterio

    from geoseg.learn.evaluate import evaluate

    out: dict[str, Any] = {}
    maps = {}
    for precision in ("fp32", "bf16"):
        t0 = time.perf_counter()
        ev = evaluate(case["model"], case["image"], case["labels"], label_value=case["label_value"],
                      output_dir=tmp / f"{case['name'][:8]}-{precision}", precision=precision, device="cpu",
                      keep_prediction=True, overwrite=True)
        out[precision] = {"miou": ev.metrics["miou"], "seconds": time.perf_counter() - t0}
        assert ev.prediction_path is not None
        with rasterio.open(ev.prediction_path) as ds:
            maps[precision] = (ds.read(1), ds.nodata)
    (a, nodata), (b, _) = maps["fp32"], maps["bf16"]
    valid = a != nodata
    out["agreement"] = float((a[valid] == b[valid]).mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs=3, action="append", metavar=("MODEL", "IMAGE", "LABELS"), default=None)
    args = ap.parse_args()
    import torch

    from geoseg.predict.hardware import cpu_features, resolve_precision

    cases = chosen_cases(args.case)
    cpu = cpu_features()
    print(f"CPU: {cpu.describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"--precision auto picks {resolve_precision('auto', 'cpu')} here")
    rows = []
    with tempfile.TemporaryDirectory(prefix="geoseg-precision-") as d:
        for case in cases:
            r = run_case(case, Path(d))
            rows.append((case["name"], r))
            print(f"{case['name']}: done", flush=True)
    print(f"\n{'case':<36} {'fp32 mIoU':>9} {'bf16 mIoU':>9} {'delta':>8} {'agreement':>9} {'fp32 s':>7} "
          f"{'bf16 s':>7} {'bf16/fp32':>9}")
    for name, r in rows:
        f, b = r["fp32"], r["bf16"]
        print(f"{name:<36} {f['miou']:>9.4f} {b['miou']:>9.4f} {b['miou'] - f['miou']:>+8.4f} "
              f"{100 * r['agreement']:>8.3f}% {f['seconds']:>7.1f} {b['seconds']:>7.1f} "
              f"{b['seconds'] / f['seconds']:>9.2f}")
    print("aims: |delta| <= 0.002 and agreement >= 99.5 %")


if __name__ == "__main__":
    main()
