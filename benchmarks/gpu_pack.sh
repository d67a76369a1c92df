#!/usr/bin/env bash
# Pack what benchmarks/gpu_check.sh needs on a GPU machine that has PyTorch but not geoseg's other
# dependencies, into one folder (under 64 MiB): geoseg, the tests it runs, these scripts, the Python 3.12
# manylinux wheels of what such a machine lacks (rasterio, pyproj, pydantic, smp, dask...), and two trained
# bundles with their scenes.
#
#   bash benchmarks/gpu_pack.sh DEST DEMO_DIR SPACENET_MODEL
#
# DEMO_DIR is the output of `geoseg demo -o DEMO_DIR` (its model and a 1024 x 1024 crop of its scene are
# taken); SPACENET_MODEL the bundle of `python examples/spacenet_buildings.py -o RUN` (RUN/model), whose scene
# is $GEOSEG_REAL_DATA/spacenet_buildings/sample_geotiff.tif. Wheels already in DEST/whl are kept.
set -eu -o pipefail
DEST=$1; DEMO=$2; SPACENET=$3
SRC=$(cd "$(dirname "$0")/.." && pwd)
DATA=${GEOSEG_REAL_DATA:-$SRC/../shared/data}
PY=${PY:-python3}
mkdir -p "$DEST/benchmarks" "$DEST/tests/predict" "$DEST/data" "$DEST/whl"
rm -rf "$DEST/geoseg"
cp -r "$SRC/geoseg" "$DEST/geoseg"
cp "$SRC/pyproject.toml" "$DEST/"
cp "$SRC/benchmarks/bench_gpu.py" "$SRC/benchmarks/gpu_check.sh" "$DEST/benchmarks/"
cp "$SRC"/tests/{__init__,conftest}.py "$DEST/tests/"
cp "$SRC"/tests/predict/{__init__,test_predict,test_backends,test_hardware,test_inference,test_numerics}.py "$DEST/tests/predict/"

# what the GPU machine's image lacks, as its Python (3.12) takes them; versions as on the development machine
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms="$platforms --platform $p"
done
if ! ls "$DEST"/whl/rasterio-*.whl >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
        --platform any -d "$DEST/whl" rasterio==1.4.4 pyproj==3.7.2 pydantic==2.13.4 pydantic-core==2.46.4 \
        annotated-types typing-inspection segmentation-models-pytorch==0.6.0 dask==2026.8.0 \
        distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 tornado==6.6.1 zict==3.0.0 affine==3.0.1 \
        cligj==0.7.2 click-plugins==1.1.1.2
fi

rm -rf "$DEST/data/demo-model" "$DEST/data/spacenet-model"
cp -r "$DEMO/model" "$DEST/data/demo-model"
cp -r "$SPACENET" "$DEST/data/spacenet-model"
cp "$DATA/spacenet_buildings/sample_geotiff.tif" "$DEST/data/"
$PY - "$DEMO/scene.tif" "$DEST/data/demo_scene_1024.tif" <<'EOF'
import sys
import rasterio
from rasterio.windows import Window
with rasterio.open(sys.argv[1]) as ds:
    w = Window(0, 0, min(1024, ds.width), min(1024, ds.height))
    profile = dict(ds.profile, width=int(w.width), height=int(w.height), transform=ds.window_transform(w),
                   compress="zstd", zstd_level=19, predictor=2, tiled=True, blockxsize=256, blockysize=256)
    data = ds.read(window=w)
with rasterio.open(sys.argv[2], "w", **profile) as dst:
    dst.write(data)
EOF
find "$DEST" -name __pycache__ -prune -exec rm -rf {} +
du -sh "$DEST"
