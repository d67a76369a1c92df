"""Polygons' ``confidence_mean``: the mean confidence of each polygon's pixels, the same whether its pieces were
polygonised in one block or joined across many seams (sums and counts add up, means are taken once)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio.features
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage

from geoseg.errors import InputError
from geoseg.gis.vectorize import polygonize, vectorize_raster
from tests.gis.test_vectorize import TRANSFORM, blobs


def _confidence(shape: tuple[int, int], seed: int = 1) -> np.ndarray:
    conf = np.random.default_rng(seed).integers(60, 255, size=shape).astype(np.uint8)
    conf[::17, ::13] = 255  # pixels without a confidence inside the map: left out of the means
    return conf


def _whole_means(gdf, conf: np.ndarray) -> np.ndarray:
    """The oracle: the polygons burnt into one image of the whole raster, the confidence averaged per polygon."""
    ids = rasterio.features.rasterize(zip(gdf.geometry, range(1, len(gdf) + 1), strict=True), out_shape=conf.shape,
                                      transform=TRANSFORM, dtype="int32")
    ok = (ids > 0) & (conf != 255)
    sums = np.bincount(ids[ok], weights=conf[ok], minlength=len(gdf) + 1)[1:]
    counts = np.bincount(ids[ok], minlength=len(gdf) + 1)[1:]
    with np.errstate(invalid="ignore"):
        return sums / counts / 254


@pytest.mark.parametrize("connectivity", [4, 8])
def test_means_across_seams_equal_the_whole_raster(make_raster: Callable[..., Path], connectivity: int) -> None:
    data = blobs((300, 260))
    data[:7, :9] = 255  # a nodata corner
    conf = _confidence(data.shape)
    conf[data == 255] = 255
    src, cpath = make_raster(data, nodata=255), make_raster(conf, name="c.tif", nodata=255)
    gdf = polygonize(src, block_size=64, connectivity=connectivity, workers=2, confidence=cpath)
    assert "confidence_mean" in gdf.columns and len(gdf) > 20
    np.testing.assert_allclose(gdf["confidence_mean"].to_numpy(), _whole_means(gdf, conf), rtol=1e-12)
    # one block: the same polygons, the same means
    one = polygonize(src, block_size=4096, connectivity=connectivity, confidence=cpath)
    key = ["class_id", "area_m2", "x", "y"]
    a, b = (f.assign(x=f.geometry.centroid.x, y=f.geometry.centroid.y).sort_values(key).reset_index(drop=True)
            for f in (gdf, one))
    np.testing.assert_array_equal(a["confidence_mean"].to_numpy(), b["confidence_mean"].to_numpy())
    # without a confidence map there is no such column
    assert "confidence_mean" not in polygonize(src, block_size=64).columns


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40)), elements=st.integers(0, 3)),
    block=st.sampled_from([4, 5, 8, 16]),
    connectivity=st.sampled_from([4, 8]),
    smooth=st.booleans(),
)
def test_random_rasters_means_equal_whole(make_raster: Callable[..., Path], data: np.ndarray, block: int,
                                         connectivity: int, smooth: bool) -> None:
    if smooth:  # bigger regions that cross several seams
        data = (ndimage.uniform_filter(data.astype(float), 3) > 1.5).astype(np.uint8) + (data == 3)
    conf = _confidence(data.shape, seed=int(data.sum()))
    src, cpath = make_raster(data, nodata=3), make_raster(conf, name="c.tif", nodata=255)
    gdf = polygonize(src, block_size=block, connectivity=connectivity, workers=2, confidence=cpath)
    np.testing.assert_allclose(gdf["confidence_mean"].to_numpy(), _whole_means(gdf, conf), rtol=1e-12)


def test_simplify_min_area_and_formats_keep_the_means(make_raster: Callable[..., Path], tmp_path: Path) -> None:
    data = blobs((200, 200), seed=4)
    conf = _confidence(data.shape, seed=5)
    src, cpath = make_raster(data), make_raster(conf, name="c.tif", nodata=255)
    plain = polygonize(src, block_size=64, confidence=cpath)
    simple = polygonize(src, block_size=64, confidence=cpath, simplify="1px")
    assert sorted(simple["confidence_mean"]) == sorted(plain["confidence_mean"])  # the pixels', not the shapes'
    big = polygonize(src, block_size=64, confidence=cpath, min_area="30px")
    kept = plain[plain.geometry.area / 4 >= 30]  # 2 m pixels
    assert sorted(big["confidence_mean"]) == sorted(kept["confidence_mean"])
    for name, column in (("p.gpkg", "confidence_mean"), ("p.parquet", "confidence_mean"), ("p.shp", "conf_mean")):
        vectorize_raster(src, tmp_path / name, block_size=64, confidence=cpath)
        got = pyogrio.read_dataframe(tmp_path / name) if not name.endswith("parquet") else \
            __import__("geopandas").read_parquet(tmp_path / name)
        assert sorted(got[column]) == pytest.approx(sorted(plain["confidence_mean"])), name


def test_a_confidence_map_on_another_grid_is_refused(make_raster: Callable[..., Path]) -> None:
    src = make_raster(blobs((64, 64)))
    other = make_raster(_confidence((64, 65)), name="c.tif", nodata=255)
    with pytest.raises(InputError, match="not that of"):
        polygonize(src, confidence=other)
    floats = make_raster(np.zeros((64, 64), np.float32), name="f.tif")
    with pytest.raises(InputError, match="uint8"):
        polygonize(src, confidence=floats)


def test_cli_vectorize_takes_a_confidence_map(make_raster: Callable[..., Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from geoseg.cli import main

    data = blobs((100, 120), seed=2)
    src, cpath = make_raster(data), make_raster(_confidence(data.shape), name="c.tif", nodata=255)
    res = CliRunner().invoke(main, ["-q", "vectorize", str(src), str(tmp_path / "p.gpkg"), "--confidence", str(cpath)])
    assert res.exit_code == 0, res.output
    got = pyogrio.read_dataframe(tmp_path / "p.gpkg")
    np.testing.assert_allclose(got["confidence_mean"].to_numpy(), _whole_means(got, _confidence(data.shape)),
                               rtol=1e-12)
