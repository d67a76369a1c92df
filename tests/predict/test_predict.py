from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rasterio.transform import from_origin

from geoseg.errors import BundleError, InputError, OutputExistsError
from geoseg.predict.api import predict_scene, predict_scenes
from tests.conftest import make_bundle, write_raster


def _softmax(x: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(x.astype(np.float32)), 0).numpy()


def _read(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as ds:
        return ds.read(), dict(ds.profile)


@pytest.fixture(scope="module")
def identity3(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "id3", n_bands=3, chip=64, overlap=16)


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "unet", n_bands=3, n_classes=4, chip=64, overlap=16,
                       architecture="unet")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=st.integers(5, 300), h=st.integers(5, 300), tile=st.sampled_from([32, 64, 96]),
       frac=st.sampled_from([0.0, 0.25, 0.5]), seed=st.integers(0, 99))
def test_stitch_of_tiles_is_the_whole_image(tmp_path_factory, w, h, tile, frac, seed):
    """With a per-pixel identity model, the tiled, blended prediction equals the whole-image one."""
    tmp = tmp_path_factory.mktemp("stitch")
    model = make_bundle(tmp / "m", n_bands=3, chip=tile, overlap=int(tile * frac) // 2 * 2)
    data = np.random.default_rng(seed).normal(size=(3, h, w)).astype(np.float32)
    scene = write_raster(tmp / "s.tif", data)
    r = predict_scene(scene, model, tmp / "out", probabilities=True, probabilities_dtype="float32",
                      tile_size=tile, workers=2, batch_size=3, precision="fp32")  # exact: not bf16 on AMX CPUs
    classes, _ = _read(r.classes_path)
    probs, _ = _read(r.probabilities_path)
    np.testing.assert_array_equal(classes[0], np.argmax(data, 0) + 1)
    np.testing.assert_allclose(probs, _softmax(data), atol=2e-6)


@pytest.mark.parametrize("crs,transform", [
    ("EPSG:32633", from_origin(500_000.0, 5_100_000.0, 2.0, 3.0)),
    ("EPSG:4326", from_origin(-115.2, 36.2, 2.7e-6, 2.7e-6)),
    ("EPSG:3857", rasterio.Affine(0.6, 0.1, -8_000_000.0, 0.05, -0.6, 4_000_000.0)),  # rotated grid
])
def test_georeferencing_is_kept_exactly(tmp_path, identity3, crs, transform):
    data = np.random.default_rng(1).integers(1, 255, size=(3, 150, 211)).astype(np.uint8)
    scene = write_raster(tmp_path / "s.tif", data, crs=crs, transform=transform)
    r = predict_scene(scene, identity3, tmp_path / "out")
    with rasterio.open(scene) as a, rasterio.open(r.classes_path) as b:
        assert b.crs == a.crs
        assert b.transform == a.transform
        assert (b.width, b.height) == (a.width, a.height)


def test_nodata_is_nodata_and_fully_masked_chips_are_skipped(tmp_path, identity3):
    data = np.random.default_rng(2).integers(1, 200, size=(3, 200, 200)).astype(np.uint16)
    data[:, :100, :100] = 0  # a whole quadrant of nodata: at least one chip is entirely masked
    data[0, 150, 150] = 0  # one band nodata only: the pixel stays valid
    scene = write_raster(tmp_path / "s.tif", data, nodata=0)
    r = predict_scene(scene, identity3, tmp_path / "out", probabilities=True)
    classes, prof = _read(r.classes_path)
    probs, _ = _read(r.probabilities_path)
    assert prof["nodata"] == 255
    assert (classes[0, :100, :100] == 255).all() and (probs[:, :100, :100] == 255).all()
    assert (classes[0, 100:, :] != 255).all()
    assert classes[0, 150, 150] != 255
    assert r.chips_skipped >= 1


def test_alpha_band_and_internal_mask(tmp_path, identity3):
    rng = np.random.default_rng(3)
    data = rng.integers(1, 255, size=(4, 120, 90)).astype(np.uint8)
    data[3] = 255
    data[3, 30:60, 20:50] = 0
    scene = write_raster(tmp_path / "alpha.tif", data, photometric="RGB", alpha="YES")
    r = predict_scene(scene, identity3, tmp_path / "out")
    classes, _ = _read(r.classes_path)
    assert (classes[0, 30:60, 20:50] == 255).all() and (classes[0, :30] != 255).all()

    rgb = data[:3]
    path = tmp_path / "masked.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        write_raster(path, rgb)
        with rasterio.open(path, "r+") as ds:
            m = np.full((120, 90), 255, np.uint8)
            m[60:, 60:] = 0
            ds.write_mask(m)
    r = predict_scene(path, identity3, tmp_path / "out2")
    classes, _ = _read(r.classes_path)
    assert (classes[0, 60:, 60:] == 255).all() and (classes[0, :60] != 255).all()


def test_masked_values_do_not_leak_into_neighbours(tmp_path, tiny_unet):
    """A convolutional model sees masked pixels as the band mean, whatever value the file stores there."""
    rng = np.random.default_rng(4)
    base = rng.normal(size=(3, 96, 96)).astype(np.float32)
    outs = []
    for fill in (-9999.0, 5000.0):
        d = base.copy()
        d[:, 40:56, 40:56] = fill
        scene = write_raster(tmp_path / f"s{fill}.tif", d, nodata=fill)
        r = predict_scene(scene, tiny_unet, tmp_path / f"o{fill}", probabilities=True,
                          probabilities_dtype="float32")
        outs.append(_read(r.probabilities_path)[0])
    np.testing.assert_array_equal(np.isnan(outs[0]), np.isnan(outs[1]))
    np.testing.assert_allclose(np.nan_to_num(outs[0]), np.nan_to_num(outs[1]), atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1), (23, 37), (64, 64), (65, 64), (130, 7)])
