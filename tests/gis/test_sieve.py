"""Tests of geoseg/gis/sieve.py: the streamed sieve equals GDAL's whole-raster sieve (rasterio.features.sieve)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.features
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin
from scipy import ndimage

from geoseg.errors import InputError, OutputExistsError
from geoseg.gis.quantities import Quantity, parse_mmu
from geoseg.gis.sieve import mmu_pixels, sieve_array, sieve_raster
from geoseg.gis.strip_sieve import StripSieve


def gdal_sieve(data: np.ndarray, threshold: int, connectivity: int, mask: np.ndarray | None) -> np.ndarray:
    """The oracle: GDAL's sieve of the whole array (rasterio refuses sizes of the whole image or more,
    where GDAL would change nothing: every region is small, none is a target)."""
    if threshold <= 1 or threshold >= data.size:
        return data.copy()
    return rasterio.features.sieve(data, threshold, mask=mask, connectivity=connectivity)


@st.composite
def class_maps(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray | None]:
    """Maps with many small regions, blobs, long thin snakes across many rows, and nodata holes."""
    h = draw(st.integers(1, 90))
    w = draw(st.integers(1, 40))
    classes = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["noise", "blobs", "blocks"]))
    if kind == "noise":
        data = rng.integers(1, classes + 1, (h, w))
    elif kind == "blobs":
        field = ndimage.gaussian_filter(rng.normal(size=(h, w)), draw(st.floats(0.5, 4)))
        data = np.digitize(field, np.quantile(field, np.linspace(0, 1, classes + 1)[1:-1])) + 1
        flip = rng.random((h, w)) < draw(st.floats(0, 0.3))  # salt: many small regions
        data[flip] = rng.integers(1, classes + 1, int(flip.sum()))
    else:
        b = draw(st.integers(1, 6))
        data = np.kron(rng.integers(1, classes + 1, (h // b + 1, w // b + 1)), np.ones((b, b), int))[:h, :w]
    for _ in range(draw(st.integers(0, 3))):  # snakes: one-pixel-wide random walks down the map
        value = int(rng.integers(1, classes + 2))
        x = int(rng.integers(0, w))
        for y in range(int(rng.integers(0, h)), h):
            data[y, x] = value
            x = int(np.clip(x + rng.integers(-1, 2), 0, w - 1))
    data = data.astype(draw(st.sampled_from([np.uint8, np.int16, np.uint16, np.int32])))
    mask = None
    if draw(st.booleans()):
        holes = rng.random((h, w)) < draw(st.floats(0, 0.4))
        if draw(st.booleans()):
            holes = ndimage.binary_dilation(holes, iterations=1) & (rng.random((h, w)) < 0.7)
        data[holes] = 0
        mask = data != 0
    return data, mask


@settings(max_examples=400, deadline=None)
@given(class_maps(), st.integers(1, 50), st.sampled_from([4, 8]), st.integers(1, 64))
def test_streamed_sieve_equals_gdal(case: tuple[np.ndarray, np.ndarray | None], threshold: int,
                                    connectivity: int, strip_rows: int) -> None:
    data, mask = case
    expected = gdal_sieve(data, threshold, connectivity, mask)
    got = sieve_array(data, threshold, connectivity=connectivity, mask=mask, strip_rows=strip_rows)
    assert got.dtype == data.dtype
    np.testing.assert_array_equal(got, expected)


@settings(max_examples=150, deadline=None)
@given(class_maps(), st.integers(2, 12), st.sampled_from([4, 8]))
def test_any_strips_give_the_same_map(case: tuple[np.ndarray, np.ndarray | None], threshold: int,
                                      connectivity: int) -> None:
    data, mask = case
    ref = sieve_array(data, threshold, connectivity=connectivity, mask=mask, strip_rows=data.shape[0])
    for rows in (1, 2, 3, 7):
        np.testing.assert_array_equal(
            sieve_array(data, threshold, connectivity=connectivity, mask=mask, strip_rows=rows), ref)


def test_chain_of_small_regions_goes_to_the_big_region_at_its_end() -> None:
    # 3 (one pixel) touches only 2 (two pixels), which touches 1 (big): both go to 1 at threshold 3;
    # merged one after the other, 3 would take 2's value and stay 2.
    data = np.array([[1, 1, 1, 1, 1],
                     [1, 1, 1, 1, 1],
                     [0, 0, 2, 2, 1],
                     [0, 0, 3, 0, 0]], dtype=np.uint8)
    mask = data != 0
    out = sieve_array(data, 3, mask=mask, strip_rows=1)
    np.testing.assert_array_equal(out, gdal_sieve(data, 3, 4, mask))
    assert out[3, 2] == 1 and out[2, 2] == 1 and out[3, 0] == 0


def test_cycle_of_small_regions_and_isolated_region_stay() -> None:
    # 2 and 3 are each other's largest neighbour (nodata around them): both keep their value; 4 is alone
    data = np.array([[2, 2, 3, 0, 4],
                     [0, 0, 0, 0, 0],
                     [1, 1, 1, 1, 1]], dtype=np.uint8)
    mask = data != 0
    out = sieve_array(data, 4, mask=mask, strip_rows=1)
    np.testing.assert_array_equal(out, data)
    np.testing.assert_array_equal(out, gdal_sieve(data, 4, 4, mask))


@pytest.mark.parametrize("connectivity", [4, 8])
def test_ties_go_to_the_neighbour_met_first_in_gdal_order(connectivity: int) -> None:
    # the single 9 has four neighbours of 5 pixels each (classes 1..4): GDAL keeps the first one it meets
    data = np.array([[1, 1, 1, 2, 2],
                     [1, 1, 9, 2, 2],
                     [3, 3, 4, 4, 2],
                     [3, 3, 3, 4, 4],
                     [1, 4, 4, 4, 4]], dtype=np.uint8)
    for rows in (1, 2, 5):
        np.testing.assert_array_equal(sieve_array(data, 2, connectivity=connectivity, strip_rows=rows),
                                      gdal_sieve(data, 2, connectivity, None))


def test_region_across_many_strips_counts_whole() -> None:
    # a one-pixel-wide column of 2 (60 px) spans 60 one-row strips: it is not small at threshold 50,
    # while a 40-pixel column is
    data = np.ones((60, 5), dtype=np.uint8)
    data[:, 1] = 2
    data[10:50, 3] = 3
    out = sieve_array(data, 50, strip_rows=1)
    assert (out[:, 1] == 2).all() and (out[:, 3] == 1).all()
    np.testing.assert_array_equal(out, gdal_sieve(data, 50, 4, None))


def test_strips_must_come_in_order() -> None:
    sv = StripSieve(4, 3)
    sv.scan(0, np.ones((2, 4), np.uint8), np.ones((2, 4), bool))
    with pytest.raises(ValueError):
        sv.scan(5, np.ones((2, 4), np.uint8), np.ones((2, 4), bool))


# ------------------------------------------------------------------------------------------- units

def test_parse_mmu_units() -> None:
    assert parse_mmu("0.5ha") == Quantity(5000.0, "m2")
    assert parse_mmu("5000m2") == Quantity(5000.0, "m2")
    assert parse_mmu("12px") == Quantity(12.0, "px")
    assert parse_mmu(12) == Quantity(12.0, "px")
    with pytest.raises(InputError, match="--mmu"):
        parse_mmu("12 acres")
    with pytest.raises(InputError, match="--mmu"):
        parse_mmu("-1ha")


def test_mmu_pixels_rounds_so_that_smaller_regions_go() -> None:
    t10 = from_origin(500_000.0, 5_100_000.0, 10.0, 10.0)
    b = (500_000.0, 5_090_000.0, 510_000.0, 5_100_000.0)
    assert mmu_pixels("0.5ha", crs=rasterio.CRS.from_epsg(32633), transform=t10, bounds=b) == 50
    assert mmu_pixels("12px", crs=None, transform=t10, bounds=b) == 12
    assert mmu_pixels("12.5px", crs=None, transform=t10, bounds=b) == 13  # 12 px < 12.5 go, 13 stay
    assert mmu_pixels("5001m2", crs=rasterio.CRS.from_epsg(32633), transform=t10, bounds=b) == 51
    t99 = from_origin(500_000.0, 5_100_000.0, 9.9, 9.9)
    assert mmu_pixels("0.5ha", crs=rasterio.CRS.from_epsg(32633), transform=t99, bounds=b) == math.ceil(5000 / 98.01)
    with pytest.raises(InputError, match="no CRS"):
        mmu_pixels("0.5ha", crs=None, transform=t10, bounds=b)


def test_mmu_on_a_geographic_crs_is_geodesic() -> None:
    # 1e-4 degree pixels at 60 N: about 11.13 m x 5.58 m = 62 m2 (the planar degrees would be nonsense)
    t = from_origin(10.0, 60.0005, 1e-4, 1e-4)
    b = (10.0, 59.9995, 10.001, 60.0005)
    px = mmu_pixels("0.5ha", crs=rasterio.CRS.from_epsg(4326), transform=t, bounds=b)
    from pyproj import Geod

    area, _ = Geod(ellps="WGS84").polygon_area_perimeter([10.00045, 10.00055, 10.00055, 10.00045],
                                                         [59.99995, 59.99995, 60.00005, 60.00005])
    assert px == math.ceil(5000 / abs(area))
    assert 75 < px < 85


# ------------------------------------------------------------------------------------------- rasters

def _read_masked(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with rasterio.open(path) as ds:
        return ds.read(1), ds.read_masks(1) > 0


@pytest.mark.parametrize("connectivity", [4, 8])
def test_sieve_raster_equals_gdal_with_nodata(make_raster: Callable[..., Path], tmp_path: Path,
                                             connectivity: int) -> None:
    rng = np.random.default_rng(3)
    field = ndimage.gaussian_filter(rng.normal(size=(300, 211)), 2)
    data = (np.digitize(field, np.quantile(field, [0.25, 0.5, 0.75])) + 1).astype(np.uint8)
    salt = rng.random(data.shape) < 0.05
    data[salt] = rng.integers(1, 5, int(salt.sum()))
    data[rng.random(data.shape) < 0.03] = 0
    src = make_raster(data, nodata=0, transform=from_origin(500_000.0, 5_100_000.0, 10.0, 10.0))
    ref = gdal_sieve(data, 12, connectivity, data != 0)
    for rows in (1, 17, 300):
        res = sieve_raster(src, tmp_path / f"out{rows}.tif", "1200m2", connectivity, strip_rows=rows)
        assert res.threshold == 12
        got, _ = _read_masked(res.path)
        np.testing.assert_array_equal(got, ref)
        assert res.pixels_changed == int((ref != data).sum())
    with rasterio.open(src) as a, rasterio.open(res.path) as b:
        assert b.nodata == a.nodata and b.crs == a.crs and b.transform == a.transform and b.dtypes == a.dtypes
    with pytest.raises(OutputExistsError):
        sieve_raster(src, res.path, 12)


def test_sieve_raster_refuses_float_and_multiband(make_raster: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="integer"):
        sieve_raster(make_raster(np.zeros((5, 5), np.float32)), tmp_path / "o.tif", 3)
    with pytest.raises(InputError, match="bands"):
        sieve_raster(make_raster(np.zeros((2, 5, 5), np.uint8), name="two.tif"), tmp_path / "o.tif", 3)
    with pytest.raises(InputError, match="connectivity"):
        sieve_raster(make_raster(np.zeros((5, 5), np.uint8), name="c.tif"), tmp_path / "o.tif", 3, 6)


# ------------------------------------------------------------------------------------------- real maps

REAL_MAPS = [
    ("slovenia_lulc/LULC_from_npy.tif", (2, 5, 20, 50)),
    ("spacenet_buildings/sample_fp_mask_from_geojson.tif", (10, 40, 200)),
    ("spacenet_roads/sample_road_raster_mask.tif", (20, 100)),
    ("amazon_forest/Amazon_1110_25.labels.tif", (5, 50)),
    ("amazon_forest/Amazon_404_52.labels.tif", (5, 50)),
]


@pytest.mark.parametrize(("name", "thresholds"), REAL_MAPS)
@pytest.mark.parametrize("connectivity", [4, 8])
def test_real_maps_equal_gdal(real_data: Path, tmp_path: Path, name: str, thresholds: tuple[int, ...],
                              connectivity: int) -> None:
    data, valid = _read_masked(real_data / name)
    for t in thresholds:
        ref = gdal_sieve(data, t, connectivity, valid)
        for rows in (1, 7, 64):
            np.testing.assert_array_equal(
                sieve_array(data, t, connectivity=connectivity, mask=valid, strip_rows=rows), ref)
    res = sieve_raster(real_data / name, tmp_path / "s.tif", f"{thresholds[-1]}px", connectivity, strip_rows=33)
    np.testing.assert_array_equal(_read_masked(res.path)[0], gdal_sieve(data, thresholds[-1], connectivity, valid))


# ------------------------------------------------------------------------------------------- vectorize --mmu

@pytest.mark.parametrize("connectivity", [4, 8])
def test_vectorize_mmu_polygonises_the_sieved_map(make_raster: Callable[..., Path], tmp_path: Path,
                                                  connectivity: int) -> None:
    from geoseg.gis.vectorize import polygonize, vectorize_raster

    rng = np.random.default_rng(5)
    field = ndimage.gaussian_filter(rng.normal(size=(200, 150)), 3)
    data = (np.digitize(field, np.quantile(field, [0.3, 0.6])) + 1).astype(np.uint8)
    salt = rng.random(data.shape) < 0.03
    data[salt] = rng.integers(1, 4, int(salt.sum()))
    data[:20, :20] = 0
    t = from_origin(500_000.0, 5_100_000.0, 10.0, 10.0)
    src = make_raster(data, nodata=0, transform=t)
    cleaned = make_raster(gdal_sieve(data, 50, connectivity, data != 0), name="cleaned.tif", nodata=0, transform=t)
    res = vectorize_raster(src, tmp_path / "mmu.gpkg", mmu="0.5ha", connectivity=connectivity, block_size=64)
    ref = vectorize_raster(cleaned, tmp_path / "ref.gpkg", connectivity=connectivity, block_size=64)
    assert res.features == ref.features < vectorize_raster(src, tmp_path / "raw.gpkg",
                                                           connectivity=connectivity).features
    assert res.class_counts == ref.class_counts
    assert res.class_areas_m2 == pytest.approx(ref.class_areas_m2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the sieved raster is gone
    gdf = polygonize(src, mmu="50px", connectivity=connectivity)
    assert len(gdf) == ref.features


def test_cli_vectorize_mmu(make_raster: Callable[..., Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from geoseg.cli import main

    data = np.ones((40, 40), np.uint8)
    data[10:12, 10:12] = 2
    src = make_raster(data, transform=from_origin(500_000.0, 5_100_000.0, 10.0, 10.0))
    out = tmp_path / "p.gpkg"
    r = CliRunner().invoke(main, ["vectorize", str(src), str(out), "--mmu", "0.05ha"])
    assert r.exit_code == 0, r.output
    assert "1 polygons" in r.output
    r = CliRunner().invoke(main, ["vectorize", str(src), str(tmp_path / "q.gpkg"), "--mmu", "4 acres"])
    assert r.exit_code != 0 and "--mmu" in r.output


def test_worker_processes_give_the_same_map(make_raster: Callable[..., Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import geoseg.gis.sieve as sieve

    rng = np.random.default_rng(8)
    data = rng.integers(1, 4, (120, 90)).astype(np.uint8)
    data[rng.random(data.shape) < 0.1] = 0
    src = make_raster(data, nodata=0)
    monkeypatch.setattr(sieve, "PROCESS_MIN_PIXELS", 0)
    assert sieve._process_count(2, 12, data.size) == 2
    res = sieve_raster(src, tmp_path / "w.tif", 5, 8, strip_rows=10, workers=2)
    np.testing.assert_array_equal(_read_masked(res.path)[0], gdal_sieve(data, 5, 8, data != 0))
    with pytest.raises(InputError, match="workers"):
        sieve_raster(src, tmp_path / "w0.tif", 5, workers=0)


def test_mmu_in_square_metres_on_an_epsg4326_map(real_data: Path, tmp_path: Path) -> None:
    # SpaceNet's road mask is in EPSG:4326 (2.7e-6 degrees, ~0.3 m): 20 m2 is measured on the ellipsoid
    from pyproj import Geod

    src = real_data / "spacenet_roads" / "sample_road_raster_mask.tif"
    with rasterio.open(src) as ds:
        t, b = ds.transform, ds.bounds
        cx, cy = (b.left + b.right) / 2, (b.bottom + b.top) / 2
        area, _ = Geod(ellps="WGS84").polygon_area_perimeter(
            [cx - t.a / 2, cx + t.a / 2, cx + t.a / 2, cx - t.a / 2], [cy - t.e / 2, cy - t.e / 2, cy + t.e / 2,
                                                                       cy + t.e / 2])
    res = sieve_raster(src, tmp_path / "roads.tif", "20m2", 8, strip_rows=50)
    assert res.threshold == math.ceil(20 / abs(area))
    data, valid = _read_masked(src)
    np.testing.assert_array_equal(_read_masked(res.path)[0], gdal_sieve(data, res.threshold, 8, valid))


@settings(max_examples=100, deadline=None)
@given(case=class_maps(), threshold=st.integers(2, 30), connectivity=st.sampled_from([4, 8]),
       rows=st.integers(1, 5), hold=st.sampled_from([0, 1]))
def test_tables_written_before_their_pieces_are_decided_are_patched(
        case: tuple[np.ndarray, np.ndarray | None], threshold: int, connectivity: int, rows: int, hold: int) -> None:
    """Strip tables leave memory after ``HOLD_STRIPS`` strips even with pieces undecided: those come back as
    patches, and the map is GDAL's all the same."""
    import geoseg.gis.strip_sieve as strip_sieve

    data, mask = case
    saved = strip_sieve.HOLD_STRIPS
    strip_sieve.HOLD_STRIPS = hold
    try:
        got = sieve_array(data, threshold, connectivity=connectivity, mask=mask, strip_rows=rows)
    finally:
        strip_sieve.HOLD_STRIPS = saved
    np.testing.assert_array_equal(got, gdal_sieve(data, threshold, connectivity, mask))


def test_memory_is_bounded_by_the_width_not_the_height() -> None:
    """The regions kept at once (open, or waiting on an open neighbour) do not grow with the map's height:
    a map 16 times taller, with 16 times the regions, keeps about as many."""
    rng = np.random.default_rng(5)
    peaks, counts = [], []
    for height in (200, 3200):
        data = ndimage.zoom(rng.integers(1, 5, size=(height // 4, 50)), 4, order=0).astype(np.uint8)
        data[rng.random(data.shape) < 0.05] = 7  # salt: many one-pixel regions
        sv = StripSieve(data.shape[1], 20, 4)
        valid = np.ones(data.shape, bool)
        for r0 in range(0, height, 10):
            sv.scan(r0, data[r0:r0 + 10], valid[r0:r0 + 10])
        stats = sv.decide()
        peaks.append(sv.peak_regions)
        counts.append(stats.regions)
        out = np.concatenate([sv.apply(r0, data[r0:r0 + 10]) for r0 in range(0, height, 10)])
        np.testing.assert_array_equal(out, gdal_sieve(data, 20, 4, None))
    assert counts[1] > 10 * counts[0]
    assert peaks[1] < 2 * peaks[0] and peaks[1] < 4 * data.shape[1]
