"""A class map's strata: exact pixel counts, ground areas and class names, read in windows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyproj
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin

from geoseg.assess import strata as strata_mod
from geoseg.assess.strata import pixel_row_areas, read_strata, windows
from geoseg.errors import InputError
from tests.assess.conftest import random_map


def test_counts_are_exact_whatever_the_windows(class_map: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    data = random_map()
    path = class_map(data, {1: "water", 2: "forest", 3: "crop", 4: "urban", 7: "snow"}, tiled=True,
                     blockxsize=32, blockysize=32)
    ids, n = np.unique(data[data != 255], return_counts=True)
    for window_pixels in (1 << 22, 1000, 1):
        monkeypatch.setattr(strata_mod, "WINDOW_PIXELS", window_pixels)
        s = read_strata(path)
        assert s.pixels == {**dict(zip(ids.tolist(), n.tolist(), strict=True)), 7: 0}
        assert s.strata == tuple(ids.tolist()) and s.ids == (*ids.tolist(), 7)
        assert s.names[7] == "snow" and s.name(1) == "water"
        assert s.area_method == "planar"
        assert s.area_m2 == {i: pytest.approx(4.0 * s.pixels[i]) for i in s.ids}  # 2 m pixels


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 300), height=st.integers(1, 300), bw=st.sampled_from([1, 16, 256]),
       bh=st.sampled_from([1, 16, 256]), budget=st.integers(1, 5000))
def test_windows_cover_the_map_once_in_bounded_pieces(width: int, height: int, bw: int, bh: int, budget: int) -> None:
    class Fake:
        pass

    ds = Fake()
    ds.width, ds.height, ds.block_shapes = width, height, [(bh, bw)]  # type: ignore[attr-defined]
    old = strata_mod.WINDOW_PIXELS
    strata_mod.WINDOW_PIXELS = budget
    try:
        seen = np.zeros((height, width), dtype=np.int64)
        for w in windows(ds):  # type: ignore[arg-type]
            seen[w.row_off:w.row_off + w.height, w.col_off:w.col_off + w.width] += 1
            assert w.height * w.width <= max(budget, bh * max(bw, 2048)) + bh * bw
    finally:
        strata_mod.WINDOW_PIXELS = old
    assert (seen == 1).all()


def test_names_from_class_tags_and_fallback(tmp_path: Path) -> None:
    from tests.conftest import write_raster

    path = write_raster(tmp_path / "m.tif", np.array([[1, 2], [3, 3]], dtype=np.uint8), nodata=255)
    with rasterio.open(path, "r+") as ds:
        ds.update_tags(CLASS_1="water", CLASS_2="forest")
    s = read_strata(path)
    assert s.names == {1: "water", 2: "forest", 3: "class 3"}


def test_geographic_areas_are_geodesic(class_map: Callable[..., Path]) -> None:
    """A degree grid: pixels shrink towards the pole; the classes' areas add up to the footprint's geodesic
    area (the way polygon areas are measured; within 1e-4, the footprint's long edges being geodesics that
    bow towards the pole where the pixels' rows follow the parallel)."""
    data = np.ones((120, 80), dtype=np.uint8)
    data[60:] = 2
    transform = from_origin(10.0, 61.0, 0.01, 0.01)
    path = class_map(data, {1: "north", 2: "south"}, crs="EPSG:4326", transform=transform)
    s = read_strata(path)
    assert s.area_method == "geodesic"
    geod = pyproj.Geod(ellps="WGS84")
    full, _ = geod.polygon_area_perimeter([10.0, 10.8, 10.8, 10.0], [61.0, 61.0, 59.8, 59.8])
    assert s.total_area_m2 == pytest.approx(abs(full), rel=1e-4)
    assert s.area_m2 is not None and s.area_m2[2] > s.area_m2[1]  # the southern half is larger
    north, _ = geod.polygon_area_perimeter([10.0, 10.8, 10.8, 10.0], [61.0, 61.0, 60.4, 60.4])
    assert s.area_m2[1] == pytest.approx(abs(north), rel=1e-4)


def test_web_mercator_areas_are_ground_areas() -> None:
    """EPSG:3857 at 60 N: a square CRS unit is about a quarter of a ground square metre."""
    t = from_origin(1_113_194.9, 8_399_737.9, 10.0, 10.0)  # about 10 E, 60 N
    method, areas = pixel_row_areas(rasterio.crs.CRS.from_epsg(3857), t, 100, 100)
    assert method == "geodesic" and areas is not None
    assert areas.mean() == pytest.approx(100.0 * np.cos(np.radians(60.0)) ** 2, rel=0.01)
    assert pixel_row_areas(None, t, 10, 10) == ("none", None)


def test_bad_maps_are_refused(class_map: Callable[..., Path], tmp_path: Path) -> None:
    from tests.conftest import write_raster

    with pytest.raises(InputError, match="3 bands"):
        read_strata(write_raster(tmp_path / "rgb.tif", np.zeros((3, 4, 4), dtype=np.uint8)))
    with pytest.raises(InputError, match="float32.*integer class ids"):
        read_strata(write_raster(tmp_path / "f.tif", np.zeros((4, 4), dtype=np.float32)))
    with pytest.raises(InputError, match="no mapped pixel"):
        read_strata(class_map(np.full((4, 4), 255, dtype=np.uint8)))
    with pytest.raises(InputError, match="no such file"):
        read_strata(tmp_path / "absent.tif")
