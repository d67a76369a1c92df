"""What GIS users see beside every class map: a quicklook picture, and a raster attribute table that
gdalinfo, QGIS and ArcGIS read (class names, colours, exact pixel counts and areas)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.cli import main
from tests.conftest import make_bundle, write_raster


def _scene(tmp_path):
    """Class 1 on the left, 2 in the middle, 3 on the right (the identity 1x1 model), a nodata corner."""
    data = np.zeros((3, 300, 400), np.float32)
    data[0, :, :100] = 1.0
    data[1, :, 100:250] = 1.0
    data[2, :, 250:] = 1.0
    data[:, :50, :60] = -9999
    return write_raster(tmp_path / "s.tif", data, nodata=-9999)


def _predict(tmp_path, *extra):
    model = make_bundle(tmp_path / "m")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["predict", str(_scene(tmp_path)), "-m", str(model), "-o", str(out), "-q",
                                    "--no-vector", *extra])
    assert res.exit_code == 0, res.output
    return out


def test_every_class_map_gets_a_quicklook_with_transparent_nodata(tmp_path):
    import matplotlib.image

    out = _predict(tmp_path)
    png = out / "s.quicklook.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(png)
    assert img.shape[2] == 4 and (img[..., 3] == 0).any() and (img[..., 3] == 1).any()
    manifest = json.loads((out / "geoseg-manifest.json").read_text())
    assert "s.quicklook.png" in manifest["scenes"]["s"]["files"]
    out2 = _predict(tmp_path / "b", "--no-quicklook")
    assert not (out2 / "s.quicklook.png").exists() and (out2 / "s.classes.tif").exists()


def test_the_attribute_table_counts_every_class_exactly(tmp_path):
    out = _predict(tmp_path)
    classes = out / "s.classes.tif"
    with rasterio.open(classes) as ds:
        a = ds.read(1)
        nodata = ds.nodata
    want = {k: int((a == k).sum()) for k in (1, 2, 3)}
    assert want[1] == 300 * 100 - 50 * 60 and want[2] == 300 * 150 and a[0, 0] == nodata
    xml = (out / "s.classes.tif.aux.xml").read_text()
    assert "GDALRasterAttributeTable" in xml and "class 2" in xml
    if shutil.which("gdalinfo") is None:
        pytest.skip("gdalinfo (Debian's gdal-bin) is not installed; .ci/run installs it")
    info = json.loads(subprocess.run(["gdalinfo", "-json", str(classes)], check=True, capture_output=True,
                                     text=True).stdout)
    rat = info["rat"] if "rat" in info else info["bands"][0]["rat"]
    names = [f["name"] for f in rat["fieldDefn"]]
    assert names[:6] == ["Value", "Class_Name", "Red", "Green", "Blue", "Count"] and "Area_m2" in names
    rows = {r["f"][0]: r["f"] for r in rat["row"]}
    assert {k: int(rows[k][5]) for k in (1, 2, 3)} == want
    assert rows[2][1] == "class 2" and rows[2][6] == pytest.approx(want[2] * 4.0)  # 2 m pixels


def test_info_lists_a_class_maps_classes_with_their_share_and_area(tmp_path):
    out = _predict(tmp_path)
    res = CliRunner().invoke(main, ["info", str(out / "s.classes.tif")])
    assert res.exit_code == 0, res.output
    # 27,000 / 45,000 / 45,000 valid pixels of 4 m2: 23.1 %, 38.5 %, 38.5 %; areas in ha
    assert "area (ha)" in res.output
    assert [line.split()[1:] for line in res.output.splitlines() if "class 2" in line] == [
        ["class", "2", "#285ac8", "38.5", "%", "18.0000"]]
    d = json.loads(CliRunner().invoke(main, ["info", "--json", str(out / "s.classes.tif")]).output)
    assert [(c["id"], c["pixels"], c["area_m2"]) for c in d["classes"]] == [
        (1, 27_000, 108_000.0), (2, 45_000, 180_000.0), (3, 45_000, 180_000.0)]
    scene = CliRunner().invoke(main, ["info", "--json", str(tmp_path / "s.tif")]).output
    assert "classes" not in json.loads(scene)  # not a class map


def test_every_scene_gets_a_stac_item_linking_its_outputs(tmp_path):
    pytest.importorskip("pystac")
    import pystac
    import pystac.validation

    model = make_bundle(tmp_path / "m")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["predict", str(_scene(tmp_path)), "-m", str(model), "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    d = json.loads((out / "s.stac.json").read_text())
    pystac.validation.validate_dict({**d, "stac_extensions": []}, pystac.STACObjectType.ITEM)  # core, offline
    item = pystac.Item.from_dict(d)
    p = item.properties
    assert p["proj:code"] == "EPSG:32633" and p["proj:shape"] == [300, 400]
    assert p["proj:transform"] == [2.0, 0.0, 500_000.0, 0.0, -2.0, 5_100_000.0]
    lon0, lat0, lon1, lat1 = item.bbox
    assert 14 < lon0 < lon1 < 16 and 45 < lat0 < lat1 < 47  # UTM 33N, 5100 km north
    assert p["geoseg:model"]["name"] == "tiny" and len(p["geoseg:model"]["digest"]) == 32
    assert p["geoseg:settings"]["tile_size"] == 64
    assert set(item.assets) == {"classes", "style", "attributes", "quicklook", "vector"}
    for asset in item.assets.values():
        assert (out / asset.href).exists(), asset.href
    classes = d["assets"]["classes"]["classification:classes"]
    assert [(c["value"], c["name"], c["title"]) for c in classes] == [
        (1, "class_1", "class 1"), (2, "class_2", "class 2"), (3, "class_3", "class 3")]
    assert "overview" in item.assets["quicklook"].roles


def test_geopackages_are_version_1_2_for_older_gis(tmp_path):
    """GDAL before 3.7 (Debian 12's QGIS 3.22) warns on GeoPackage 1.4 files; geoseg writes 1.2."""
    import sqlite3

    model = make_bundle(tmp_path / "m")
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["predict", str(_scene(tmp_path)), "-m", str(model), "-o", str(out), "-q",
                                    "--no-quicklook"])
    assert res.exit_code == 0, res.output
    with sqlite3.connect(out / "s.gpkg") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 10200
        assert db.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47  # 'GPKG'


