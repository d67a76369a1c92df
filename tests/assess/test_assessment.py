"""geoseg's assessment of a class map from reference points: the paper's example through the files, the
reports, and the points it leaves out (each named)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
from rasterio.transform import from_origin
from shapely.geometry import LineString, Point

from geoseg.assess import assess, sample_points
from geoseg.assess.assessment import output_stem
from geoseg.errors import InputError, OutputExistsError
from tests.assess.conftest import random_map
from tests.assess.test_estimate import AREAS_HA, CLASSES, OVERALL, PRODUCERS, TABLE_8, USERS

ISSUE_KEYS = {"id", "name", "map_pixels", "area_m2", "area_m2_ci95", "users_accuracy", "users_accuracy_ci95",
              "producers_accuracy", "producers_accuracy_ci95"}


def _paper_map(class_map: Callable[..., Path]) -> tuple[Path, list[tuple[int, int]]]:
    """The paper's map: 10,000,000 pixels of 30 m in four bands of rows (200,000 / 150,000 / 3,200,000 /
    6,450,000 pixels); returns it and each class's row range."""
    rows = [80, 60, 1280, 2580]  # x 2500 columns
    data = np.repeat(np.arange(1, 5, dtype=np.uint8), rows)[:, None].repeat(2500, axis=1)
    path = class_map(data, dict(zip(range(1, 5), CLASSES, strict=True)), name="change.classes.tif",
                     transform=from_origin(600_000.0, 4_000_000.0, 30.0, 30.0), crs="EPSG:32619", tiled=True,
                     blockxsize=512, blockysize=512, compress="deflate")
    edges = np.concatenate([[0], np.cumsum(rows)])
    return path, [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def test_the_papers_example_through_the_files(class_map: Callable[..., Path], tmp_path: Path) -> None:
    """Points drawn in each stratum and labelled as Table 8 says give page 54's accuracies and areas."""
    path, bands = _paper_map(class_map)
    rng = np.random.default_rng(0)
    records = []
    for i, (r0, r1) in enumerate(bands):
        n_i = sum(TABLE_8[i])
        flat = rng.choice((r1 - r0) * 2500, size=n_i, replace=False)
        refs = np.repeat(np.arange(1, 5), TABLE_8[i])
        for f, ref in zip(flat, refs, strict=True):
            row, col = r0 + f // 2500, f % 2500
            records.append({"reference": CLASSES[ref - 1] if ref % 2 else str(ref),  # names and ids both work
                            "geometry": Point(600_000 + (col + 0.5) * 30, 4_000_000 - (row + 0.5) * 30)})
    points = gpd.GeoDataFrame(records, crs="EPSG:32619")
    points.to_file(tmp_path / "points.gpkg")
    res = assess(path, tmp_path / "points.gpkg", "reference", tmp_path / "out")
    assert res.json_path == tmp_path / "out" / "change.assessment.json"
    rec = json.loads(res.json_path.read_text())
    assert rec["error_matrix"]["counts"] == TABLE_8
    assert (round(rec["overall_accuracy"], 2), round(rec["overall_accuracy_ci95"], 2)) == OVERALL
    classes = rec["classes"]
    assert [c["name"] for c in classes] == CLASSES
    assert [c["map_pixels"] for c in classes] == [200_000, 150_000, 3_200_000, 6_450_000]
    assert [(round(c["users_accuracy"], 2), round(c["users_accuracy_ci95"], 2)) for c in classes] == USERS
    assert [(round(c["producers_accuracy"], 2), round(c["producers_accuracy_ci95"], 2)) for c in classes] == PRODUCERS
    assert [(round(c["area_ha"]), round(c["area_ha_ci95"])) for c in classes] == AREAS_HA
    assert [(round(c["area_m2"] / 1e4), round(c["area_m2_ci95"] / 1e4)) for c in classes] == AREAS_HA
    assert rec["points_left_out"] == [] and rec["points_used"] == 640


def _labelled(class_map: Callable[..., Path], tmp_path: Path, n: int = 150) -> tuple[Path, Path, np.ndarray]:
    data = random_map()
    path = class_map(data, {1: "water", 2: "forest", 3: "crop", 4: "urban"})
    res = sample_points(path, tmp_path / "points.gpkg", n, allocation="min:20", seed=5)
    return path, res.path, data


def test_a_perfect_reference(class_map: Callable[..., Path], tmp_path: Path) -> None:
    path, points, data = _labelled(class_map, tmp_path)
    pts = gpd.read_file(points)
    pts["reference"] = pts["class_id"].astype(str)
    pts.to_file(points)
    rec = assess(path, points, output_dir=tmp_path).record
    assert rec["overall_accuracy"] == 1 and rec["overall_accuracy_ci95"] == 0
    for c in rec["classes"]:
        assert set(c) >= ISSUE_KEYS
        assert c["users_accuracy"] == c["producers_accuracy"] == 1
        assert c["area_m2"] == pytest.approx(4.0 * (data == c["id"]).sum()) == c["map_area_m2"]
        assert c["area_m2_ci95"] == 0 and c["area_ha"] == pytest.approx(c["area_m2"] / 1e4)
    assert {"overall_accuracy", "overall_accuracy_ci95", "classes"} <= set(rec)


def test_points_left_out_are_named(class_map: Callable[..., Path], tmp_path: Path,
                                   caplog: pytest.LogCaptureFixture) -> None:
    path, points, data = _labelled(class_map, tmp_path)
    pts = gpd.read_file(points)
    pts["reference"] = pts["class_id"].astype(str)
    pts.loc[0, "reference"] = None
    pts.loc[1, "reference"] = "lava"
    pts.loc[2, "reference"] = "9"
    pts.loc[3, "geometry"] = Point(0, 0)  # outside the map
    pts.loc[4, "geometry"] = Point(500_000 + 5, 5_100_000 - 5)  # the nodata corner
    pts.loc[5, "reference"] = "Forest"  # a name, any case
    pts.loc[6, "geometry"] = LineString([(500_100, 5_099_900), (500_110, 5_099_900)])
    pts.to_file(tmp_path / "edited.gpkg")
    with caplog.at_level(logging.WARNING, logger="geoseg"):
        res = assess(path, tmp_path / "edited.gpkg", output_dir=tmp_path / "out")
    reasons = {s.point: s.reason for s in res.skipped}
    assert reasons == {
        "1": "no reference class in column 'reference'",
        "2": "reference class 'lava' is not a class of the map (ids 1, 2, 3, 4)",
        "3": "reference class '9' is not a class of the map (ids 1, 2, 3, 4)",
        "4": "outside the map", "5": "on nodata (no map class there)",
        "7": "its geometry is LineString, not a point",
    }
    lines = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(lines) == 6 and all(m.startswith(str(tmp_path / "edited.gpkg")) for m in lines)
    rec = json.loads(res.json_path.read_text())
    assert [s["point"] for s in rec["points_left_out"]] == ["1", "2", "3", "4", "5", "7"]
    assert rec["points_used"] == len(pts) - 6
    md = res.markdown_path.read_text()
    assert "- point 4: outside the map" in md and "Overall accuracy" in md
    csv = res.csv_path.read_text().splitlines()
    assert csv[0].startswith("id,name,map_pixels,map_area_m2,area_m2,area_m2_ci95") and len(csv) == 5
    assert res.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_points_in_another_crs_are_reprojected(class_map: Callable[..., Path], tmp_path: Path) -> None:
    path, points, data = _labelled(class_map, tmp_path)
    pts = gpd.read_file(points)
    pts["reference"] = pts["class_name"]
    pts.to_crs("EPSG:4326").to_file(tmp_path / "wgs84.geojson")
    rec = assess(path, tmp_path / "wgs84.geojson", output_dir=tmp_path / "o").record
    assert rec["points_left_out"] == [] and rec["overall_accuracy"] == 1


def test_a_geographic_map_has_geodesic_areas(class_map: Callable[..., Path], tmp_path: Path) -> None:
    data = np.ones((100, 100), dtype=np.uint8)
    data[:, 50:] = 2
    path = class_map(data, {1: "forest", 2: "non-forest"}, crs="EPSG:4326",
                     transform=from_origin(-60.0, -3.0, 1e-3, 1e-3))
    pts = gpd.read_file(sample_points(path, tmp_path / "p.gpkg", 40, seed=1).path)
    pts["reference"] = pts["class_id"].astype(str)
    pts.to_file(tmp_path / "p.gpkg")
    rec = assess(path, tmp_path / "p.gpkg", output_dir=tmp_path).record
    assert rec["area_method"] == "geodesic"
    # 0.1 x 0.1 degree at 3 S: about 11.1 km x 11.1 km
    assert rec["map_area_m2"] == pytest.approx(111_320 * 0.1 * 110_574 * 0.1 * np.cos(np.radians(3.05)), rel=0.01)
    assert sum(c["area_m2"] for c in rec["classes"]) == pytest.approx(rec["map_area_m2"])


def test_bad_inputs_are_refused_and_nothing_is_written(class_map: Callable[..., Path], tmp_path: Path) -> None:
    path, points, data = _labelled(class_map, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="has no column 'ref' \\(columns: point_id, class_id"):
        assess(path, points, "ref", out)
    with pytest.raises(InputError, match="no point has both a map class and a reference class"):
        assess(path, points, "reference", out)  # nothing filled in yet
    with pytest.raises(InputError, match="no such file"):
        assess(path, tmp_path / "absent.gpkg", "reference", out)
    (tmp_path / "junk.gpkg").write_text("not a geopackage")
    with pytest.raises(InputError, match="cannot be read as vector points"):
        assess(path, tmp_path / "junk.gpkg", "reference", out)
    gpd.GeoDataFrame({"reference": []}, geometry=[], crs="EPSG:32633").to_file(tmp_path / "empty.gpkg")
    with pytest.raises(InputError, match="holds no point"):
        assess(path, tmp_path / "empty.gpkg", "reference", out)
    assert not out.exists() or not list(out.iterdir())
    pts = gpd.read_file(points)
    pts["reference"] = pts["class_id"].astype(str)
    pts.to_file(points)
    assess(path, points, "reference", out)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        assess(path, points, "reference", out)
    assess(path, points, "reference", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [f"map.assessment.{k}" for k in ("csv", "json", "md", "png")]


def test_output_stem() -> None:
    assert output_stem("out/scene.classes.tif") == "scene"
    assert output_stem("/data/map.tif") == "map"
    assert output_stem(".classes.tif") == ".classes"