def test_edges_and_scenes_smaller_than_a_chip(tmp_path, tiny_unet, shape):
    h, w = shape
    data = np.random.default_rng(5).normal(size=(3, h, w)).astype(np.float32)
    scene = write_raster(tmp_path / "s.tif", data)
    r = predict_scene(scene, tiny_unet, tmp_path / "out")
    classes, prof = _read(r.classes_path)
    assert classes.shape == (1, h, w) and (prof["width"], prof["height"]) == (w, h)
    assert set(np.unique(classes)) <= {1, 2, 3, 4}


def test_panels_batches_and_workers_give_the_same_bytes(tmp_path, tiny_unet):
    data = np.random.default_rng(6).normal(size=(3, 140, 1300)).astype(np.float32)
    scene = write_raster(tmp_path / "s.tif", data)
    ref = None
    for i, kw in enumerate([dict(panel_width=8192, batch_size=8, workers=1),
                            dict(panel_width=512, batch_size=8, workers=3),
                            dict(panel_width=512, batch_size=1, workers=2)]):
        r = predict_scene(scene, tiny_unet, tmp_path / f"o{i}", probabilities=True, **kw)
        got = (_read(r.classes_path)[0], _read(r.probabilities_path)[0])
        if ref is None:
            ref = got
        else:
            np.testing.assert_array_equal(got[0], ref[0])
            assert np.abs(got[1].astype(int) - ref[1].astype(int)).max() <= 1  # batch-size float noise


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32", "float64"])
def test_any_dtype(tmp_path, identity3, dtype):
    data = (np.random.default_rng(7).random((3, 70, 90)) * 100).astype(dtype)
    scene = write_raster(tmp_path / "s.tif", data)
    r = predict_scene(scene, identity3, tmp_path / "out", precision="fp32")  # exact: not bf16 on AMX CPUs
    classes, _ = _read(r.classes_path)
    np.testing.assert_array_equal(classes[0], np.argmax(data.astype(np.float32), 0) + 1)


