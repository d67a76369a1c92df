"""STAC Items and band files as scenes: assets chosen by the model's band names, stacked virtually (a VRT)
onto the finest grid, read locally, over loopback HTTP and on the loopback S3; the same class-map bytes as
the same bands stacked by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from click.testing import CliRunner
from rasterio.enums import Resampling
from rasterio.transform import from_origin

from geoseg.cli import main
from geoseg.errors import InputError
from geoseg.io.stac_scenes import choose_assets, is_stac, read_items, stack_scenes
from geoseg.model.contract import InputSpec
from geoseg.predict.api import predict_scenes
from tests.conftest import make_bundle

BANDS = ["blue", "B03", "nir"]  # matched by eo:bands common name, by eo:bands name, by asset key
ORIGIN = (500_000.0, 5_100_000.0)
ROWS, COLS = 192, 256  # at 5 m; the nir band is 10 m
DATETIME = "2024-06-11T10:20:31.024000Z"


def _cog(path: Path, data: np.ndarray, res: float, nodata: float | None = 0) -> Path:
    """A one-band COG in UTM 33N at ``res`` metres."""
    tmp = path.with_suffix(".tmp.tif")
    with rasterio.open(tmp, "w", driver="GTiff", width=data.shape[1], height=data.shape[0], count=1,
                       dtype=data.dtype.name, crs="EPSG:32633", transform=from_origin(*ORIGIN, res, res),
                       nodata=nodata, tiled=True, blockxsize=64, blockysize=64) as ds:
        ds.write(data, 1)
    rasterio.shutil.copy(tmp, path, driver="COG", BLOCKSIZE=128)
    tmp.unlink()
    return path


def _item(folder: Path, item_id: str = "S2X_33TWN_20240611", seed: int = 0) -> Path:
    """A Sentinel-2-style Item: blue and green at 5 m, nir at 10 m, a thumbnail, a metadata file."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    smooth = rng.integers(200, 4000, (3, ROWS // 8, COLS // 8)).repeat(8, 1).repeat(8, 2)
    noise = rng.integers(0, 2000, (3, ROWS, COLS))
    bands = (smooth + noise).astype(np.uint16)
    bands[:, :10, :12] = 0  # a nodata corner
    _cog(folder / "B02.tif", bands[0], 5.0)
    _cog(folder / "B03.tif", bands[1], 5.0)
    _cog(folder / "B08.tif", bands[2, ::2, ::2].copy(), 10.0)
    (folder / "thumb.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (folder / "meta.xml").write_text("<xml/>")
    cog = "image/tiff; application=geotiff; profile=cloud-optimized"
    item = {
        "type": "Feature", "stac_version": "1.0.0", "id": item_id,
        "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json"],
        "geometry": None, "properties": {"datetime": DATETIME},
        "links": [],
        "assets": {
            "thumbnail": {"href": "./thumb.png", "type": "image/png", "roles": ["thumbnail"]},
            "blue": {"href": "./B02.tif", "type": cog, "roles": ["data"],
                     "eo:bands": [{"name": "B02", "common_name": "blue"}]},
            "green": {"href": "./B03.tif", "type": cog, "roles": ["data"],
                      "eo:bands": [{"name": "B03", "common_name": "green"}]},
            "nir": {"href": "./B08.tif", "type": cog, "roles": ["data"]},  # its key says the band
            "granule_metadata": {"href": "./meta.xml", "type": "application/xml", "roles": ["metadata"]},
        },
    }
    path = folder / f"{item_id}.json"
    path.write_text(json.dumps(item))
    return path


def _by_hand(folder: Path, dst: Path, resampling: Resampling) -> Path:
    """The item's bands stacked by hand at 5 m: each read into the 5 m shape with ``resampling``."""
    planes = []
    dst.parent.mkdir(parents=True, exist_ok=True)
    for name in ("B02", "B03", "B08"):
        with rasterio.open(folder / f"{name}.tif") as ds:
            planes.append(ds.read(1, out_shape=(ROWS, COLS), resampling=resampling))
    with rasterio.open(dst, "w", driver="GTiff", width=COLS, height=ROWS, count=3, dtype="uint16", nodata=0,
                       crs="EPSG:32633", transform=from_origin(*ORIGIN, 5.0, 5.0)) as ds:
        ds.write(np.stack(planes))
    return dst


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    inputs = InputSpec(bands=BANDS, band_indexes=[4, 3, 8], mean=[1500.0] * 3, std=[800.0] * 3)
    return make_bundle(tmp_path_factory.mktemp("b") / "model", n_bands=3, n_classes=3, chip=64, overlap=16,
                       input=inputs)


