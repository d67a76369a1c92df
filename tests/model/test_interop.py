"""Models that travel: ONNX and TorchScript exports are bundles that predict, evaluate and info take, the
ONNX file carries the QGIS Deepness plugin's metadata, and every bundle can be described as a STAC MLM Item."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.errors import BundleError, InputError
from geoseg.model.bundle import read_bundle
from geoseg.model.export import deepness_metadata, export
from geoseg.model.weights import load_model
from geoseg.predict.api import predict_scenes
from tests._training import tiny_config
from tests.conftest import make_bundle

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def spacenet_model(tmp_path_factory, real_data):
    """A U-Net trained briefly on the SpaceNet buildings scene (its polygons), and its two exports."""
    from geoseg.learn.config import config_from_dict
    from geoseg.learn.train import train

    d = real_data / "spacenet_buildings"
    folder = tmp_path_factory.mktemp("spacenet")
    cfg = tiny_config(d / "sample_geotiff.tif", d / "geotiff_labels.geojson",
                      classes=[{"id": 0, "name": "background", "color": [0, 0, 0]},
                               {"id": 1, "name": "building", "color": [230, 30, 30]}],
                      background_class=0, data={"chip_size": 64, "split_block": 128, "val_fraction": 0.2,
                                                "scenes": [{"image": str(d / "sample_geotiff.tif"),
                                                            "labels": str(d / "geotiff_labels.geojson"),
                                                            "label_value": 1}]},
                      epochs=3, steps_per_epoch=6, threads=2)
    result = train(config_from_dict(cfg), folder / "run")
    exports = {fmt: export(result.bundle_path, fmt, folder / f"model-{fmt}").folder for fmt in ("onnx", "torchscript")}
    return d / "sample_geotiff.tif", result.bundle_path, exports


def _class_map(model, scene, out) -> np.ndarray:
    run = predict_scenes([scene], model, out, precision="fp32", device="cpu", vector_format=None)
    with rasterio.open(run.scenes[0].classes_path) as ds:
        return ds.read(1)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_exported_bundle_predicts_the_same_map_on_the_spacenet_scene(fmt, spacenet_model, tmp_path):
    scene, bundle, exports = spacenet_model
    want = _class_map(bundle, scene, tmp_path / "torch")
    got = _class_map(exports[fmt], scene, tmp_path / fmt)
    assert len(np.unique(want)) > 1
    assert (want == got).mean() >= 0.9999
    with rasterio.open(tmp_path / "torch" / "sample_geotiff.classes.tif") as a, \
            rasterio.open(tmp_path / fmt / "sample_geotiff.classes.tif") as b:
        assert (a.crs, a.transform, a.nodata) == (b.crs, b.transform, b.nodata)


def test_the_onnx_file_alone_is_a_bundle_and_runs_in_onnx_runtime(spacenet_model, tmp_path):
    scene, bundle, exports = spacenet_model
    alone = tmp_path / "landcover.onnx"
    shutil.copy(exports["onnx"] / "model.onnx", alone)
    b = read_bundle(alone)
    assert b.format == "onnx" and b.contract.classes == read_bundle(bundle).contract.classes
    run = predict_scenes([scene], alone, tmp_path / "out", device="cpu", vector_format=None)
    assert run.scenes[0].status == "done"
    with pytest.raises(InputError, match="float32"):
        predict_scenes([scene], alone, tmp_path / "bf16", precision="bf16", device="cpu", vector_format=None)


def test_deepness_reads_the_contract_from_the_onnx_metadata(spacenet_model):
    _, _, exports = spacenet_model
    contract = read_bundle(exports["onnx"]).contract
    props = {p.key: p.value for p in onnx.load(str(exports["onnx"] / "model.onnx")).metadata_props}
    meta = {k: json.loads(v) for k, v in props.items() if k != "geoseg_contract"}
    assert meta["model_type"] == "Segmentor"
    assert meta["class_names"] == {"0": "background", "1": "building"}
    assert meta["tile_size"] == contract.chip_size
    assert meta["tiles_overlap"] == round(100 * contract.overlap / contract.chip_size)
    assert meta["resolution"] == pytest.approx(contract.input.pixel_size * 100)
    assert np.allclose(np.array(meta["standardization_mean"]) * 255, contract.input.mean)
    assert np.allclose(np.array(meta["standardization_std"]) * 255, contract.input.std)
    assert meta == json.loads(json.dumps(deepness_metadata(contract)))
    assert json.loads(props["geoseg_contract"])["classes"] == json.loads(contract.model_dump_json())["classes"]
    # what Deepness feeds the graph (x / 255, then standardised) is geoseg's (raw - mean) / std
    raw = np.random.default_rng(0).integers(0, 256, (1, 8, 8, len(contract.input.bands))).astype(np.float32)
    deep = (raw / 255 - np.array(meta["standardization_mean"], np.float32)) / np.array(meta["standardization_std"],
                                                                                     np.float32)
    ours = (raw - np.array(contract.input.mean, np.float32)) / np.array(contract.input.std, np.float32)
    assert np.allclose(deep, ours, atol=1e-4)


def test_evaluate_and_info_take_exported_bundles(spacenet_model, tmp_path):
    from geoseg.cli import main
    from geoseg.learn.evaluate import evaluate

    scene, bundle, exports = spacenet_model
    labels = scene.parent / "sample_fp_mask_from_geojson.tif"
    scores = {}
    for name, model in (("torch", bundle), *exports.items()):
        ev = evaluate(model, scene, labels, output_dir=tmp_path / name, precision="fp32", device="cpu")
        scores[name] = ev.metrics["miou"]
    assert scores["onnx"] == pytest.approx(scores["torch"], abs=1e-3)
    assert scores["torchscript"] == pytest.approx(scores["torch"], abs=1e-3)
    res = CliRunner().invoke(main, ["info", str(exports["onnx"] / "model.onnx"), "--json"])
    assert res.exit_code == 0, res.output
    desc = json.loads(res.output)
    assert desc["weights_format"] == "onnx" and desc["onnx_metadata"]["model_type"] == "Segmentor"


def test_mlm_item_of_every_format_is_valid_stac(spacenet_model, tmp_path):
    pytest.importorskip("pystac")
    import pystac
    import pystac.validation
    from pystac.extensions.mlm import MLMExtension

    from geoseg.model.mlm import MLM_SCHEMA

    _, bundle, exports = spacenet_model
    items = {"safetensors": export(bundle, "mlm", tmp_path / "model.mlm.json").contract_path,
             **{fmt: folder / "model.mlm.json" for fmt, folder in exports.items()}}
    contract = read_bundle(bundle).contract
    for fmt, path in items.items():
        d = json.loads(path.read_text())
        # core STAC with pystac's own schemas (the extension's schema is not reachable offline) ...
        pystac.validation.validate_dict({**d, "stac_extensions": []}, pystac.STACObjectType.ITEM)
        # ... and the MLM fields read through pystac's MLM extension, which raises on a missing required one
        item = pystac.Item.from_dict(d)
        assert item.stac_extensions == [MLM_SCHEMA] and MLMExtension.has_extension(item)
        mlm = MLMExtension.ext(item)
        assert mlm.mlm_name == "tiny" and mlm.tasks == ["semantic-segmentation"] and "U-Net" in mlm.architecture
        assert mlm.framework == ("ONNX" if fmt == "onnx" else "PyTorch")
        (inp,) = mlm.input
        assert [b.name if hasattr(b, "name") else b for b in inp.bands] == contract.input.bands
        assert [b["name"] for b in d["properties"]["bands"]] == contract.input.bands
        assert inp.input.shape == [-1, len(contract.input.bands), contract.chip_size, contract.chip_size]
        assert inp.input.dim_order == ["batch", "channel", "height", "width"]
        scaling = d["properties"]["mlm:input"][0]["value_scaling"]  # one per band, as MLM 1.4 has it
        assert [(v["type"], v["mean"], v["stddev"]) for v in scaling] == [
            ("z-score", m, s) for m, s in zip(contract.input.mean, contract.input.std, strict=True)]
        (out,) = mlm.output
        assert out.tasks == ["semantic-segmentation"] and out.result.shape[1] == 2
        assert [c.name for c in out.classes] == ["background", "building"] and out.classes[1].color_hint == "E61E1E"
        model = d["assets"]["model"]
        assert "mlm:model" in model["roles"]
        assert (path.parent / model["href"]).resolve() == read_bundle(exports.get(fmt, bundle)).weights_path.resolve()
        assert model["mlm:artifact_type"] == {"safetensors": "safetensors", "onnx": "onnx",
                                              "torchscript": "torch.jit.script"}[fmt]
    assert json.loads(items["safetensors"].read_text())["properties"]["mlm:total_parameters"] > 1000


def test_pickled_weights_are_refused_with_the_way_to_convert_them(tmp_path):
    p = make_bundle(tmp_path / "m")
    data = json.loads((p / "model.json").read_text())
    data["weights"] = "weights.pth"
    (p / "model.json").write_text(json.dumps(data))
    (p / "weights.pth").write_bytes(b"not read")
    with pytest.raises(BundleError, match="pickle.*safetensors"):
        read_bundle(p)


def test_an_export_is_not_exported_again_and_an_onnx_file_needs_a_contract(spacenet_model, tmp_path):
    _, _, exports = spacenet_model
    with pytest.raises(BundleError, match="export already"):
        export(exports["onnx"], "torchscript", tmp_path / "again")
    bare = tmp_path / "bare.onnx"
    m = onnx.load(str(exports["onnx"] / "model.onnx"))
    del m.metadata_props[:]
    onnx.save(m, str(bare))
    with pytest.raises(BundleError, match="without a geoseg contract"):
        read_bundle(bare)


def test_an_onnx_bundle_whose_graph_does_not_fit_its_contract_is_refused(spacenet_model, tmp_path):
    _, _, exports = spacenet_model
    folder = tmp_path / "m"
    shutil.copytree(exports["onnx"], folder)
    data = json.loads((folder / "model.json").read_text())
    data["input"]["bands"].append("nir")
    data["input"]["mean"].append(0.0)
    data["input"]["std"].append(1.0)
    data["input"]["band_indexes"] = None
    (folder / "model.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="1 channels where the contract has 2"):
        load_model(folder)
