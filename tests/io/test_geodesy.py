"""Areas are ground areas on every CRS: Web Mercator's square units are not square metres away from the
equator, so areas, --min-area and pixel sizes are measured on the ellipsoid there."""

from __future__ import annotations

import numpy as np
import pyproj
import pytest
import shapely
from rasterio.transform import from_origin

from geoseg.gis.vectorize import vectorize_raster
from geoseg.io.geodesy import areal_scale, distorts
from geoseg.io.raster import inspect_scene
from tests.conftest import write_raster


def _mercator_scene(tmp_path, size=200):
    # 0.597 m Web Mercator pixels (zoom 18) at 37.7 N, 122.4 W (San Francisco)
    x, y = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True).transform(-122.4, 37.7)
    data = np.zeros((size, size), np.uint8)
    data[50:150, 40:160] = 1  # a 120 x 100 pixel block
    return write_raster(tmp_path / "merc.tif", data, crs="EPSG:3857", transform=from_origin(x, y, 0.597, 0.597))


def test_web_mercator_pixels_and_areas_are_ground_sizes(tmp_path):
    path = _mercator_scene(tmp_path)
    info = inspect_scene(path)
    assert areal_scale(info.crs, info.bounds) == pytest.approx(1 / np.cos(np.radians(37.7)) ** 2, rel=1e-3)
    assert info.pixel_size_m == pytest.approx(0.597 * np.cos(np.radians(37.7)), rel=1e-3)  # ~0.472 m
    out = tmp_path / "p.gpkg"
    vectorize_raster(path, out, skip_classes=[0])
    import pyogrio

    got = pyogrio.read_dataframe(out)
    (block,) = got.geometry.values
    lonlat = got.to_crs("EPSG:4326").geometry.values[0]
    geodesic = abs(pyproj.Geod(ellps="WGS84").geometry_area_perimeter(lonlat)[0])
    assert got.area_m2.iloc[0] == pytest.approx(geodesic, rel=1e-6)
    assert got.area_m2.iloc[0] == pytest.approx(shapely.area(block) * np.cos(np.radians(37.7)) ** 2, rel=2e-3)
    # --min-area in m2 is a ground area: 120 x 100 pixels of 0.472 m are ~2675 m2, not 4277
    vectorize_raster(path, tmp_path / "kept.gpkg", skip_classes=[0], min_area="3000m2")
    assert len(pyogrio.read_dataframe(tmp_path / "kept.gpkg")) == 0


def test_utm_keeps_exact_planar_areas(tmp_path):
    data = np.zeros((100, 100), np.uint8)
    data[10:60, 20:90] = 1
    path = write_raster(tmp_path / "utm.tif", data)  # EPSG:32633, 2 m pixels
    info = inspect_scene(path)
    assert not distorts(info.crs, info.bounds) and info.pixel_size_m == 2.0
    import pyogrio

    vectorize_raster(path, tmp_path / "u.gpkg", skip_classes=[0])
    assert pyogrio.read_dataframe(tmp_path / "u.gpkg").area_m2.tolist() == [50 * 70 * 4.0]


def test_info_says_when_a_crs_distorts_scale(tmp_path):
    from click.testing import CliRunner

    from geoseg.cli import main

    res = CliRunner().invoke(main, ["info", str(_mercator_scene(tmp_path))])
    assert res.exit_code == 0 and "distorts" in res.output and "pixel 0.472" in res.output
    res = CliRunner().invoke(main, ["info", str(write_raster(tmp_path / "u.tif", np.zeros((1, 8, 8), np.uint8)))])
    assert res.exit_code == 0 and "distorts" not in res.output
