"""Bad input ends in one line naming the file and the fix, a non-zero exit code and nothing half-written."""

from __future__ import annotations

import os

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner
from rasterio.transform import from_origin

from geoseg.cli import main
from tests.conftest import make_bundle


def _tiled_scene(path, size=1024):
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 5100000, 1, 1), tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate") as ds:
        ds.write(rng.integers(0, 255, (3, size, size), dtype=np.uint8))
    return path


def test_a_truncated_geotiff_fails_in_one_line_naming_the_file_and_window(tmp_path):
    scene = _tiled_scene(tmp_path / "cut.tif")
    data = scene.read_bytes()
    scene.write_bytes(data[: len(data) * 2 // 3])  # header and first tiles intact, the rest gone
    model = make_bundle(tmp_path / "m", n_bands=3, chip=256, overlap=32)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["predict", str(scene), "-m", str(model), "-o", str(out), "--device", "cpu"])
    assert r.exit_code != 0
    line = r.output.strip().splitlines()[-1]
    assert "cut.tif" in line and "cannot read the block at rows" in line and "damaged or truncated" in line, r.output
    import re

    r0, r1, c0, c1 = map(int, re.search(r"rows (\d+)-(\d+), columns (\d+)-(\d+)", line).groups())
    assert r0 % 256 == 0 and c0 % 256 == 0 and (r1 - r0, c1 - c0) == (256, 256), line  # the scene's own block
    assert "Traceback" not in r.output
    leftovers = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not [p for p in leftovers if p.name.startswith("cut.")], leftovers  # nothing under a final name


@pytest.mark.parametrize("args, words", [
    (["--tile-size", "0"], "--tile-size 0: must be a positive number"),
    (["--tile-size", "-64"], "--tile-size -64: must be a positive number"),
    (["--workers", "0"], "--workers 0: must be at least 1"),
    (["--overlap", "-1"], "--overlap -1"),
    (["--overlap", "33"], "--overlap 33: must be between 0 and half the tile size"),
    (["--batch-size", "-2"], "positive whole number of chips, or auto"),
])
def test_out_of_range_options_are_refused(tmp_path, args, words):
    scene = _tiled_scene(tmp_path / "s.tif", size=256)
    model = make_bundle(tmp_path / "m", n_bands=3, chip=64, overlap=16)
    r = CliRunner().invoke(main, ["predict", str(scene), "-m", str(model), "-o", str(tmp_path / "o"), *args])
    assert r.exit_code != 0 and words in r.output, r.output
    assert not os.path.exists(tmp_path / "o" / "s.classes.tif")


def test_an_overwrite_leaves_no_output_of_the_earlier_run_beside_the_new_one(tmp_path):
    scene = _tiled_scene(tmp_path / "s.tif", size=256)
    model = make_bundle(tmp_path / "m", n_bands=3, chip=64, overlap=16)
    out = tmp_path / "o"
    base = ["predict", str(scene), "-m", str(model), "-o", str(out), "--device", "cpu"]
    r = CliRunner().invoke(main, [*base, "--probabilities", "--vector-format", "shp"])
    assert r.exit_code == 0, r.output
    assert (out / "s.probs.tif").exists() and (out / "s.shp").exists() and (out / "s.dbf").exists()
    assert (out / "s.quicklook.png").exists()
    r = CliRunner().invoke(main, [*base, "--overwrite", "--no-quicklook"])
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("s."))
    assert names == ["s.classes.qml", "s.classes.tif", "s.classes.tif.aux.xml", "s.gpkg", "s.stac.json"], names


@pytest.mark.parametrize("name", ["bundle", "bundle.safetensors"])
def test_bundles_are_readable_by_other_users_as_the_umask_allows(tmp_path, name):
    old = os.umask(0o022)
    try:
        path = make_bundle(tmp_path / name, n_bands=3)
    finally:
        os.umask(old)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o777 == 0o644 for p in files), [oct(p.stat().st_mode) for p in files]
    if path.is_dir():
        assert path.stat().st_mode & 0o777 == 0o755


def _multiband(path, count, names=None, alpha=False):
    rng = np.random.default_rng(1)
    with rasterio.open(path, "w", driver="GTiff", width=96, height=80, count=count, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 5100000, 1, 1),
                       photometric="RGB" if alpha else None, alpha="YES" if alpha else None) as ds:
        ds.write(rng.integers(1, 255, (count, 80, 96), dtype=np.uint8))
        for i, n in enumerate(names or []):
            ds.set_band_description(i + 1, n)
    return path


