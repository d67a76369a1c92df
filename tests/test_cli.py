import json
import subprocess
import sys

import numpy as np
import rasterio
from click.testing import CliRunner

from geoseg.cli import main
from tests.conftest import make_bundle, write_raster


def test_predict_info_and_report(tmp_path):
    model = make_bundle(tmp_path / "m")
    scene = write_raster(tmp_path / "s.tif", np.random.default_rng(0).normal(size=(3, 90, 120)).astype(np.float32))
    report = tmp_path / "run.json"
    res = CliRunner().invoke(main, ["predict", str(scene), "--model", str(model), "-o", str(tmp_path / "out"),
                                    "--probabilities", "--report", str(report), "--workers", "2"])
    assert res.exit_code == 0, res.output
    assert "s.classes.tif" in res.output and "MPix/s" in res.output
    rep = json.loads(report.read_text())
    assert set(rep["stage_seconds"]) == {"read", "model", "blend", "write", "cog", "vectorize"}
    assert rep["versions"]["gdal"] and rep["peak_memory_mb"] > 0 and rep["mpix_per_s"] > 0
    assert rep["outputs"][0]["probabilities"].endswith("s.probs.tif")
    with rasterio.open(tmp_path / "out" / "s.classes.tif") as ds:
        assert ds.count == 1
    res = CliRunner().invoke(main, ["info", str(scene)])
    assert res.exit_code == 0 and "120 x 90 pixels, 3 band(s) of float32" in res.output and "EPSG:32633" in res.output
    res = CliRunner().invoke(main, ["info", str(model), "--json"])
    assert json.loads(res.output)["kind"] == "model bundle"
    res = CliRunner().invoke(main, ["info", str(model)])  # readable: classes as a table, a few lines
    assert res.exit_code == 0 and "class 2" in res.output and "#" in res.output
    assert max(len(line) for line in res.output.splitlines()) < 120


def test_errors_are_one_line_with_non_zero_exit(tmp_path):
    model = make_bundle(tmp_path / "m")
    one = write_raster(tmp_path / "one.tif", np.zeros((1, 10, 10), np.uint8))
    res = CliRunner().invoke(main, ["predict", str(one), "--model", str(model), "-o", str(tmp_path / "o")])
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "one.tif" in lines[0] and "--bands" in lines[0]
    res = CliRunner().invoke(main, ["predict", str(one), "--model", str(model), "--bands", "0,1"])
    assert res.exit_code == 2 and "start at 1" in res.output
    res = CliRunner().invoke(main, ["predict", str(tmp_path / "missing.tif"), "--model", str(model)])
    assert res.exit_code == 1 and "missing.tif: no such file" in res.output
    res = CliRunner().invoke(main, ["predict", str(one), "--model", str(tmp_path / "nomodel")])
    assert res.exit_code == 1 and "no such model bundle" in res.output


def test_help_does_not_import_torch():
    code = "import sys; from geoseg.cli import main; sys.argv=['geoseg','--help']\n" \
           "try:\n main()\nexcept SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_predict_writes_polygons_by_default_and_vectorize_command(tmp_path):
    import pyogrio

    model = make_bundle(tmp_path / "m")
    data = np.zeros((3, 64, 80), np.float32)
    data[0, :, :40] = 1.0  # class 1 on the left, class 2 on the right
    data[1, :, 40:] = 1.0
    scene = write_raster(tmp_path / "s.tif", data)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["-q", "predict", str(scene), "--model", str(model), "-o", str(out)])
    assert res.exit_code == 0, res.output
    gdf = pyogrio.read_dataframe(out / "s.gpkg")
    assert sorted(gdf["class_id"]) == [1, 2] and sorted(gdf["class_name"]) == ["class 1", "class 2"]
    assert gdf.crs.to_epsg() == 32633
    np.testing.assert_allclose(sorted(gdf["area_m2"]), [40 * 64 * 4.0] * 2)
    res = CliRunner().invoke(main, ["-q", "predict", str(scene), "--model", str(model), "-o", str(tmp_path / "o2"),
                                    "--no-vector"])
    assert res.exit_code == 0 and not list((tmp_path / "o2").glob("*.gpkg"))
    res = CliRunner().invoke(main, ["vectorize", str(out / "s.classes.tif"), str(tmp_path / "v.geojson"),
                                    "--skip-class", "1"])
    assert res.exit_code == 0, res.output
    gj = pyogrio.read_dataframe(tmp_path / "v.geojson")
    assert list(gj["class_id"]) == [2] and gj.crs.to_epsg() == 4326
    res = CliRunner().invoke(main, ["vectorize", str(out / "s.classes.tif"), str(tmp_path / "v.geojson")])
    assert res.exit_code == 1 and "--overwrite" in res.output
    assert "another DST" in res.output and "--output-dir" not in res.output  # vectorize has no --output-dir


def test_predict_scene_without_model_uses_env_then_project_file(tmp_path, monkeypatch):
    """The card's `geoseg predict scene.tif`: --model, else GEOSEG_MODEL, else ./geoseg.yaml's model."""
    from geoseg.predict.jobfile import write_project

    model = make_bundle(tmp_path / "m")
    other = make_bundle(tmp_path / "other", n_classes=3, seed=1)
    scene = write_raster(tmp_path / "s.tif", np.random.default_rng(0).normal(size=(3, 40, 50)).astype(np.float32))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("GEOSEG_MODEL", raising=False)
    res = CliRunner().invoke(main, ["predict", str(scene)])
    assert res.exit_code == 1 and "GEOSEG_MODEL" in res.output and "geoseg demo" in res.output
    assert len([ln for ln in res.output.splitlines() if ln.strip()]) == 1
    assert not list(work.iterdir())  # nothing written

    assert write_project(model) == work / "geoseg.yaml"
    assert write_project(other) is None  # an existing project file is kept
    (work / "geoseg.yaml").write_text((work / "geoseg.yaml").read_text() + "output_dir: maps\noptions:\n  vector_format: geojson\n")
    res = CliRunner().invoke(main, ["predict", str(scene)])
    assert res.exit_code == 0, res.output
    assert (work / "maps" / "s.classes.tif").exists() and (work / "maps" / "s.geojson").exists()

    monkeypatch.setenv("GEOSEG_MODEL", str(other))  # the environment wins over the project file
    res = CliRunner().invoke(main, ["predict", str(scene), "-o", "env", "--no-vector", "--report", "r.json"])
    assert res.exit_code == 0, res.output
    assert str(other) in (work / "r.json").read_text()
    (work / "geoseg.yaml").write_text("model: m\nsurprise: 1\n")
    res = CliRunner().invoke(main, ["predict", str(scene), "--model", str(model)])
    assert res.exit_code == 1 and "geoseg.yaml" in res.output and "surprise" in res.output
