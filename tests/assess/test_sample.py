"""Stratified random sampling of a class map: reproducible, every point on a pixel of its stratum, the
allocation kept, streamed in windows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio

from geoseg.assess import sample as sample_mod
from geoseg.assess import strata as strata_mod
from geoseg.assess.sample import design, parse_expected_accuracy, sample_points
from geoseg.assess.strata import read_strata, windows
from geoseg.errors import InputError, OutputExistsError, UnknownNameError
from tests.assess.conftest import random_map

NAMES = {1: "water", 2: "forest", 3: "crop", 4: "urban"}


def _on_map(path: Path, points: gpd.GeoDataFrame) -> np.ndarray:
    with rasterio.open(path) as ds:
        return np.array([v[0] for v in ds.sample(list(zip(points.geometry.x, points.geometry.y, strict=True)))])


def test_points_sit_on_pixel_centres_of_their_stratum(class_map: Callable[..., Path], tmp_path: Path) -> None:
    data = random_map()
    path = class_map(data, NAMES, tiled=True, blockxsize=64, blockysize=64)
    res = sample_points(path, tmp_path / "points.gpkg", 200, allocation="min:30", seed=7)
    pts = gpd.read_file(res.path)
    assert list(pts.columns) == ["point_id", "class_id", "class_name", "stratum_px", "reference", "geometry"]
    assert len(pts) == 200 == res.n and pts["reference"].isna().all()
    assert (_on_map(path, pts) == pts["class_id"].to_numpy()).all()  # on a pixel of its stratum, never nodata
    assert pts["class_name"].tolist() == [NAMES[c] for c in pts["class_id"]]
    ids, n = np.unique(data[data != 255], return_counts=True)
    assert pts["stratum_px"].tolist() == [dict(zip(ids, n, strict=True))[c] for c in pts["class_id"]]
    assert pts.groupby("class_id").size().to_dict() == {s.id: s.points for s in res.strata}
    assert min(s.points for s in res.strata) >= 30
    # pixel centres: x = x0 + (col + 0.5) * 2 m
    col = (pts.geometry.x - 500_000.0) / 2.0 - 0.5
    row = (5_100_000.0 - pts.geometry.y) / 2.0 - 0.5
    assert np.allclose(col, np.round(col)) and np.allclose(row, np.round(row))
    assert len({(x, y) for x, y in zip(pts.geometry.x, pts.geometry.y, strict=True)}) == 200
    assert pts.crs.to_epsg() == 32633


def test_the_same_seed_draws_the_same_points(class_map: Callable[..., Path], tmp_path: Path) -> None:
    path = class_map(random_map(), NAMES)
    a = sample_points(path, tmp_path / "a.gpkg", 120, seed=3)
    b = sample_points(path, tmp_path / "b.gpkg", 120, seed=3)
    c = sample_points(path, tmp_path / "c.gpkg", 120, seed=4)
    pa, pb, pc = (gpd.read_file(r.path) for r in (a, b, c))
    assert pa.geometry.equals(pb.geometry) and pa["class_id"].equals(pb["class_id"])
    assert not pa.geometry.equals(pc.geometry)
    d = sample_points(path, tmp_path / "d.gpkg", 120)  # no seed: one is drawn and reported
    again = sample_points(path, tmp_path / "e.gpkg", 120, seed=d.seed)
    assert gpd.read_file(d.path).geometry.equals(gpd.read_file(again.path).geometry)


def test_located_pixels_match_a_whole_map_enumeration(class_map: Callable[..., Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamed second pass finds exactly the pixels of the drawn ranks, pixels numbered window by window
    (row by row inside one), as a whole-map enumeration in the same order does; small windows too."""
    data = random_map((97, 131), seed=5)
    path = class_map(data, NAMES, tiled=True, blockxsize=16, blockysize=16)
    monkeypatch.setattr(strata_mod, "WINDOW_PIXELS", 700)
    s = read_strata(path)
    plan, _ = design(s, 150, "equal")
    ranks = sample_mod._draw_ranks(plan, np.random.default_rng(11))
    cls, rows, cols = sample_mod._locate(str(path), ranks)
    with rasterio.open(path) as ds:
        order = {c: [] for c in ranks}  # type: dict[int, list[tuple[int, int]]]
        for w in windows(ds):
            block = data[w.row_off:w.row_off + w.height, w.col_off:w.col_off + w.width]
            for c in ranks:
                rr, cc = np.nonzero(block == c)
                order[c] += list(zip((rr + w.row_off).tolist(), (cc + w.col_off).tolist(), strict=True))
    expected = sorted((c, *order[c][r]) for c in ranks for r in ranks[c].tolist())
    got = sorted(zip(cls.tolist(), rows.tolist(), cols.tolist(), strict=True))
    assert got == expected


