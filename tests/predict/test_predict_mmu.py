"""``geoseg predict --mmu``: the published class map (and all made from it) is GDAL's sieve of the whole
predicted map, whatever the units of work."""

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.features
from rasterio.transform import from_origin
from scipy import ndimage

from geoseg.gis.vectorize import vectorize_raster
from geoseg.predict import predict_scene
from tests.conftest import make_bundle, write_raster


@pytest.fixture(scope="module")
def identity3(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "id3", n_bands=3, chip=64, overlap=16)


def _scene(path: Path) -> Path:
    """Three bands whose argmax (the identity model's class) is a blobby map with salt and a nodata corner."""
    rng = np.random.default_rng(11)
    field = ndimage.gaussian_filter(rng.normal(size=(700, 600)), 4)
    cls = np.digitize(field, np.quantile(field, [0.33, 0.66]))
    salt = rng.random(cls.shape) < 0.04
    cls[salt] = rng.integers(0, 3, int(salt.sum()))
    data = (np.eye(3)[cls].transpose(2, 0, 1) * 100 + 10).astype(np.uint8)
    data[:, :80, :90] = 0
    return write_raster(path, data, nodata=0, transform=from_origin(500_000.0, 5_100_000.0, 10.0, 10.0))


@pytest.mark.parametrize("connectivity", [4, 8])
def test_predict_mmu_equals_predict_then_gdal_sieve(tmp_path: Path, identity3: Path, connectivity: int) -> None:
    scene = _scene(tmp_path / "s.tif")
    plain = predict_scene(scene, identity3, tmp_path / "plain", vector_format=None, quicklook=False)
    with rasterio.open(plain.classes_path) as ds:
        raw, valid = ds.read(1), ds.read_masks(1) > 0
    expected = rasterio.features.sieve(raw, 30, mask=valid, connectivity=connectivity)
    assert (expected != raw).sum() > 1000  # the sieve does change this map
    ref_vec = vectorize_raster(write_raster(tmp_path / "ref.tif", expected, nodata=255,
                                            transform=from_origin(500_000.0, 5_100_000.0, 10.0, 10.0)),
                               tmp_path / "ref.gpkg", connectivity=connectivity, skip_classes=())
    for i, kw in enumerate([{}, dict(panel_width=512, unit_rows=512, workers=2)]):
        r = predict_scene(scene, identity3, tmp_path / f"mmu{i}", mmu="0.3ha", connectivity=connectivity, **kw)
        with rasterio.open(r.classes_path) as ds:
            np.testing.assert_array_equal(ds.read(1), expected)
            assert ds.colormap(1) and ds.tags().get("CLASSES") and ds.nodata == 255
        assert len(gpd.read_file(r.vector_path)) == ref_vec.features
        assert not list((tmp_path / f"mmu{i}").glob("**/*.sieved.tif"))
