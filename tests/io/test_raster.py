import numpy as np
import pytest
from rasterio.windows import Window

from geoseg.errors import InputError
from geoseg.io.profiles import classes_spec, cog_options
from geoseg.io.raster import SceneReader, inspect_scene
from geoseg.model.contract import ClassInfo
from tests.conftest import write_raster


def test_inspect_describes_mask_kinds(tmp_path, real_data):
    a = write_raster(tmp_path / "a.tif", np.ones((2, 5, 5), np.uint8), nodata=0)
    assert inspect_scene(a).mask == "nodata"
    b = write_raster(tmp_path / "b.tif", np.ones((2, 5, 5), np.float32))
    assert inspect_scene(b).mask == "none"
    info = inspect_scene(real_data / "spacenet_roads" / "road_mask_input.tif")
    assert info.crs.to_epsg() == 4326 and 0.2 < info.pixel_size_m < 0.4
    assert inspect_scene(real_data / "aerial_cog" / "cogeo.tif").overviews
    with pytest.raises(InputError, match="no such file"):
        inspect_scene(tmp_path / "missing.tif")
    (tmp_path / "junk.tif").write_text("not a raster")
    with pytest.raises(InputError, match="cannot be read as a raster"):
        inspect_scene(tmp_path / "junk.tif")


def test_reader_normalises_masks_and_pads(tmp_path):
    d = np.array([[[10, 0], [np.nan, 4]], [[20, 0], [6, 8]]], np.float32)
    p = write_raster(tmp_path / "s.tif", d, nodata=0)
    r = SceneReader(str(p), [2, 1], mean=[2.0, 4.0], std=[2.0, 2.0])
    data, valid = r.read(Window(0, 0, 2, 2), size=(4, 4))
    r.close()
    assert data.shape == (2, 4, 4) and valid.shape == (4, 4)
    # (0,1) is nodata in both bands: invalid; (1,0) has NaN in band 1 only: valid, that value -> 0
    np.testing.assert_array_equal(valid[:2, :2], [[True, False], [True, True]])
    assert data[0, 0, 0] == (20 - 2) / 2 and data[1, 0, 0] == (10 - 4) / 2
    assert data[1, 1, 0] == 0.0 and data[0, 1, 0] == (6 - 2) / 2
    assert not valid[2:].any() and not valid[:, 2:].any()


def test_class_spec_widens_to_uint16_and_cog_options(tmp_path):
    spec = classes_spec([ClassInfo(id=1, name="a"), ClassInfo(id=300, name="b")])
    assert spec.dtype == "uint16" and spec.nodata == 65535
    assert spec.colormap is not None and spec.colormap[300][:3] == ClassInfo(id=300, name="b").color
    opts = cog_options(spec, "zstd")
    assert opts["driver"] == "COG" and opts["COMPRESS"] == "ZSTD" and opts["OVERVIEW_RESAMPLING"] == "MODE"
    with pytest.raises(InputError, match="deflate"):
        cog_options(spec, "jpeg")
