"""``geoseg sample`` and ``geoseg assess`` on the command line: the README's workflow on a demo-like map
whose truth raster labels the sample, a real land-use map, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.cli import main
from tests.assess.conftest import write_class_map


def _run(*args: str) -> object:
    return CliRunner().invoke(main, list(args))


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[int, str]]:
    """The demo's synthetic scene's truth (5 classes, a nodata corner) and a map of it with the errors a
    model makes: roads missed as vegetation, bare soil and vegetation confused in patches."""
    from geoseg.learn.synthetic import CLASSES, make_scene

    folder = tmp_path_factory.mktemp("demo")
    scene = make_scene(folder / "scene.tif", folder / "scene.labels.tif", 512, seed=3)
    with rasterio.open(scene.labels) as ds:
        truth, profile = ds.read(1), ds.profile
    rng = np.random.default_rng(0)
    patches = np.kron(rng.random((33, 33)), np.ones((16, 16)))[:512, :512]
    mapped = truth.copy()
    mapped[(truth == 5) & (patches < 0.6)] = 2
    mapped[(truth == 3) & (patches > 0.8)] = 2
    mapped[(truth == 2) & (patches < 0.1)] = 3
    mapped[truth == 0] = 255
    names = {c.id: c.name for c in CLASSES}
    path = write_class_map(folder / "scene.classes.tif", mapped.astype(np.uint8), names, nodata=255,
                           crs=profile["crs"].to_string(), transform=profile["transform"])
    return path, scene.labels, names


def test_readme_workflow_on_a_demo_like_map(demo_like: tuple[Path, Path, dict[int, str]], tmp_path: Path) -> None:
    """map -> sample labelled from the truth (--label-from) -> assess: the estimated areas' intervals hold the
    truth's areas, where the map's own pixel counts are off."""
    classes, truth, names = demo_like
    points = tmp_path / "points.gpkg"
    res = _run("sample", str(classes), "-n", "1500", "--allocation", "min:50", "--seed", "1", "--label-from",
               str(truth), "--output", str(points))
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    assert "1500 points (min:50, seed 1)" in res.output  # type: ignore[attr-defined]
    assert f"reference filled from {truth} for 1500 of 1500 points" in res.output  # type: ignore[attr-defined]
    pts = gpd.read_file(points)
    with rasterio.open(truth) as ds:  # what an interpreter reading the truth would write
        values = [int(v[0]) for v in ds.sample(list(zip(pts.geometry.x, pts.geometry.y, strict=True)))]
    assert pts["reference"].tolist() == [str(v) for v in values]
    res = _run("assess", str(classes), "--reference", str(points), "--reference-column", "reference",
               "--output-dir", str(tmp_path / "out"))
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    assert "Overall accuracy" in res.output and "scene.assessment.json" in res.output  # type: ignore[attr-defined]
    rec = json.loads((tmp_path / "out" / "scene.assessment.json").read_text())
    with rasterio.open(truth) as ds:
        t = ds.read(1)
    true_m2 = {c: float((t == c).sum()) for c in names}  # 1 m pixels
    covered = 0
    for c in rec["classes"]:
        err = abs(c["area_m2"] - true_m2[c["id"]])
        assert err <= 1.5 * c["area_m2_ci95"], c  # within 3 standard errors
        covered += err <= c["area_m2_ci95"]
    assert covered >= 4
    roads = next(c for c in rec["classes"] if c["name"] == "roads")
    assert roads["map_area_m2"] < true_m2[5] - roads["area_m2_ci95"]  # the map misses roads ...
    assert abs(roads["area_m2"] - true_m2[5]) < true_m2[5] - roads["map_area_m2"]  # ... the estimate less so
    assert all((tmp_path / "out" / f"scene.assessment.{k}").is_file() for k in ("json", "md", "csv", "png"))


def test_sample_target_se_and_a_real_land_use_map(real_data: Path, tmp_path: Path) -> None:
    """The Slovenian land-use raster (classes 1, 2, 3, 4, 8; nodata 0; EPSG:32633) as a class map, labelled by
    itself: every point on its class, a perfect assessment."""
    lulc = real_data / "slovenia_lulc" / "LULC_from_npy.tif"
    points = tmp_path / "lulc.gpkg"
    res = _run("sample", str(lulc), "--target-se", "0.02", "--expected-accuracy", "0.85", "--allocation", "min:5",
               "--seed", "4", "--label-from", str(lulc), "--output", str(points))
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    assert "eq. 13:" in res.output  # type: ignore[attr-defined]
    pts = gpd.read_file(points)
    assert 0 < len(pts) <= 100 * 101 and set(pts["class_id"]) == {1, 2, 3, 4, 8}
    assert (pts["class_id"].astype(str) == pts["reference"]).all()
    res = _run("assess", str(lulc), "-r", str(points), "-o", str(tmp_path))
    assert res.exit_code == 0, res.output  # type: ignore[attr-defined]
    rec = json.loads((tmp_path / "LULC_from_npy.assessment.json").read_text())
    assert rec["overall_accuracy"] == 1.0 and rec["overall_accuracy_ci95"] == 0.0


def test_errors_are_one_line_with_non_zero_exit(demo_like: tuple[Path, Path, dict[int, str]], tmp_path: Path) -> None:
    classes, truth, names = demo_like
    points = tmp_path / "p.gpkg"
    cases = [
        (("sample", str(classes), "--output", str(points)), "give the sample size (-n N)"),
        (("sample", str(classes), "-n", "10", "--allocation", "stratified", "--output", str(points)),
         "unknown allocation 'stratified'"),
        (("sample", str(classes), "-n", "10", "--allocation", "min:9", "--output", str(points)),
         "fewer points than the 45"),
        (("sample", str(classes), "-n", "10", "--target-se", "2", "--output", str(points)), "--target-se 2.0"),
        (("sample", str(tmp_path / "nope.tif"), "-n", "10", "--output", str(points)), "no such file"),
        (("sample", str(truth.parent / "scene.tif"), "-n", "10", "--output", str(points)), "has 3 bands"),
        (("sample", str(classes), "-n", "10", "--label-from", str(truth.parent / "scene.tif"), "--output",
          str(points)), f"--label-from {truth.parent / 'scene.tif'}: has 3 bands; give a one-band raster"),
        (("sample", str(classes), "-n", "10", "--label-from", str(tmp_path / "nope.tif"), "--output", str(points)),
         f"--label-from {tmp_path / 'nope.tif'}: no such file"),
        (("assess", str(classes), "--reference", str(tmp_path / "nope.gpkg")), "no such file"),
    ]
    for args, message in cases:
        res = _run(*args)
        assert res.exit_code == 1, (args, res.output)  # type: ignore[attr-defined]
        out = res.output.strip().splitlines()  # type: ignore[attr-defined]
        assert out[-1].startswith("Error: ") and message in out[-1], (args, out)
    assert not points.exists()
    assert _run("sample", str(classes), "-n", "20", "--seed", "1", "--output", str(points)).exit_code == 0  # type: ignore[attr-defined]
    res = _run("sample", str(classes), "-n", "20", "--output", str(points))
    assert res.exit_code == 1 and "already exists; pass --overwrite" in res.output  # type: ignore[attr-defined]
    res = _run("assess", str(classes), "--reference", str(points), "--reference-column", "label", "-o", str(tmp_path))
    assert res.exit_code == 1 and "has no column 'label'" in res.output  # type: ignore[attr-defined]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.gpkg"]
    res = _run("sample", "--help")
    assert res.exit_code == 0 and "--allocation" in res.output and "--label-from" in res.output  # type: ignore[attr-defined]
