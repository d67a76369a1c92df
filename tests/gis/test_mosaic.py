"""Tests of geoseg/mosaic.py: merging per-scene polygon files into one layer, streamed, published whole."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import shapely

import geoseg.gis.mosaic
from geoseg.errors import InputError, UnknownNameError
from geoseg.gis.mosaic import merge_vectors
from geoseg.io.store import Store

FORMATS = {"gpkg": ".gpkg", "shp": ".shp", "geojson": ".geojson", "parquet": ".parquet"}
SHP_FILES = {".shp", ".shx", ".dbf", ".prj", ".cpg"}


def _polygons(n: int, crs: str, x0: float, y0: float, *, multi: bool = False) -> gpd.GeoDataFrame:
    """``n`` small squares (with a hole in the first) near ``(x0, y0)``, with the columns vectorize writes."""
    geoms = []
    for i in range(n):
        x, y = x0 + 30.0 * i, y0 + 7.0 * i
        square = shapely.box(x, y, x + 20.0, y + 20.0)
        if i == 0:
            square = square.difference(shapely.box(x + 5, y + 5, x + 10, y + 10))
        geoms.append(shapely.MultiPolygon([square]) if multi else square)
    return gpd.GeoDataFrame(
        {"class_id": np.arange(n, dtype=np.int32) % 3 + 1,
         "class_name": [["water", "forest", None][i % 3] for i in range(n)],
         "area_m2": np.array([g.area for g in geoms]), "perim_m": np.array([g.length for g in geoms])},
        geometry=geoms, crs=crs)


def _write(gdf: gpd.GeoDataFrame, path: Path, fmt: str) -> Path:
    """``gdf`` as a per-scene file like vectorize writes: GeoJSON in EPSG:4326, Parquet as GeoParquet."""
    if fmt == "parquet":
        gdf.to_parquet(path)
    elif fmt == "geojson":
        gdf.to_crs(4326).to_file(path, driver="GeoJSON")
    else:
        gdf.to_file(path, layer=path.stem, engine="pyogrio")
    return path


def _read(path: str, fmt: str) -> gpd.GeoDataFrame:
    return gpd.read_parquet(path) if fmt == "parquet" else pyogrio.read_dataframe(path)


@pytest.fixture
def scenes() -> dict[str, gpd.GeoDataFrame]:
    """Three scenes: ``a`` in UTM 33N, ``b`` in UTM 34N (reprojected when merged), ``c`` without polygons."""
    return {"a": _polygons(5, "EPSG:32633", 500_000.0, 5_100_000.0),
            "b": _polygons(4, "EPSG:32634", 300_000.0, 5_100_000.0),
            "c": _polygons(0, "EPSG:32633", 500_000.0, 5_100_000.0)}


def _files(folder: Path, gdfs: dict[str, gpd.GeoDataFrame], fmt: str) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return [str(_write(gdf, folder / f"{stem}{FORMATS[fmt]}", fmt)) for stem, gdf in gdfs.items()]


def _all_files(folder: Path) -> set[str]:
    """Every file and folder under ``folder``, hidden ones included, relative to it."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_merge_formats(tmp_path: Path, scenes: dict[str, gpd.GeoDataFrame], fmt: str) -> None:
    inputs = _files(tmp_path / "scenes", scenes, fmt)
    out = tmp_path / "out"
    result = merge_vectors(inputs, Store(str(out)), "job", fmt)

    assert result == str(out / f"job{FORMATS[fmt]}")
    expected_files = {f"job{e}" for e in SHP_FILES} if fmt == "shp" else {f"job{FORMATS[fmt]}"}
    assert _all_files(out) == expected_files  # no staging folder or fetched input left behind
    merged = _read(result, fmt)
    assert len(merged) == len(scenes["a"]) + len(scenes["b"])
    assert list(merged["scene"]) == ["a"] * len(scenes["a"]) + ["b"] * len(scenes["b"])
    target = "EPSG:4326" if fmt == "geojson" else "EPSG:32633"
    assert merged.crs is not None and merged.crs.equals(target)
    tol = 1e-6 if fmt == "geojson" else 1e-9  # GeoJSON keeps 7 decimals of a degree
    for stem in ("a", "b"):
        expected = scenes[stem].to_crs(target)
        got = merged[merged["scene"] == stem]
        # normalised: a shapefile stores exterior rings clockwise
        assert np.all(shapely.equals_exact(shapely.normalize(got.geometry.values),
                                           shapely.normalize(expected.geometry.values), tolerance=tol))
        assert list(got["class_id"]) == list(expected["class_id"])
        assert list(got["class_name"]) == list(expected["class_name"])
        np.testing.assert_allclose(got["area_m2"], expected["area_m2"])
    if fmt == "gpkg":
        assert pyogrio.list_layers(result)[:, 0].tolist() == ["job"]
        assert pyogrio.read_info(result)["geometry_type"] == "Polygon"