def test_band_mapping_and_contract_refusal(tmp_path, identity3):
    one = np.random.default_rng(8).integers(1, 9, size=(1, 40, 40)).astype(np.uint8)
    scene = write_raster(tmp_path / "one.tif", one)
    with pytest.raises(BundleError, match=r"has 1 band\(s\).*--bands 1,1,1"):
        predict_scene(scene, identity3, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    r = predict_scene(scene, identity3, tmp_path / "out", bands=[1, 1, 1])
    classes, _ = _read(r.classes_path)
    assert (classes == 1).all()  # equal inputs: the tie goes to the first class
    four = np.random.default_rng(9).normal(size=(4, 30, 30)).astype(np.float32)
    scene4 = write_raster(tmp_path / "four.tif", four)
    r = predict_scene(scene4, identity3, tmp_path / "out4", bands=[4, 2, 1])
    np.testing.assert_array_equal(_read(r.classes_path)[0][0], np.argmax(four[[3, 1, 0]], 0) + 1)
    with pytest.raises(BundleError, match="--bands gives 2"):
        predict_scene(scene4, identity3, tmp_path / "out5", bands=[1, 2])


def test_outputs_are_cogs_with_colours_names_and_style(tmp_path, identity3):
    from rio_cogeo.cogeo import cog_validate

    data = np.random.default_rng(10).normal(size=(3, 1100, 700)).astype(np.float32)
    scene = write_raster(tmp_path / "s.tif", data)
    r = predict_scene(scene, identity3, tmp_path / "out", probabilities=True, probabilities_dtype="float16",
                      compress="zstd")
    for path in (r.classes_path, r.probabilities_path):
        valid, errors, _ = cog_validate(str(path))
        assert valid, errors
    with rasterio.open(r.classes_path) as ds:
        assert ds.overviews(1), "overviews are built"
        assert ds.colormap(1)[1][:3] == (0, 90, 200)
        assert ds.tags()["CLASS_2"] == "class 2"
        assert ds.compression.value == "ZSTD"
    with rasterio.open(r.probabilities_path) as ds:
        assert ds.dtypes[0] == "float32" and ds.descriptions == ("class 1", "class 2", "class 3")
        assert ds.tags(1, ns="IMAGE_STRUCTURE").get("NBITS") == "16"
    qml = r.classes_path.with_suffix(".qml").read_text()
    assert 'label="class 3"' in qml and "paletted" in qml


def test_existing_outputs_are_refused_and_failures_leave_nothing(tmp_path, identity3, monkeypatch):
    data = np.random.default_rng(11).normal(size=(3, 80, 80)).astype(np.float32)
    scene = write_raster(tmp_path / "s.tif", data)
    r = predict_scene(scene, identity3, tmp_path / "out")
    assert r.status == "done"
    # the same call again: finished by the earlier run (the manifest says so), skipped
    assert predict_scene(scene, identity3, tmp_path / "out").status == "skipped"
    # other settings would replace outputs they did not make: refused
    with pytest.raises(OutputExistsError, match="--overwrite"):
        predict_scene(scene, identity3, tmp_path / "out", tile_size=32)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        predict_scene(scene, identity3, tmp_path / "other-manifest-less", vector_format=None) if False else \
            predict_scenes([scene], identity3, tmp_path / "out", blend="uniform")
    assert predict_scene(scene, identity3, tmp_path / "out", overwrite=True).status == "done"

    import geoseg.predict.inference

    def boom(self, x):
        raise RuntimeError("model exploded")

    monkeypatch.setattr(geoseg.predict.inference.Predictor, "forward", boom)
    with pytest.raises(RuntimeError, match="model exploded"):
        predict_scene(scene, identity3, tmp_path / "fail")
    assert [p.name for p in (tmp_path / "fail").iterdir()] == []
    assert r.classes_path.exists()


def test_several_scenes_glob_and_name_clash(tmp_path, identity3):
    for i in range(3):
        write_raster(tmp_path / f"scene{i}.tif", np.random.default_rng(i).normal(size=(3, 50, 60)).astype(np.float32))
    run = predict_scenes([str(tmp_path / "scene*.tif")], identity3, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tif")) == [f"scene{i}.classes.tif" for i in range(3)]
    assert run.pixels == 3 * 50 * 60 and run.stage_seconds["model"] > 0
    (tmp_path / "b").mkdir()
    write_raster(tmp_path / "b" / "scene0.tif", np.zeros((3, 10, 10), np.float32))
    with pytest.raises(InputError, match="same file name"):
        predict_scenes([tmp_path / "scene0.tif", tmp_path / "b" / "scene0.tif"], identity3, tmp_path / "o2")
    with pytest.raises(InputError, match="matches no file"):
        predict_scenes([str(tmp_path / "nothing*.tif")], identity3, tmp_path / "o3")


def test_bad_options_are_refused_before_work(tmp_path, tiny_unet):
    scene = write_raster(tmp_path / "s.tif", np.zeros((3, 10, 10), np.float32))
    with pytest.raises(InputError, match="multiple of 8"):
        predict_scene(scene, tiny_unet, tmp_path / "o", tile_size=60)
    with pytest.raises(InputError, match="half the tile"):
        predict_scene(scene, tiny_unet, tmp_path / "o", overlap=40)
    with pytest.raises(InputError, match="multiple of 512"):
        predict_scene(scene, tiny_unet, tmp_path / "o", unit_rows=700)
    from geoseg.errors import UnknownNameError

    with pytest.raises(UnknownNameError, match="cosine"):
        predict_scene(scene, tiny_unet, tmp_path / "o", blend="nope")
    with pytest.raises(InputError, match="no CUDA"):
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
        predict_scene(scene, tiny_unet, tmp_path / "o", device="cuda")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_tta_keeps_a_symmetric_model_exact(tmp_path, identity3):
    data = np.random.default_rng(12).normal(size=(3, 90, 70)).astype(np.float32)
    scene = write_raster(tmp_path / "s.tif", data)
    r = predict_scene(scene, identity3, tmp_path / "out", tta=True, precision="fp32")
    np.testing.assert_array_equal(_read(r.classes_path)[0][0], np.argmax(data, 0) + 1)


def test_every_real_raster(tmp_path, real_data, identity3):
    """Every kind of raster in the real data folder predicts onto its own grid (1-band and 4-band ones via
    --bands). A kind is a folder's rasters of one band count, dtype, CRS, nodata and size: the Amazon set's 30
    tiles of one kind are one case, not 30."""
    kinds: dict[tuple, tuple[Path, int]] = {}
    for p in sorted(real_data.rglob("*.tif")):
        with rasterio.open(p) as ds:
            kinds.setdefault((p.parent, ds.count, ds.dtypes, ds.crs, ds.nodata, ds.shape), (p, ds.count))
    scenes = list(kinds.values())
    assert len(scenes) >= 8
    for i, (p, count) in enumerate(scenes):
        bands = [1, 1, 1] if count < 3 else [1, 2, 3] if count > 3 else None
        r = predict_scene(p, identity3, tmp_path / f"o{i}", bands=bands, tile_size=256, overlap=32)
        with rasterio.open(p) as a, rasterio.open(r.classes_path) as b:
            assert (b.crs, b.transform, b.width, b.height) == (a.crs, a.transform, a.width, a.height)
            if a.nodata is not None and count >= 3:
                src_invalid = (a.read(masked=True).mask.all(axis=0))
                assert (b.read(1)[src_invalid] == 255).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_path_matches_the_cpu(tmp_path, tiny_unet):
    """Pinned buffers, side-stream copies and autocast give the CPU's class map (run where a GPU is lent)."""
    data = np.random.default_rng(13).normal(size=(3, 300, 420)).astype(np.float32)
    scene = write_raster(tmp_path / "s.tif", data)
    kw = dict(probabilities=True, probabilities_dtype="float32", batch_size=4, vector_format=None)
    # the CPU reference in float32 (auto is bf16 on a CPU with AMX, as the H200 machine's Xeon has)
    cpu = predict_scene(scene, tiny_unet, tmp_path / "cpu", device="cpu", precision="fp32", **kw)
    fp32 = predict_scene(scene, tiny_unet, tmp_path / "fp32", device="cuda", precision="fp32", **kw)
    amp = predict_scene(scene, tiny_unet, tmp_path / "amp", device="cuda", precision="auto", **kw)
    c_cpu, p_cpu = _read(cpu.classes_path)[0], _read(cpu.probabilities_path)[0]
    np.testing.assert_allclose(_read(fp32.probabilities_path)[0], p_cpu, atol=1e-3)
    assert (_read(fp32.classes_path)[0] == c_cpu).mean() > 0.999
    assert (_read(amp.classes_path)[0] == c_cpu).mean() > 0.98
