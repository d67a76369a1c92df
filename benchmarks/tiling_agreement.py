"""How much does the class map depend on the tiling? Agreement between tile sizes, side by side.

Predicts each scene with the same model at two tile sizes (default 256 and 512, each with a quarter of
the tile as overlap) and prints the fraction of valid pixels whose class is the same in both maps, plus
the agreement of a naive tiling (no overlap, no blending) with the 512 map, for scale.

    geoseg demo --output-dir demo/                       # makes demo/model
    python benchmarks/tiling_agreement.py --model demo/model
    python benchmarks/tiling_agreement.py --model demo/model --scenes my.tif --tiles 256 1024
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import rasterio

from geoseg.predict.api import predict_scene

REAL = Path(os.environ.get("GEOSEG_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DEFAULT_SCENES = [REAL / "aerial_cog" / "cogeo.tif", REAL / "landsat_rgb" / "RGB.byte.tif", REAL / "rgbn" / "rgbn.tif"]


def _classes(path: Path) -> np.ma.MaskedArray:
    with rasterio.open(path) as ds:
        return ds.read(1, masked=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--scenes", nargs="+", type=Path, default=None)
    ap.add_argument("--tiles", nargs=2, type=int, default=[256, 512])
    args = ap.parse_args()
    scenes = args.scenes or [s for s in DEFAULT_SCENES if s.exists()]
    if not scenes:
        raise SystemExit(f"no scenes: give --scenes or set GEOSEG_REAL_DATA (looked in {REAL})")
    a, b = args.tiles
    print(f"{'scene':<28} {'pixels':>9} {f'agree {a} vs {b}':>16} {f'naive {b} vs blended {b}':>24}")
    with tempfile.TemporaryDirectory() as d:
        for scene in scenes:
            maps = {}
            for name, kw in ((f"t{a}", dict(tile_size=a, overlap=a // 4)), (f"t{b}", dict(tile_size=b, overlap=b // 4)),
                             ("naive", dict(tile_size=b, overlap=0, blend="uniform"))):
                r = predict_scene(scene, args.model, Path(d) / name / scene.stem, bands=None, vector_format=None, **kw)
                maps[name] = _classes(r.classes_path)
            valid = ~np.ma.getmaskarray(maps[f"t{a}"])
            agree = float((maps[f"t{a}"].data == maps[f"t{b}"].data)[valid].mean())
            naive = float((maps["naive"].data == maps[f"t{b}"].data)[valid].mean())
            print(f"{scene.name:<28} {int(valid.sum()):>9} {agree:>16.4%} {naive:>24.4%}")


if __name__ == "__main__":
    main()