def test_scene_column_from_scenes(tmp_path: Path, scenes: dict[str, gpd.GeoDataFrame]) -> None:
    inputs = _files(tmp_path / "scenes", scenes, "gpkg")
    urls = ["s3://bucket/scenes/a.tif", "s3://bucket/scenes/b.tif", "/data/c.tif"]
    result = merge_vectors(inputs, Store(str(tmp_path / "out")), "job", "gpkg", scenes=urls)
    assert set(pyogrio.read_dataframe(result)["scene"]) == set(urls[:2])


def test_streams_in_batches(tmp_path: Path, scenes: dict[str, gpd.GeoDataFrame],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file is read in batches of BATCH_FEATURES features; no batch holds a whole scene."""
    monkeypatch.setattr("geoseg.gis.vectorize.formats.BATCH_FEATURES", 2)
    sizes: list[int] = []
    conform = geoseg.gis.mosaic._conform

    def spy(batch, *args):  # type: ignore[no-untyped-def]
        sizes.append(batch.num_rows)
        return conform(batch, *args)

    monkeypatch.setattr(geoseg.gis.mosaic, "_conform", spy)
    for fmt in ("gpkg", "parquet"):
        sizes.clear()
        inputs = _files(tmp_path / fmt, scenes, fmt)
        result = merge_vectors(inputs, Store(str(tmp_path / "out")), f"job-{fmt}", fmt)
        assert len(_read(result, fmt)) == 9
        assert sizes and max(sizes) <= 2 and sum(sizes) == 9


def test_multipolygon_layer_promotes_polygons(tmp_path: Path) -> None:
    gdfs = {"m": _polygons(2, "EPSG:32633", 500_000.0, 5_100_000.0, multi=True),
            "p": _polygons(3, "EPSG:32633", 501_000.0, 5_100_000.0)}
    inputs = _files(tmp_path / "scenes", gdfs, "gpkg")
    for fmt in ("gpkg", "parquet"):
        result = merge_vectors(inputs, Store(str(tmp_path / "out")), "job", fmt)
        merged = _read(result, fmt)
        assert set(merged.geom_type) == {"MultiPolygon"}
        assert np.all(shapely.equals(merged.geometry.values[2:], gdfs["p"].geometry.values))


def test_reprojection_logged_once(tmp_path: Path, scenes: dict[str, gpd.GeoDataFrame],
                                  caplog: pytest.LogCaptureFixture) -> None:
    gdfs = {**scenes, "d": _polygons(2, "EPSG:32634", 310_000.0, 5_100_000.0)}
    inputs = _files(tmp_path / "scenes", gdfs, "gpkg")
    with caplog.at_level(logging.INFO, logger="geoseg.gis.mosaic"):
        merge_vectors(inputs, Store(str(tmp_path / "out")), "job", "gpkg")
    notes = [r.getMessage() for r in caplog.records if "reprojecting" in r.getMessage()]
    assert len(notes) == 1 and "b.gpkg (EPSG:32634)" in notes[0] and "EPSG:32633" in notes[0]


@pytest.mark.parametrize(("src", "dst"), [("gpkg", "geojson"), ("parquet", "shp"), ("geojson", "parquet")])
def test_other_input_format(tmp_path: Path, scenes: dict[str, gpd.GeoDataFrame], src: str, dst: str) -> None:
    """Inputs in one format merge into another; GeoJSON output is EPSG:4326 whatever the first file's CRS."""
    inputs = _files(tmp_path / "scenes", scenes, src)
    merged = _read(merge_vectors(inputs, Store(str(tmp_path / "out")), "job", dst), dst)
    target = "EPSG:4326" if "geojson" in (src, dst) else "EPSG:32633"
    assert merged.crs is not None and merged.crs.equals(target)
    expected = scenes["b"].to_crs(target).geometry.values
    got = merged[merged["scene"] == "b"].geometry.values
    assert np.all(shapely.equals_exact(shapely.normalize(got), shapely.normalize(expected), tolerance=1e-6))


def test_only_empty_scenes(tmp_path: Path, scenes: dict[str, gpd.GeoDataFrame]) -> None:
    for fmt in FORMATS:
        inputs = _files(tmp_path / fmt, {"c": scenes["c"]}, fmt)
        result = merge_vectors(inputs, Store(str(tmp_path / "out")), "empty", fmt)
        assert len(_read(result, fmt)) == 0


def test_bad_arguments(tmp_path: Path, scenes: dict[str, gpd.GeoDataFrame]) -> None:
    out = Store(str(tmp_path / "out"))
    inputs = _files(tmp_path / "scenes", scenes, "gpkg")
    with pytest.raises(InputError, match="no per-scene vector files"):
        merge_vectors([], out, "job", "gpkg")
    with pytest.raises(UnknownNameError, match="gpkg"):
        merge_vectors(inputs, out, "job", "kml")
    with pytest.raises(InputError, match="2 scene names for 3"):
        merge_vectors(inputs, out, "job", "gpkg", scenes=["x", "y"])
    with pytest.raises(InputError, match="replace the polygons"):
        merge_vectors(inputs, Store(str(tmp_path / "scenes")), "a", "gpkg")
    assert not (tmp_path / "out").exists()


def test_missing_input_leaves_nothing(tmp_path: Path, scenes: dict[str, gpd.GeoDataFrame]) -> None:
    inputs = _files(tmp_path / "scenes", scenes, "gpkg")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="nope.gpkg: no such vector file"):
        merge_vectors([inputs[0], str(tmp_path / "nope.gpkg")], Store(str(out)), "job", "gpkg")
    assert not out.exists() or _all_files(out) == set()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_failure_midway_keeps_old_output(tmp_path: Path, scenes: dict[str, gpd.GeoDataFrame], fmt: str) -> None:
    """A file that fails after the first scene was written leaves the old output and no temporary files."""
    inputs = _files(tmp_path / "scenes", scenes, fmt)
    out = tmp_path / "out"
    first = merge_vectors(inputs[:1], Store(str(out)), "job", fmt)
    before = {name: (out / name).read_bytes() for name in _all_files(out)}
    bad = tmp_path / "scenes" / f"bad{FORMATS[fmt]}"
    bad.write_bytes(b"not a vector file")
    with pytest.raises(InputError, match="bad.*cannot read its polygons"):
        merge_vectors([inputs[0], str(bad)], Store(str(out)), "job", fmt)
    assert {name: (out / name).read_bytes() for name in _all_files(out)} == before
    assert len(_read(first, fmt)) == len(scenes["a"])