def test_attribute_table_areas_keep_every_digit():
    """Areas in the table are to the cm2: a scene of a few km2 at 1 m pixels must not round to 5 digits."""
    from types import SimpleNamespace

    from geoseg.gis.quicklook import rat_aux_xml

    cls = [SimpleNamespace(id=3, name="bare soil", color=(214, 170, 110))]
    xml = rat_aux_xml(cls, {3: 1_684_102}, 0.25)
    assert "<F>1684102</F><F>421025.50</F>" in xml


def test_a_full_disk_geostationary_scene_ends_cleanly_with_the_disk_as_footprint(tmp_path):
    """GOES full disk: the scene's corners are off the Earth, so its outline cannot go to WGS 84."""
    from rasterio.transform import from_bounds

    r, n = 5_434_894.885, 128  # GOES ABI full-disk half extent, metres on the sweep-x geostationary grid
    yy, xx = np.mgrid[0:n, 0:n]
    on_disk = (xx - n / 2 + 0.5) ** 2 + (yy - n / 2 + 0.5) ** 2 < (n / 2 * 0.95) ** 2
    data = np.zeros((3, n, n), np.float32)
    data[0, :, : n // 2], data[1, :, n // 2:] = 1.0, 1.0
    data[:, ~on_disk] = -9999
    scene = write_raster(tmp_path / "goes.tif", data, nodata=-9999, crs="+proj=geos +h=35786023 +lon_0=-75 +sweep=x",
                         transform=from_bounds(-r, -r, r, r, n, n))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["predict", str(scene), "-m", str(make_bundle(tmp_path / "m")), "-o", str(out),
                                    "-q"])
    assert res.exit_code == 0, res.output
    item = json.loads((out / "goes.stac.json").read_text())
    west, south, east, north = item["bbox"]
    assert -160 < west < -145 and -5 < east < 10 and -80 < south < -60 and 60 < north < 80  # the disk, lon_0 -75
    assert item["geometry"]["type"] in ("Polygon", "MultiPolygon")
    with rasterio.open(out / "goes.classes.tif") as ds:
        assert (ds.read(1)[on_disk] != ds.nodata).all()
    assert (out / "goes.gpkg").exists()


def test_a_scene_wholly_off_the_earth_gets_no_footprint_and_a_warning(tmp_path, caplog):
    from rasterio.transform import from_bounds

    from geoseg.gis.stac_item import _footprint
    from geoseg.io.raster import inspect_scene

    space = write_raster(tmp_path / "space.tif", np.zeros((1, 8, 8), np.uint8), crs="+proj=geos +h=35786023 "
                         "+lon_0=-75 +sweep=x", transform=from_bounds(5.6e6, 5.6e6, 6e6, 6e6, 8, 8))
    with caplog.at_level("WARNING", logger="geoseg.gis.stac_item"):
        assert _footprint(inspect_scene(space)) == (None, None)
    assert "no geometry" in caplog.text