def _classes(folder: Path, stem: str) -> bytes:
    return (folder / f"{stem}.classes.tif").read_bytes()


OPTS: dict[str, Any] = {"vector_format": None, "device": "cpu", "workers": 2}


# ------------------------------------------------------------------------------------------ choosing assets


def test_assets_are_chosen_by_common_name_then_band_name_then_key(tmp_path: Path) -> None:
    item = json.loads(_item(tmp_path).read_text())
    chosen = choose_assets(item, BANDS, str(tmp_path / "item.json"))
    assert [(a.input, a.asset, a.band, a.matched_by) for a in chosen] == [
        ("blue", "blue", 1, "common name"), ("B03", "green", 1, "band name"), ("nir", "nir", 1, "asset key")]
    assert chosen[2].href == str(tmp_path / "B08.tif")
    # a single-band data asset wins over a multi-band picture with the same common name
    item["assets"] = {"visual": {"href": "./tci.tif", "type": "image/tiff", "roles": ["visual"],
                                 "eo:bands": [{"common_name": c} for c in ("red", "green", "blue")]}, **item["assets"]}
    assert choose_assets(item, ["green"])[0].asset == "green"
    assert (choose_assets(item, ["red"])[0].asset, choose_assets(item, ["red"])[0].band) == ("visual", 1)
    # STAC 1.1 bands with eo:common_name
    item["assets"]["blue"] = {"href": "./B02.tif", "type": "image/tiff",
                              "bands": [{"name": "B02", "eo:common_name": "blue"}]}
    assert choose_assets(item, ["BLUE"])[0].asset == "blue"


def test_a_band_no_asset_gives_is_one_line_naming_the_bands_and_the_assets(tmp_path: Path) -> None:
    item = json.loads(_item(tmp_path).read_text())
    with pytest.raises(InputError) as err:
        choose_assets(item, ["blue", "swir16", "thumbnail"], "item.json")
    text = str(err.value)
    assert "\n" not in text and text.startswith("item.json: no asset gives the model's band(s) swir16, thumbnail")
    assert "the model needs blue, swir16, thumbnail" in text and "blue (blue), green (green), nir" in text
    assert "granule_metadata" not in text  # only raster assets of the scene's bands


def test_is_stac_and_read_items_of_a_collection(tmp_path: Path) -> None:
    a, b = (json.loads(_item(tmp_path / n, n).read_text()) for n in ("A", "B"))
    (tmp_path / "col.json").write_text(json.dumps({"type": "FeatureCollection", "features": [a, b]}))
    assert is_stac("s3://b/x/item.JSON") and is_stac("https://h/i.json?sig=1") and not is_stac("a.tif")
    assert is_stac("https://earth-search.aws.element84.com/v1/collections/sentinel-2-l2a/items/S2B_33TWN_20240611_0_L2A")
    assert not is_stac("https://h/collections/c/items/x.tif")
    assert [w for w, _ in read_items(str(tmp_path / "col.json"))] == [f"{tmp_path}/col.json#A",
                                                                        f"{tmp_path}/col.json#B"]
    (tmp_path / "cat.json").write_text(json.dumps({"type": "Catalog", "id": "c", "links": []}))
    with pytest.raises(InputError, match=r"cat.json: is a STAC Catalog; give a STAC Item or ItemCollection"):
        read_items(str(tmp_path / "cat.json"))


def test_the_cli_offers_the_stacks_resamplings() -> None:
    from geoseg.console.options import RESAMPLING as CLI
    from geoseg.io.vrt import RESAMPLING

    assert tuple(CLI) == RESAMPLING


# ------------------------------------------------------------------------------------------ the stack


@pytest.mark.parametrize("resampling", ["nearest", "bilinear"])
def test_the_stack_reads_as_the_bands_stacked_by_hand(tmp_path: Path, resampling: str) -> None:
    src = _item(tmp_path / "item")
    [stack] = stack_scenes([str(src)], BANDS, str(tmp_path / "out"), resampling=resampling)
    assert stack.error is None and stack.band_indexes == (1, 2, 3)
    assert stack.scene == str(tmp_path / "out" / ".geoseg-scenes" / "S2X_33TWN_20240611.vrt")
    hand = _by_hand(tmp_path / "item", tmp_path / "hand.tif", Resampling[resampling])
    with rasterio.open(stack.scene) as vrt, rasterio.open(hand) as ref:
        assert (vrt.width, vrt.height, vrt.transform, vrt.crs) == (ref.width, ref.height, ref.transform, ref.crs)
        assert vrt.descriptions == tuple(BANDS) and vrt.nodata == 0
        assert np.array_equal(vrt.read(), ref.read())
        assert vrt.tags()["TIFFTAG_DATETIME"] == "2024:06:11 10:20:31"
    text = Path(stack.scene).read_text()
    assert "thumb.png" not in text and "meta.xml" not in text  # nothing but the model's bands