@pytest.mark.filterwarnings("ignore:'crs' was not provided")
def test_mixing_no_crs_is_refused(tmp_path: Path, scenes: dict[str, gpd.GeoDataFrame]) -> None:
    bare = scenes["a"].set_crs(None, allow_override=True)
    inputs = _files(tmp_path / "scenes", {"a": scenes["a"], "bare": bare}, "gpkg")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="bare.gpkg: its polygons have no CRS"):
        merge_vectors(inputs, Store(str(out)), "job", "gpkg")
    with pytest.raises(InputError, match="bare.gpkg: its polygons have no CRS, so they cannot be reprojected"):
        merge_vectors(inputs[1:], Store(str(out)), "job", "geojson")
    assert _all_files(out) == set()


def test_missing_columns_refused(tmp_path: Path, scenes: dict[str, gpd.GeoDataFrame]) -> None:
    other = scenes["a"].drop(columns=["area_m2"])
    inputs = _files(tmp_path / "scenes", {"other": other}, "gpkg")
    with pytest.raises(InputError, match="other.gpkg: has no column area_m2"):
        merge_vectors(inputs, Store(str(tmp_path / "out")), "job", "gpkg")


def test_object_storage(tmp_path: Path, scenes: dict[str, gpd.GeoDataFrame], s3_env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Inputs and output on S3: shapefile inputs arrive with their sidecars; nothing is left in temp."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    local = tmp_path / "scenes"
    _files(local, scenes, "shp")
    bucket = Store(s3_env.url("scenes"))
    for f in sorted(local.iterdir()):
        bucket.publish(f, f.name)
    urls = [s3_env.url(f"scenes/{stem}.shp") for stem in scenes]
    out = Store(s3_env.url("job"))
    result = merge_vectors(urls, out, "job", "shp", scenes=urls)
    assert result == s3_env.url("job/job.shp")
    assert set(out.list()) == {f"job{e}" for e in SHP_FILES}
    fetched = tmp_path / "fetched"
    for ext in SHP_FILES:
        out.fetch(f"job{ext}", fetched / f"job{ext}")
    merged = pyogrio.read_dataframe(fetched / "job.shp")
    assert list(merged["scene"]) == [urls[0]] * 5 + [urls[1]] * 4
    assert merged.crs is not None and merged.crs.equals("EPSG:32633")
    assert os.listdir(scratch) == []
