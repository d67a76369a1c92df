"""Property-based: vectorize over class-raster dtypes, nodata values, transforms, band counts and block sizes
either equals one whole-raster polygonisation or raises a GeoSegError; never anything else."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.errors import GeoSegError
from geoseg.gis.vectorize import polygonize
from tests.gis.test_vectorize import assert_same_polygons, whole

DTYPES = ["uint8", "uint16", "int16", "int32", "uint32", "int8", "float32"]
TRANSFORMS = [
    Affine(2.0, 0, 500_000.0, 0, -2.0, 5_100_000.0),  # north-up metres
    Affine(0.0001, 0, 10.0, 0, -0.0001, 45.0),  # degrees
    Affine(2.0, 0, 500_000.0, 0, 2.0, 5_100_000.0),  # south-up
    Affine(1.0, 0.3, 500_000.0, 0.2, -1.0, 5_100_000.0),  # rotated
]


@st.composite
def rasters(draw):
    h, w = draw(st.integers(1, 48)), draw(st.integers(1, 48))
    dtype = draw(st.sampled_from(DTYPES))
    n_classes = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    nodata = draw(st.sampled_from([None, 0, "max"]))
    transform = draw(st.sampled_from(TRANSFORMS))
    crs = draw(st.sampled_from(["EPSG:32633", "EPSG:4326", None]))
    count = draw(st.sampled_from([1, 1, 1, 2]))
    block = draw(st.sampled_from([4, 7, 16, 64]))
    connectivity = draw(st.sampled_from([4, 8]))
    return h, w, dtype, n_classes, seed, nodata, transform, crs, count, block, connectivity


@settings(max_examples=60, deadline=None)
@given(rasters())
def test_vectorize_equals_whole_raster_or_refuses(case):
    h, w, dtype, n_classes, seed, nodata, transform, crs, count, block, connectivity = case
    rng = np.random.default_rng(seed)
    data = rng.integers(0, n_classes + 1, (h, w))
    if nodata == "max":
        nodata = int(np.iinfo(dtype).max) if dtype != "float32" else float("nan")
    arr = data.astype(dtype)
    if isinstance(nodata, float):
        arr[data == 0] = np.nan
    # refused: not a class map (float, several bands), or a grid in metres labelled with a geographic CRS
    refuse = dtype == "float32" or count > 1 or (crs == "EPSG:4326" and transform != TRANSFORMS[1])
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "classes.tif"
        with rasterio.open(src, "w", driver="GTiff", width=w, height=h, count=count, dtype=dtype, nodata=nodata,
                           crs=crs, transform=transform) as ds:
            for b in range(count):
                ds.write(arr, b + 1)
        try:
            gdf = polygonize(src, block_size=block, connectivity=connectivity, workers=1)
        except GeoSegError as exc:
            assert str(exc).strip() and "\n" not in str(exc).strip()
            assert refuse, f"refused a valid class raster: {exc}"
            return
    assert not refuse, "a float or multi-band raster, or metres labelled as degrees, must be refused"
    mask = None if nodata is None else arr != np.asarray(nodata).astype(dtype)
    codes = np.unique(arr, return_inverse=True)[1].reshape(arr.shape).astype(np.int32)
    ref = whole(codes, connectivity=connectivity, mask=mask, transform=transform)
    ids = np.unique(arr)
    ref = [(g, int(ids[v])) for g, v in ref]
    assert_same_polygons(gdf, ref)