def test_more_scene_bands_than_the_model_takes_needs_an_unambiguous_mapping(tmp_path):
    from geoseg.errors import BundleError
    from geoseg.io.raster import inspect_scene
    from geoseg.model.bundle import read_bundle
    from geoseg.model.preflight import check_scene

    model = make_bundle(tmp_path / "m", n_bands=3, chip=64, overlap=16)
    contract = read_bundle(model).contract  # bands b1, b2, b3
    five = inspect_scene(_multiband(tmp_path / "five.tif", 5))
    with pytest.raises(BundleError, match=r"five.tif: has 5 bands but model .* takes 3 .*--bands"):
        check_scene(contract, five)
    assert check_scene(contract, five, [5, 4, 3]).band_indexes == [5, 4, 3]
    named = inspect_scene(_multiband(tmp_path / "named.tif", 5, ["nir", "B3", "x", "b1", "b2"]))
    pre = check_scene(contract, named)
    assert pre.band_indexes == [4, 5, 2]  # by name, any case
    assert any("band(s) 1,3 are not used" in w for w in pre.warnings)
    rgba = inspect_scene(_multiband(tmp_path / "rgba.tif", 4, alpha=True))
    assert check_scene(contract, rgba).band_indexes == [1, 2, 3]  # the alpha band is a mask, not data
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "five.tif"), "-m", str(model), "-o",
                                  str(tmp_path / "o"), "--device", "cpu"])
    assert r.exit_code != 0 and "--bands" in r.output.strip().splitlines()[-1] and "Traceback" not in r.output


@pytest.mark.parametrize("model, words", [
    ({"architecture": "fpn", "encoder": "resnet18", "params": {"encoder_depth": 3}},
     "gives 3 x 128 x 128 logits for 32 px chips, not 3 x 32 x 32"),
    ({"architecture": "manet", "encoder": "resnet18", "params": {"encoder_depth": 3}}, "decoder_channels"),
    ({"architecture": "unet", "encoder": "resnet19", "params": {}}, "model.encoder 'resnet19'"),
])
def test_a_network_the_config_cannot_build_or_run_is_refused_before_the_run_folder(tmp_path, model, words):
    from geoseg.errors import ConfigError
    from geoseg.learn.train import train
    from tests._training import tiny_config, write_scene

    image, labels = write_scene(tmp_path)
    cfg = tiny_config(image, labels)
    cfg["model"] = model
    with pytest.raises(ConfigError, match=r"model\.") as info:
        train(cfg, tmp_path / "run")
    assert words in str(info.value) and "\n" not in str(info.value)
    if model["encoder"] == "resnet19":
        assert "resnet18" in str(info.value)  # the closest names
    assert not (tmp_path / "run").exists()


def test_an_interrupted_training_says_how_to_resume(tmp_path, monkeypatch):
    import geoseg.learn.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(geoseg.learn.train, "train", interrupted)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("classes: [{id: 1, name: a}, {id: 2, name: b}]\ndata: {scenes: [{image: x.tif, labels: y.tif}]}\n")
    r = CliRunner().invoke(main, ["train", str(cfg), "--output-dir", str(tmp_path / "run")])
    assert r.exit_code == 130 and "--resume" in r.output and "Aborted" not in r.output, r.output


