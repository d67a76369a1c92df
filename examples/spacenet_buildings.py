"""Train and evaluate a building U-Net on the real SpaceNet sample (Atlanta, 0.5 m panchromatic).

Reproduces the run reported in the notes: about 3-5 minutes on 2 CPU cores.

    python examples/spacenet_buildings.py --output-dir runs/spacenet

Data: ``$GEOSEG_REAL_DATA/spacenet_buildings`` (default ``../shared/data``): a 900x900 uint16 image and
43 building polygons. The image is cut into 256 px split blocks; a quarter of them (chosen with the
seed) validate and never feed training. The script trains with ``configs/buildings-unet.yaml``, then
evaluates the bundle on the whole scene through the tiled predict engine, scoring only the validation
blocks (``split/*_val.geojson``) and, for reference, the whole scene.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from geoseg.console.progress import EpochBars
from geoseg.learn.config import load_config
from geoseg.learn.evaluate import evaluate
from geoseg.learn.train import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="runs/spacenet")
    ap.add_argument("--config", default=str(ROOT / "configs" / "buildings-unet.yaml"))
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    data = Path(os.environ.get("GEOSEG_REAL_DATA", ROOT.parent / "shared" / "data")) / "spacenet_buildings"
    image, labels = data / "sample_geotiff.tif", data / "geotiff_labels.geojson"
    if not image.exists():
        print(f"{image} not found; set GEOSEG_REAL_DATA", file=sys.stderr)
        return 1
    cfg = load_config(args.config)
    cfg.data.scenes[0].image, cfg.data.scenes[0].labels = str(image), str(labels)
    if args.epochs:
        cfg.epochs = args.epochs
    out = Path(args.output_dir)

    bars = EpochBars(quiet=False)  # the training command's own bars
    try:
        result = train(cfg, out, resume=args.resume, overwrite=not args.resume, progress=bars)
    finally:
        bars.close()
    print(f"best epoch {result.best_epoch}: validation chips mIoU {result.metrics.get('miou'):.4f}")

    val_area = next((out / "split").glob("*_val.geojson"))
    ev = evaluate(result.bundle_path, image, labels, label_value=1, within=val_area,
                  output_dir=out / "evaluation", overwrite=True, keep_prediction=True)
    full = evaluate(result.bundle_path, image, labels, label_value=1, output_dir=out / "evaluation-full",
                    overwrite=True)
    building = next(c for c in ev.metrics["classes"] if c["name"] == "building")
    print(f"validation blocks, whole-scene tiled prediction: building IoU {building['iou']:.4f}, "
          f"mean IoU {ev.metrics['miou']:.4f}, accuracy {ev.metrics['accuracy']:.4f}")
    full_b = next(c for c in full.metrics["classes"] if c["name"] == "building")
    print(f"whole scene (mostly training pixels): building IoU {full_b['iou']:.4f}, mean IoU {full.metrics['miou']:.4f}")
    print(f"reports: {ev.markdown_path}, {full.markdown_path}; bundle: {result.bundle_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