def test_a_whole_stratum_is_every_pixel_once(class_map: Callable[..., Path], tmp_path: Path) -> None:
    data = np.full((40, 50), 1, dtype=np.uint8)
    data[5:9, 7:12] = 2  # 20 pixels
    data[30:, 40:] = 255
    path = class_map(data, {1: "land", 2: "pond"})
    res = sample_points(path, tmp_path / "p.gpkg", 40, allocation="equal", seed=1)
    pts = gpd.read_file(res.path)
    pond = pts[pts["class_id"] == 2]
    assert len(pond) == 20 and len({(x, y) for x, y in zip(pond.geometry.x, pond.geometry.y, strict=True)}) == 20
    assert (_on_map(path, pts) == pts["class_id"].to_numpy()).all()


def test_every_pixel_is_equally_likely(class_map: Callable[..., Path], tmp_path: Path) -> None:
    """Over many seeds, each pixel of a stratum is drawn about equally often (within 5 standard deviations)."""
    data = np.ones((6, 10), dtype=np.uint8)
    path = class_map(data, {1: "all"})
    s = read_strata(path)
    plan, _ = design(s, 6, "proportional")
    hits = np.zeros(60)
    for seed in range(600):
        cls, rows, cols = sample_mod._locate(str(path), sample_mod._draw_ranks(plan, np.random.default_rng(seed)))
        np.add.at(hits, rows * 10 + cols, 1)
    expected = 600 * 6 / 60
    assert np.abs(hits - expected).max() < 5 * np.sqrt(expected)


@pytest.mark.parametrize("ext", ["gpkg", "shp", "geojson", "parquet"])
def test_vector_formats(class_map: Callable[..., Path], tmp_path: Path, ext: str) -> None:
    path = class_map(random_map(), NAMES)
    res = sample_points(path, tmp_path / f"points.{ext}", 50, seed=2)
    pts = gpd.read_parquet(res.path) if ext == "parquet" else gpd.read_file(res.path)
    assert len(pts) == 50 and {"class_id", "class_name", "stratum_px", "reference"} <= set(pts.columns)
    assert pts.crs.to_epsg() == (4326 if ext == "geojson" else 32633)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_target_se_sizes_the_sample(class_map: Callable[..., Path], tmp_path: Path) -> None:
    path = class_map(random_map((300, 300)), NAMES)
    res = sample_points(path, tmp_path / "p.gpkg", target_se=0.03, expected_accuracy="1:0.7,2:0.8", seed=1)
    assert res.suggested_n is not None and res.n == res.suggested_n
    s = read_strata(path)
    w = np.array([s.pixels[i] for i in s.strata]) / s.total_pixels
    u = np.array([0.7, 0.8, 0.9, 0.9])
    sd = np.sqrt(u * (1 - u))
    assert res.n == int(np.ceil((w * sd).sum() ** 2 / (0.03**2 + (w * sd**2).sum() / s.total_pixels)))
    fixed = sample_points(path, tmp_path / "q.gpkg", 100, target_se=0.03, seed=1)  # -n wins, the size is reported
    assert fixed.n == 100 and fixed.suggested_n is not None


def test_expected_accuracy_parsing() -> None:
    assert parse_expected_accuracy(None, (1, 2)) == {1: 0.9, 2: 0.9}
    assert parse_expected_accuracy("0.8", (1, 2)) == {1: 0.8, 2: 0.8}
    assert parse_expected_accuracy("2:0.6", (1, 2)) == {1: 0.9, 2: 0.6}
    for bad in ("high", "1:x", "1:1.5"):
        with pytest.raises(InputError, match="expected-accuracy"):
            parse_expected_accuracy(bad, (1, 2))