def test_a_class_colour_out_of_range_is_refused_when_the_config_loads(tmp_path):
    from geoseg.errors import ConfigError
    from geoseg.learn.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("classes: [{id: 1, name: a, color: [300, 0, 0]}, {id: 2, name: b}]\n"
                   "data: {scenes: [{image: x.tif, labels: y.tif}]}\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*classes.0.color.*0..255"):
        load_config(cfg)


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    import geoseg.predict.api

    def bug(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(geoseg.predict.api, "predict_scenes", bug)
    scene = _tiled_scene(tmp_path / "s.tif", size=256)
    args = ["predict", str(scene), "-m", str(tmp_path / "m"), "-o", str(tmp_path / "o")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "internal error: ZeroDivisionError: division by zero" in r.output
    assert "--debug" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["--debug", *args])
    assert isinstance(r.exception, ZeroDivisionError)


def test_a_scene_entirely_nodata_gives_nodata_outputs_and_a_warning(tmp_path, caplog):
    from geoseg.predict.api import predict_scene
    from tests.conftest import write_raster

    model = make_bundle(tmp_path / "m", n_bands=3, chip=64, overlap=16)
    scene = write_raster(tmp_path / "nd.tif", np.zeros((3, 90, 70), np.float32), nodata=0)
    with caplog.at_level("WARNING"):
        r = predict_scene(scene, model, tmp_path / "o")
    assert r.status == "done" and any("every pixel is nodata" in w for w in r.warnings)
    assert "every pixel is nodata" in caplog.text
    with rasterio.open(r.classes_path) as ds:
        assert (ds.read(1) == ds.nodata).all()


def test_a_second_run_into_the_same_folder_is_refused_while_the_first_writes(tmp_path):
    import subprocess
    import sys

    from geoseg.errors import OutputExistsError
    from geoseg.predict.api import predict_scene

    model = make_bundle(tmp_path / "m", n_bands=3, chip=64, overlap=16)
    scene = _tiled_scene(tmp_path / "s.tif", size=256)
    out = tmp_path / "o"
    out.mkdir()
    # another process holds the folder (as a running job does), then is killed: the lock goes with it
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from geoseg.io.store import Store; from geoseg.predict.manifest import "
                               "folder_lock\nwith folder_lock(Store(sys.argv[1])):\n print('held', flush=True)\n "
                               "time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputExistsError, match=r"another geoseg run \(pid \d+ on .*\) is writing into this"):
            predict_scene(scene, model, out, vector_format=None)
        assert not (out / "s.classes.tif").exists()
    finally:
        holder.kill()
        holder.wait()
    r = predict_scene(scene, model, out, vector_format=None)  # SIGKILL released it
    assert r.status == "done" and not (out / ".geoseg.lock").exists()


class _Planted:
    """Unpickling this creates a marker file: the proof that code from a model file ran."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name, how", [
    ("weights.pt", "pickle"), ("weights.pth", "pickle"), ("weights.ckpt", "pickle"),
    ("weights.pt", "torch.save"), ("weights.ckpt", "torch.save-state_dict"), ("weights.safetensors", "pickle"),
])
def test_a_model_file_never_runs_code_on_load(tmp_path, name, how):
    import json
    import pickle

    import torch

    from geoseg.errors import BundleError
    from geoseg.model.weights import load_model

    p = make_bundle(tmp_path / "m", n_bands=3)
    data = json.loads((p / "model.json").read_text())
    data["weights"] = name
    (p / "model.json").write_text(json.dumps(data))
    evil = _Planted()
    evil.marker = str(tmp_path / "code-ran")
    target = p / name
    if how == "pickle":
        target.write_bytes(pickle.dumps({"weight": evil}))
    elif how == "torch.save":
        torch.save({"weight": evil}, target)
    else:
        torch.save({"state_dict": {"weight": evil}}, target)
    with pytest.raises(BundleError, match=name):
        load_model(p)
    assert not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize("weights", ["../outside.safetensors", "/etc/passwd", "sub/w.safetensors", ".."])
def test_a_bundle_reads_its_weights_only_from_its_own_folder(tmp_path, weights):
    import json

    from geoseg.errors import BundleError
    from geoseg.model.weights import load_model

    p = make_bundle(tmp_path / "m", n_bands=3)
    data = json.loads((p / "model.json").read_text())
    data["weights"] = weights
    (p / "model.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="weights must be a file name inside the bundle folder"):
        load_model(p)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_a_finished_run_resumes_with_more_epochs(tmp_path, schedule):
    from geoseg.learn.train import train
    from tests._training import tiny_config, write_scene

    image, labels = write_scene(tmp_path)
    cfg = tiny_config(image, labels, optimizer={"schedule": schedule})
    first = train(cfg, tmp_path / "run")
    cfg["epochs"] = first.epochs_run + 2
    again = train(cfg, tmp_path / "run", resume=True)
    assert again.epochs_run == first.epochs_run + 2 and len(again.history) == first.epochs_run + 2


def test_a_training_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path):
    from geoseg.errors import InputError
    from geoseg.learn.train import train
    from tests._training import tiny_config, write_scene

    image, labels = write_scene(tmp_path)
    cfg = tiny_config(image, tmp_path / "no-such-labels.tif")
    for _ in range(2):  # the same command again: the same error, not "already holds a training run"
        with pytest.raises(InputError, match="no-such-labels.tif"):
            train(cfg, tmp_path / "run")
        assert not (tmp_path / "run").exists()
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("the user's")
    with pytest.raises(InputError):
        train(cfg, keep)
    assert [p.name for p in keep.iterdir()] == ["notes.txt"]


def test_staging_left_by_a_killed_run_of_another_scene_is_reported(tmp_path, caplog):
    from geoseg.predict.api import predict_scene

    model = make_bundle(tmp_path / "m", n_bands=3, chip=64, overlap=16)
    scene = _tiled_scene(tmp_path / "s.tif", size=256)
    left = tmp_path / "o" / ".geoseg-staging" / "other"
    left.mkdir(parents=True)
    (left / "settings.json").write_text("{}")
    with caplog.at_level("WARNING"):
        predict_scene(scene, model, tmp_path / "o", vector_format=None)
    assert "other: strips of a scene an earlier run did not finish" in caplog.text
    assert left.exists()  # kept: running its command again resumes it


def test_unreadable_inputs_are_refused_in_one_line(tmp_path):
    from rasterio.control import GroundControlPoint

    model = make_bundle(tmp_path / "m", n_bands=3, chip=64, overlap=16)
    (tmp_path / "empty.tif").write_bytes(b"")
    (tmp_path / "text.tif").write_text("not a raster")
    gcps = [GroundControlPoint(0, 0, 500000, 5100000), GroundControlPoint(0, 90, 500090, 5100000),
            GroundControlPoint(90, 0, 500000, 5099910)]
    with rasterio.open(tmp_path / "gcp.tif", "w", driver="GTiff", width=90, height=90, count=3, dtype="uint8",
                       gcps=gcps, crs="EPSG:32633") as ds:
        ds.write(np.ones((3, 90, 90), np.uint8))
    (tmp_path / "folder").mkdir()
    with rasterio.open(tmp_path / "complex.tif", "w", driver="GTiff", width=40, height=40, count=3, dtype="complex64",
                       crs="EPSG:32633", transform=from_origin(0, 40, 1, 1)) as ds:
        ds.write(np.ones((3, 40, 40), np.complex64))
    (tmp_path / "zero.vrt").write_text('<VRTDataset rasterXSize="0" rasterYSize="10">'
                                       '<VRTRasterBand dataType="Byte" band="1"/></VRTDataset>')
    cases = {"empty.tif": "cannot be read as a raster", "text.tif": "cannot be read as a raster",
             "missing.tif": "no such file", "gcp.tif": "ground control points only", "folder": "is a folder",
             "complex.tif": "complex values", "zero.vrt": "Invalid dataset dimensions",
             "nomatch*.tif": "the pattern matches no file", "http://127.0.0.1:9/scene.tif": "cannot be read"}
    for name, words in cases.items():
        where = name if "://" in name else str(tmp_path / name)
        r = CliRunner().invoke(main, ["predict", where, "-m", str(model), "-o", str(tmp_path / "o")])
        last = r.output.strip().splitlines()[-1]
        assert r.exit_code == 1 and name in last and words in last and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_rotated_and_crs_less_scenes_keep_their_grid(tmp_path, caplog):
    from affine import Affine

    from geoseg.predict.api import predict_scene

    model = make_bundle(tmp_path / "m", n_bands=3, chip=64, overlap=16)
    rng = np.random.default_rng(2)
    for name, crs, t in (("rot.tif", "EPSG:32633", Affine(1.0, 0.2, 500000.0, 0.1, -1.0, 5100000.0)),
                         ("nocrs.tif", None, Affine(2.0, 0.0, 10.0, 0.0, -2.0, 500.0))):
        with rasterio.open(tmp_path / name, "w", driver="GTiff", width=130, height=110, count=3, dtype="uint8",
                           crs=crs, transform=t) as ds:
            ds.write(rng.integers(1, 255, (3, 110, 130), dtype=np.uint8))
        with caplog.at_level("WARNING"):
            r = predict_scene(tmp_path / name, model, tmp_path / name.split(".")[0], vector_format=None)
        with rasterio.open(r.classes_path) as out:
            assert (out.transform, out.crs, out.shape) == (t, crs and rasterio.crs.CRS.from_user_input(crs),
                                                         (110, 130))
    assert "nocrs.tif: has no CRS" in caplog.text


@pytest.mark.parametrize("delay", [0.5, 1.5, 3.0])
def test_a_killed_vectorize_leaves_no_partial_file_and_runs_again(tmp_path, delay):
    import signal
    import subprocess
    import sys
    import time

    from scipy import ndimage

    rng = np.random.default_rng(3)
    size = 2048
    field = ndimage.zoom(rng.normal(size=(size // 16, size // 16)), 16, order=1)
    classes = np.digitize(field, [-0.5, 0.0, 0.5]).astype(np.uint8) + 1
    src = tmp_path / "classes.tif"
    with rasterio.open(src, "w", driver="GTiff", width=size, height=size, count=1, dtype="uint8", nodata=0,
                       crs="EPSG:32633", transform=from_origin(500000, 5100000, 1, 1), tiled=True,
                       blockxsize=256, blockysize=256) as ds:
        ds.write(classes, 1)
    dst = tmp_path / "polys.gpkg"
    cmd = [sys.executable, "-m", "geoseg.cli", "-q", "vectorize", str(src), str(dst)]
    p = subprocess.Popen(cmd, start_new_session=True)
    time.sleep(delay)
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)  # the command and its worker processes
    p.wait(timeout=120)
    import pyogrio

    # killed or not, what carries the final name is whole: the output is published only once written
    left = pyogrio.read_info(dst)["features"] if dst.exists() else None
    r = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr
    assert not [f.name for f in tmp_path.iterdir() if f.name.startswith(".polys")]  # the killed run's temporaries
    whole = pyogrio.read_info(dst)["features"]
    assert whole > 0 and left in (None, whole)


def test_blocks_a_sparse_geotiff_leaves_out_are_nodata_and_never_predicted(tmp_path):
    """GDAL's SPARSE_OK: blocks never written hold no data (here no nodata value is even declared)."""
    from geoseg.predict.api import predict_scene

    size, block = 2048, 256
    path = tmp_path / "sparse.tif"
    written = [(0, 0), (3, 5), (7, 7)]  # (block row, block column)
    rng = np.random.default_rng(4)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 5100000, 1, 1), tiled=True, blockxsize=block,
                       blockysize=block, sparse_ok=True, compress="deflate") as ds:
        for i, j in written:
            ds.write(rng.integers(1, 255, (3, block, block), dtype=np.uint8),
                     window=rasterio.windows.Window(j * block, i * block, block, block))
    assert path.stat().st_size < 1_000_000  # declares 12 MB of pixels
    model = make_bundle(tmp_path / "m", n_bands=3, chip=256, overlap=32)
    r = predict_scene(path, model, tmp_path / "out", vector_format=None)
    expected = np.zeros((size, size), dtype=bool)
    for i, j in written:
        expected[i * block:(i + 1) * block, j * block:(j + 1) * block] = True
    with rasterio.open(r.classes_path) as out:
        assert ((out.read(1) != out.nodata) == expected).all()
    assert r.chips_skipped >= r.chips_computed - 4 * len(written)  # only chips touching a written block ran


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody can write into: a read-only tmpfs as root (root ignores file modes), else mode 555."""
    import subprocess

    where = tmp_path / "ro"
    where.mkdir()
    if os.geteuid() != 0:
        where.chmod(0o555)
        yield where
        where.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs: {r.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_an_output_folder_that_is_not_writable_is_refused_in_one_line(tmp_path, read_only_folder):
    import yaml

    from tests._training import tiny_config, write_scene

    scene = _tiled_scene(tmp_path / "s.tif", size=256)
    model = make_bundle(tmp_path / "m", n_bands=3, chip=256, overlap=32)
    image, labels = write_scene(tmp_path, size=64)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(image, labels)))
    classes = tmp_path / "c.tif"
    with rasterio.open(classes, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(0, 8, 1, 1)) as ds:
        ds.write(np.ones((1, 8, 8), dtype=np.uint8))
    for args, named in ((["predict", str(scene), "-m", str(model), "-o", str(read_only_folder)], read_only_folder),
                        (["predict", str(scene), "-m", str(model), "-o", str(read_only_folder / "sub")],
                         read_only_folder / "sub"),
                        (["vectorize", str(classes), str(read_only_folder / "c.gpkg")], read_only_folder / "c.gpkg"),
                        (["train", str(cfg), "-o", str(read_only_folder / "run")], read_only_folder / "run")):
        r = CliRunner().invoke(main, args)
        line = r.output.strip().splitlines()[-1] if r.output.strip() else ""
        assert r.exit_code == 1 and str(named) in line and "cannot write" in line, (args[0], r.output)
        assert "internal error" not in r.output and "Traceback" not in r.output