def test_resolution_sets_the_grid(tmp_path: Path) -> None:
    src = _item(tmp_path / "item")
    [stack] = stack_scenes([str(src)], BANDS, str(tmp_path / "out"), resolution=10.0)
    with rasterio.open(stack.scene) as vrt:
        assert (vrt.width, vrt.height, vrt.res) == (COLS // 2, ROWS // 2, (10.0, 10.0))


# ------------------------------------------------------------------------------------------ predict


@pytest.mark.parametrize("resampling", ["nearest", "bilinear"])
def test_an_item_gives_the_class_map_bytes_of_its_bands_stacked_by_hand(tmp_path: Path, model: Path,
                                                                          resampling: str) -> None:
    """The aim: an Item predicted through its per-band assets (5 m and 10 m) gives the same class-map bytes
    as the same bands stacked by hand at 5 m with the same resampling."""
    src = _item(tmp_path / "item")
    hand = _by_hand(tmp_path / "item", tmp_path / "hand" / "S2X_33TWN_20240611.tif", Resampling[resampling])
    run = predict_scenes([str(src)], model, tmp_path / "a", resampling=resampling, **OPTS)
    ref = predict_scenes([str(hand)], model, tmp_path / "b", bands=[1, 2, 3], **OPTS)
    assert run.scenes[0].status == "done" and run.scenes[0].band_indexes == [1, 2, 3]
    assert _classes(tmp_path / "a", "S2X_33TWN_20240611") == _classes(tmp_path / "b", "S2X_33TWN_20240611")
    assert ref.scenes[0].status == "done"


def test_predict_item_in_one_command_links_the_item_and_resumes(tmp_path: Path, model: Path) -> None:
    src = _item(tmp_path / "item")
    out = tmp_path / "out"
    args = ["predict", str(src), "-m", str(model), "-o", str(out), "--device", "cpu", "-q", "--no-vector"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    stac = json.loads((out / "S2X_33TWN_20240611.stac.json").read_text())
    assert stac["id"] == "S2X_33TWN_20240611" and stac["properties"]["datetime"] == DATETIME
    assert {"rel": "derived_from", "href": str(src)}.items() <= stac["links"][0].items()
    first = _classes(out, "S2X_33TWN_20240611")
    manifest = json.loads((out / "geoseg-manifest.json").read_text())
    assert list(manifest["scenes"]) == ["S2X_33TWN_20240611"]
    again = predict_scenes([str(src)], model, out, **OPTS)  # the same job again: skipped
    assert again.scenes[0].status == "skipped" and _classes(out, "S2X_33TWN_20240611") == first
    other = predict_scenes([str(src)], model, out, resampling="bilinear", overwrite=True, **OPTS)
    assert other.scenes[0].status == "done"  # other settings: computed again


def test_an_unmatched_band_fails_that_item_alone(tmp_path: Path, model: Path) -> None:
    good = _item(tmp_path / "good", "good")
    bad = _item(tmp_path / "bad", "bad")
    item = json.loads(bad.read_text())
    del item["assets"]["nir"]
    bad.write_text(json.dumps(item))
    run = predict_scenes([str(good), str(bad)], model, tmp_path / "out", **OPTS)
    assert [s.status for s in run.scenes] == ["done", "failed"]
    assert "no asset gives the model's band(s) nir" in (run.scenes[1].error or "")
    with pytest.raises(InputError, match=r"bad.json: no asset gives the model's band\(s\) nir \(the model needs "
                                         r"blue, B03, nir\)"):
        predict_scenes([str(bad)], model, tmp_path / "out2", **OPTS)


def test_band_files_and_an_item_collection_are_scenes(tmp_path: Path, model: Path) -> None:
    src = _item(tmp_path / "item", "T33TWN")
    item = json.loads(src.read_text())
    (tmp_path / "item" / "col.json").write_text(json.dumps({"type": "FeatureCollection", "features": [item]}))
    files = [str(tmp_path / "item" / f"{b}.tif") for b in ("B02", "B03", "B08")]
    a = predict_scenes([str(tmp_path / "item" / "col.json")], model, tmp_path / "a", **OPTS)
    b = predict_scenes([files], model, tmp_path / "b", **OPTS)  # a list of band files is one scene
    assert a.scenes[0].status == b.scenes[0].status == "done"
    assert _classes(tmp_path / "a", "T33TWN") == _classes(tmp_path / "b", "B02")  # no common stem: the first file


def test_an_item_over_http(tmp_path: Path, model: Path, http_folder: Any) -> None:
    folder, base = http_folder
    src = _item(tmp_path / "item")
    shutil.copytree(tmp_path / "item", folder / "item")
    local = predict_scenes([str(src)], model, tmp_path / "a", **OPTS)
    remote = predict_scenes([f"{base}/item/{src.name}"], model, tmp_path / "b", **OPTS)
    assert local.scenes[0].status == remote.scenes[0].status == "done"
    assert "/vsicurl/http://127.0.0.1" in (tmp_path / "b" / ".geoseg-scenes" / "S2X_33TWN_20240611.vrt").read_text()
    assert _classes(tmp_path / "a", "S2X_33TWN_20240611") == _classes(tmp_path / "b", "S2X_33TWN_20240611")


@pytest.fixture
def s3_process(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A moto S3 server in another process, and a fresh bucket on it (yields the bucket's name).

    Not the in-process server of ``s3_env``: a GDAL thread opening the stack's VRT may hold the GIL while
    another waits on the server for a source's bytes, and an in-process server then never answers.
    """
    import socket
    import subprocess
    import sys
    import time

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_S3_ENDPOINT", "AWS_HTTPS",
                     "AWS_VIRTUAL_HOSTING", "AWS_NO_SIGN_REQUEST", "AWS_REGION"):
            monkeypatch.delenv(name, raising=False)
        for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                            ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", endpoint),
                            ("AWS_EC2_METADATA_DISABLED", "true")):
            monkeypatch.setenv(name, value)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        for _ in range(100):
            try:
                client.create_bucket(Bucket="items")
                break
            except Exception:  # not listening yet
                time.sleep(0.1)
        else:
            pytest.skip("moto's S3 server did not start in another process")
        yield "items"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_an_item_on_s3_into_s3(tmp_path: Path, model: Path, s3_process: str) -> None:
    import fsspec

    from geoseg.io.store import s3_storage_options

    bucket = s3_process
    src = _item(tmp_path / "item")
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **s3_storage_options())
    for f in (tmp_path / "item").iterdir():
        fs.put_file(str(f), f"{bucket}/items/{f.name}")
    predict_scenes([str(src)], model, tmp_path / "a", **OPTS)
    remote = predict_scenes([f"s3://{bucket}/items/{src.name}"], model, f"s3://{bucket}/maps", **OPTS)
    assert remote.scenes[0].status == "done", remote.scenes[0].error
    assert fs.cat_file(f"{bucket}/maps/S2X_33TWN_20240611.classes.tif") == _classes(tmp_path / "a", "S2X_33TWN_20240611")
    vrt = fs.cat_file(f"{bucket}/maps/.geoseg-scenes/S2X_33TWN_20240611.vrt").decode()
    assert f"/vsis3/{bucket}/items/B08.tif" in vrt


def test_a_job_file_takes_items_and_band_file_lists(tmp_path: Path, model: Path) -> None:
    src = _item(tmp_path / "item")
    job = tmp_path / "job.yaml"
    job.write_text(f"scenes:\n  - item/{src.name}\n  - [item/B02.tif, item/B03.tif, item/B08.tif]\n"
                   f"model: {model}\noutput_dir: out\noptions:\n  vector_format: null\n  resampling: bilinear\n"
                   "  device: cpu\n")
    r = CliRunner().invoke(main, ["predict", "--job", str(job), "-q"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "out"
    assert _classes(out, "S2X_33TWN_20240611") == _classes(out, "B02")  # the same bands, bilinear both
    assert (out / "job.vrt").exists()  # the job's mosaic of its two scenes


def test_an_item_on_a_cluster_gives_the_bytes_of_threads(tmp_path: Path, model: Path) -> None:
    """Units travel to worker processes: the scene is the VRT's location, which any worker opens."""
    pytest.importorskip("distributed")
    src = _item(tmp_path / "item")
    threads = predict_scenes([str(src)], model, tmp_path / "a", **OPTS)
    cluster = predict_scenes([str(src)], model, tmp_path / "b", scheduler="local:2", unit_rows=512, **OPTS)
    assert threads.scenes[0].status == cluster.scenes[0].status == "done"
    assert cluster.scheduler != "threads"
    assert _classes(tmp_path / "a", "S2X_33TWN_20240611") == _classes(tmp_path / "b", "S2X_33TWN_20240611")
