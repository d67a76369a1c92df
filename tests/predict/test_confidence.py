"""The confidence map (``--confidence``): the blended top-class probability, uint8 0..254 with nodata 255,
on the class map's grid, staged and resumed like the class map, and the same bytes however the job is split."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

import geoseg.predict.schedule as schedule
from geoseg.cli import main
from geoseg.predict.api import predict_scene, predict_scenes
from geoseg.predict.manifest import MANIFEST
from geoseg.predict.units import STAGING, ModelRef, PredictOptions, fingerprint
from tests.conftest import make_bundle, write_raster


@pytest.fixture(scope="module")
def unet(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "unet", n_bands=3, n_classes=4, chip=64, overlap=16,
                       architecture="unet")


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    data = np.random.default_rng(21).normal(size=(3, 1100, 700)).astype(np.float32)
    data[:, :90, :130] = np.nan  # a nodata corner: nodata in every output
    data[:, 600:640, 300:500] = np.nan
    return write_raster(tmp_path_factory.mktemp("s") / "s.tif", data, nodata=float("nan"))


def _read(path: Path | str) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as ds:
        return ds.read(1), dict(ds.profile) | {"tags": ds.tags()}


def _top(probs_path: Path | str) -> np.ndarray:
    """What the confidence map must hold: round(254 * max over classes) of the float32 probabilities."""
    with rasterio.open(probs_path) as ds:
        p = ds.read()
    nodata = np.isnan(p).all(axis=0)
    top = np.max(np.where(np.isnan(p), -1, p), axis=0)
    return np.where(nodata, 255, np.rint(top * 254)).astype(np.uint8)


def test_the_confidence_map_is_the_top_blended_probability_on_the_class_maps_grid(tmp_path, unet, scene):
    r = predict_scene(scene, unet, tmp_path / "out", confidence=True, probabilities=True,
                      probabilities_dtype="float32", precision="fp32")
    assert r.confidence_path == tmp_path / "out" / "s.confidence.tif"
    conf, prof = _read(r.confidence_path)
    classes, cprof = _read(r.classes_path)
    np.testing.assert_array_equal(conf, _top(r.probabilities_path))
    assert ((conf == 255) == (classes == cprof["nodata"])).all() and (conf == 255).any()
    assert conf[conf != 255].min() >= 254 // 4  # at least 1/K with K = 4 classes
    for key in ("width", "height", "transform", "crs", "blockxsize", "blockysize"):
        assert prof[key] == cprof[key], key
    assert prof["dtype"] == "uint8" and prof["nodata"] == 255 and prof["count"] == 1
    with rasterio.open(r.confidence_path) as ds:
        assert ds.overviews(1) and ds.colorinterp[0].name == "gray"
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    # its QGIS style: a pseudocolor ramp over 0..254
    style = ET.parse(tmp_path / "out" / "s.confidence.qml").getroot()
    renderer = style.find("pipe/rasterrenderer")
    assert renderer is not None and renderer.get("type") == "singlebandpseudocolor"
    items = style.findall(".//colorrampshader/item")
    assert [int(i.get("value", -1)) for i in items][0::len(items) - 1] == [0, 254]
    # recorded with the scene's files, listed in the STAC item, and the polygons carry confidence_mean
    files = json.loads((tmp_path / "out" / MANIFEST).read_text())["scenes"]["s"]["files"]
    assert {"s.confidence.tif", "s.confidence.qml"} <= set(files)
    item = json.loads((tmp_path / "out" / "s.stac.json").read_text())
    assert item["assets"]["confidence"]["href"] == "./s.confidence.tif"
    import pyogrio

    polygons = pyogrio.read_dataframe(r.vector_path)
    assert polygons["confidence_mean"].between(0.25, 1.0).all()


def test_a_sigmoid_model_gives_max_of_p_and_1_minus_p(tmp_path):
    model = make_bundle(tmp_path / "bin", n_bands=1, n_classes=2, chip=64, overlap=16, identity=False,
                        model={"architecture": "conv1x1", "activation": "sigmoid"})
    data = np.random.default_rng(3).normal(size=(1, 150, 170)).astype(np.float32) * 3
    scene = write_raster(tmp_path / "b.tif", data)
    r = predict_scene(scene, model, tmp_path / "out", confidence=True, probabilities=True,
                      probabilities_dtype="float32", precision="fp32", vector_format=None)
    conf, _ = _read(r.confidence_path)
    with rasterio.open(r.probabilities_path) as ds:
        p = ds.read()
    np.testing.assert_allclose(p[0] + p[1], 1, atol=1e-6)
    np.testing.assert_array_equal(conf, np.rint(np.maximum(p[1], p[0]) * 254).astype(np.uint8))
    assert conf.min() >= 127


def test_same_bytes_whatever_the_split_and_the_readers(tmp_path, unet, scene):
    kw = dict(confidence=True, precision="fp32", batch_size=4, vector_format=None)
    want = None
    for i, split in enumerate([dict(), dict(panel_width=512, unit_rows=512, workers=1),
                               dict(panel_width=512, workers=3), dict(unit_rows=512, workers=2)]):
        r = predict_scene(scene, unet, tmp_path / f"o{i}", **kw, **split)
        got = Path(r.confidence_path).read_bytes()
        if want is None:
            want = got
        assert got == want, split


def test_same_bytes_whatever_the_batch_size(tmp_path, unet, scene):
    """On a CPU the network always runs batches of one shape (a lone 64 px chip is summed differently by
    oneDNN from the same chip in a batch of two), so --batch-size moves no probability and no confidence."""
    runs = [predict_scene(scene, unet, tmp_path / f"b{b}", confidence=True, probabilities=True, batch_size=b,
                          precision="fp32", vector_format=None) for b in (1, 3, 8)]
    for kind in ("confidence_path", "probabilities_path", "classes_path"):
        got = {Path(getattr(r, kind)).read_bytes() for r in runs}
        assert len(got) == 1, kind


def test_resume_from_staged_strips_gives_the_same_bytes(tmp_path, unet, scene, monkeypatch):
    kw = dict(confidence=True, precision="fp32", batch_size=4, vector_format=None, unit_rows=512)
    ref = predict_scene(scene, unet, tmp_path / "ref", **kw)
    real = schedule.run_unit

    def interrupted(unit, *args, **kwargs):  # Ctrl-C once the first row band is staged
        if unit.r0 > 0:
            raise KeyboardInterrupt
        return real(unit, *args, **kwargs)

    monkeypatch.setattr(schedule, "run_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):  # one unit at a time: the first row band is done when it stops
        predict_scene(scene, unet, tmp_path / "out", workers=1, **kw)
    staged = tmp_path / "out" / STAGING / "s"
    assert sorted(p.name for p in (staged / "confidence").iterdir()) == ["r0000000_c0000000-0000700.tif"]
    # a strip whose confidence was staged but not its class strip (killed between the two) is made again
    (staged / "classes" / "r0000000_c0000000-0000700.tif").unlink()
    (staged / "confidence" / "r0000000_c0000000-0000700.tif").write_bytes(b"torn")
    monkeypatch.setattr(schedule, "run_unit", real)
    r = predict_scene(scene, unet, tmp_path / "out", **kw)
    assert Path(r.confidence_path).read_bytes() == Path(ref.confidence_path).read_bytes()
    assert Path(r.classes_path).read_bytes() == Path(ref.classes_path).read_bytes()
    # resumed for real: the first row band staged, only the rest computed
    monkeypatch.setattr(schedule, "run_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict_scene(scene, unet, tmp_path / "again", workers=1, **kw)
    monkeypatch.setattr(schedule, "run_unit", real)
    run = predict_scenes([scene], unet, tmp_path / "again", **kw)
    assert run.scenes[0].rows_resumed == 512
    assert (tmp_path / "again" / "s.confidence.tif").read_bytes() == Path(ref.confidence_path).read_bytes()


def test_a_new_option_at_its_default_keeps_the_fingerprint():
    """Runs begun before --confidence existed resume: the option at its default is not in the digest."""
    from tests.predict.test_units import _info

    info, ref = _info(300, 200), ModelRef("m", "digest")
    # the digest of PredictOptions() as computed before the option was added (kept here on purpose)
    assert fingerprint(info, [1, 2, 3], 64, 16, ref, PredictOptions()) == "c0f70779e33cb8c93fc975caa75a672a"
    old = PredictOptions(probabilities=True, unit_rows=512)
    assert fingerprint(info, [1, 2, 3], 64, 16, ref, old) == "1df7babac405f95a95d0ba344028835e"
    on = fingerprint(info, [1, 2, 3], 64, 16, ref, replace(PredictOptions(), confidence=True))
    assert on != fingerprint(info, [1, 2, 3], 64, 16, ref, PredictOptions())


def test_cli_and_job_file_options(tmp_path, unet, scene):
    res = CliRunner().invoke(main, ["-q", "predict", str(scene), "-m", str(unet), "-o", str(tmp_path / "cli"),
                                    "--confidence", "--no-vector", "--precision", "fp32", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    job = tmp_path / "job.yaml"
    job.write_text(f"model: {unet}\noutput_dir: {tmp_path / 'job'}\nscenes: [{scene}]\n"
                   "options:\n  confidence: true\n  vector_format: null\n  precision: fp32\n  batch_size: 4\n")
    res = CliRunner().invoke(main, ["-q", "predict", "--job", str(job)])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "job" / "s.confidence.tif").read_bytes() == (tmp_path / "cli" / "s.confidence.tif").read_bytes()
    # and without the option: no confidence map, and a later --overwrite run without it removes the old one
    res = CliRunner().invoke(main, ["-q", "predict", str(scene), "-m", str(unet), "-o", str(tmp_path / "cli"),
                                    "--no-vector", "--overwrite", "--precision", "fp32", "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "cli" / "s.confidence.tif").exists()
    assert not (tmp_path / "cli" / "s.confidence.qml").exists()