def test_bad_requests_are_refused_and_nothing_is_written(class_map: Callable[..., Path], tmp_path: Path) -> None:
    path = class_map(random_map((20, 20), nodata_corner=0), NAMES)
    out = tmp_path / "p.gpkg"
    with pytest.raises(InputError, match="-n 1000: the map has only 400"):
        sample_points(path, out, 1000)
    with pytest.raises(InputError, match="give the sample size"):
        sample_points(path, out)
    with pytest.raises(UnknownNameError, match="valid names"):
        sample_points(path, out, 10, allocation="systematic")
    with pytest.raises(InputError, match="unknown vector extension"):
        sample_points(path, tmp_path / "p.xyz", 10)
    with pytest.raises(InputError, match="no such file"):
        sample_points(tmp_path / "absent.tif", out, 10)
    with pytest.raises(UnknownNameError):  # options are checked before the map is read
        sample_points(tmp_path / "absent.tif", out, 10, allocation="cluster")
    with pytest.raises(InputError, match="target-se"):
        sample_points(tmp_path / "absent.tif", out, target_se=1.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif"]
    sample_points(path, out, 10, seed=1)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        sample_points(path, out, 10, seed=2)
    sample_points(path, out, 12, seed=2, overwrite=True)
    assert len(gpd.read_file(out)) == 12


# --- the reference column filled from a reference class raster (--label-from) ---


def _index_raster(path: Path, height: int, width: int, transform: object, crs: str, nodata: int | None = None,
                  **profile: object) -> np.ndarray:
    """A reference raster whose every pixel holds its own index ``row * width + col``: a point read at the
    wrong pixel (a row or column off, or in the wrong CRS) gets another value."""
    from tests.conftest import write_raster

    values = np.arange(height * width, dtype=np.int32).reshape(height, width) + 1
    write_raster(path, values, crs=crs, transform=transform, nodata=nodata, **profile)
    return values


def _expected_index(xs: np.ndarray, ys: np.ndarray, transform: object, width: int) -> np.ndarray:
    cols, rows = ~transform * (np.asarray(xs), np.asarray(ys))  # type: ignore[operator]
    return np.floor(rows).astype(np.int64) * width + np.floor(cols).astype(np.int64) + 1


def test_label_from_reads_the_pixel_under_each_point(class_map: Callable[..., Path], tmp_path: Path) -> None:
    """On the map's grid and on a finer, shifted grid of the same CRS, each point's reference is the value of
    the pixel that holds it: with every pixel unique, a row or a column off would show."""
    from rasterio.transform import from_origin

    data = random_map((40, 56), seed=2, nodata_corner=6)
    path = class_map(data, NAMES, tiled=True, blockxsize=16, blockysize=16)
    same = from_origin(500_000.0, 5_100_000.0, 2.0, 2.0)  # the map's grid
    _index_raster(tmp_path / "same.tif", 40, 56, same, "EPSG:32633")
    res = sample_points(path, tmp_path / "a.gpkg", 80, seed=5, label_from=tmp_path / "same.tif")
    pts = gpd.read_file(res.path)
    assert res.labelled == 80 and res.label_from == str(tmp_path / "same.tif")
    col = np.round((pts.geometry.x - 500_000.0) / 2.0 - 0.5).astype(int)
    row = np.round((5_100_000.0 - pts.geometry.y) / 2.0 - 0.5).astype(int)
    assert pts["reference"].tolist() == [str(r * 56 + c + 1) for r, c in zip(row, col, strict=True)]
    fine = from_origin(499_990.7, 5_100_003.3, 0.7, 0.7)  # 0.7 m pixels, shifted: covers the whole map
    _index_raster(tmp_path / "fine.tif", 130, 180, fine, "EPSG:32633")
    res = sample_points(path, tmp_path / "b.gpkg", 80, seed=5, label_from=tmp_path / "fine.tif")
    pts = gpd.read_file(res.path)
    expected = _expected_index(pts.geometry.x, pts.geometry.y, fine, 180)
    assert pts["reference"].tolist() == [str(v) for v in expected]
    # the same points, the same map classes: only the reference column changed
    assert pts["class_id"].tolist() == gpd.read_file(tmp_path / "a.gpkg")["class_id"].tolist()


def test_label_from_reprojects_the_points_to_the_rasters_crs(class_map: Callable[..., Path], tmp_path: Path) -> None:
    """A reference raster in EPSG:4326 (pixels of about 1 m): each point is read where it lies on the ground,
    as pyproj places it, not at its UTM numbers."""
    import pyproj
    from rasterio.transform import from_origin

    data = random_map((40, 56), seed=2, nodata_corner=0)
    path = class_map(data, NAMES)
    to_geo = pyproj.Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    west, north = to_geo.transform(500_000.0 - 10, 5_100_000.0 + 10)
    east, south = to_geo.transform(500_000.0 + 56 * 2 + 10, 5_100_000.0 - 40 * 2 - 10)
    step = 1e-5
    width, height = int((east - west) / step) + 2, int((north - south) / step) + 2
    geo = from_origin(west, north, step, step)
    _index_raster(tmp_path / "geo.tif", height, width, geo, "EPSG:4326")
    res = sample_points(path, tmp_path / "p.gpkg", 60, seed=8, label_from=tmp_path / "geo.tif")
    pts = gpd.read_file(res.path)
    assert res.labelled == 60
    lon, lat = to_geo.transform(pts.geometry.x.to_numpy(), pts.geometry.y.to_numpy())
    assert pts["reference"].tolist() == [str(v) for v in _expected_index(lon, lat, geo, width)]
    assert pts.crs.to_epsg() == 32633  # the points stay in the map's CRS


def test_points_off_the_raster_or_on_its_nodata_keep_an_empty_reference(
        class_map: Callable[..., Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A reference raster covering the map's left half, with a nodata stripe: the points off it or on the
    stripe keep an empty reference, counted in one warning line; the others are labelled."""
    from rasterio.transform import from_origin

    data = random_map((40, 56), seed=2, nodata_corner=0)
    path = class_map(data, NAMES)
    ref = np.asarray(data[:, :28], dtype=np.uint8).copy()
    ref[10:14] = 0
    from tests.conftest import write_raster

    write_raster(tmp_path / "half.tif", ref, transform=from_origin(500_000.0, 5_100_000.0, 2.0, 2.0), nodata=0)
    with caplog.at_level("WARNING", logger="geoseg"):
        res = sample_points(path, tmp_path / "p.gpkg", 120, seed=3, label_from=tmp_path / "half.tif")
    pts = gpd.read_file(res.path)
    col = np.round((pts.geometry.x - 500_000.0) / 2.0 - 0.5).astype(int)
    row = np.round((5_100_000.0 - pts.geometry.y) / 2.0 - 0.5).astype(int)
    off, stripe = col >= 28, (col < 28) & (row >= 10) & (row < 14)
    assert off.any() and stripe.any()
    assert pts["reference"][off | stripe].isna().all()
    kept = ~(off | stripe)
    assert pts["reference"][kept].tolist() == [str(c) for c in pts["class_id"][kept]]
    assert res.labelled == int(kept.sum())
    lines = [r.getMessage() for r in caplog.records if "half.tif" in r.getMessage()]
    assert lines == [f"{tmp_path / 'half.tif'}: {int((off | stripe).sum())} of 120 points lie off the raster "
                     f"({int(off.sum())}) or on its nodata ({int(stripe.sum())}); their reference is left empty"]


@pytest.mark.parametrize("kind", ["float", "bands", "absent", "not a raster"])
def test_a_bad_label_raster_is_refused_and_nothing_is_written(class_map: Callable[..., Path], tmp_path: Path,
                                                              kind: str) -> None:
    from tests.conftest import write_raster

    path = class_map(random_map((20, 20), nodata_corner=0), NAMES)
    bad = tmp_path / "ref.tif"
    message = {"float": "band 1 is float32; give a raster of integer reference class ids",
               "bands": "has 3 bands; give a one-band raster of reference class ids",
               "absent": "no such file", "not a raster": "cannot be read as a raster"}[kind]
    if kind == "float":
        write_raster(bad, np.ones((20, 20), dtype=np.float32))
    elif kind == "bands":
        write_raster(bad, np.ones((3, 20, 20), dtype=np.uint8))
    elif kind == "not a raster":
        bad.write_text("class,x,y\n")
    with pytest.raises(InputError, match=message) as err:
        sample_points(path, tmp_path / "p.gpkg", 10, seed=1, label_from=bad)
    assert str(err.value).startswith(f"--label-from {bad}: ") and "\n" not in str(err.value)
    assert not (tmp_path / "p.gpkg").exists()
