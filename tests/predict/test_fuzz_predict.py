"""Property-based: predict with a small model either writes outputs on the input's exact grid, with nodata
exactly where every model band is masked, or raises a GeoSegError; never anything else."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin

from geoseg.errors import GeoSegError
from geoseg.predict.api import predict_scene
from tests.conftest import make_bundle

DTYPES = ["uint8", "uint16", "int16", "float32", "float64"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("fuzz") / "m", n_bands=3, chip=32, overlap=8)


@st.composite
def scenes(draw):
    h = draw(st.integers(1, 90))
    w = draw(st.integers(1, 90))
    count = draw(st.sampled_from([3, 4]))
    dtype = draw(st.sampled_from(DTYPES))
    nodata = draw(st.sampled_from([None, 0]))
    seed = draw(st.integers(0, 2**16))
    masked_share = draw(st.sampled_from([0.0, 0.3, 1.0]))
    nan = dtype.startswith("float") and draw(st.booleans())
    tile = draw(st.sampled_from([None, 16, 32, 48]))
    overlap = draw(st.sampled_from([None, 0, 4, 8, 20]))
    return h, w, count, dtype, nodata, seed, masked_share, nan, tile, overlap


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenes())
def test_predict_succeeds_on_the_exact_grid_or_raises_a_geoseg_error(model, case):
    h, w, count, dtype, nodata, seed, masked_share, nan, tile, overlap = case
    rng = np.random.default_rng(seed)
    data = (rng.random((count, h, w)) * 200 + 1).astype(dtype)
    masked = rng.random((h, w)) < masked_share
    if nodata is not None:
        data[:, masked] = nodata
    if nan:
        data[0, rng.random((h, w)) < 0.2] = np.nan  # one band only: the pixel stays valid through the others
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.tif"
        transform = from_origin(500000.0, 5100000.0, 2.0, 2.0)
        with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=count, dtype=dtype,
                           crs="EPSG:32633", transform=transform, nodata=nodata) as ds:
            ds.write(data)
        try:
            r = predict_scene(path, model, Path(d) / "o", device="cpu", tile_size=tile, overlap=overlap,
                              bands=[1, 2, 3], vector_format=None)
        except GeoSegError:
            return
        with rasterio.open(r.classes_path) as out:
            assert (out.crs, out.transform, out.width, out.height) == (rasterio.crs.CRS.from_epsg(32633),
                                                                       transform, w, h)
            classes = out.read(1)
            invalid = masked if nodata is not None else np.zeros((h, w), bool)
            assert ((classes == out.nodata) == invalid).all()
