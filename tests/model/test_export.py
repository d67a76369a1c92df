import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from geoseg.errors import OutputExistsError, UnknownNameError
from geoseg.io.raster import SceneReader, inspect_scene
from geoseg.model.bundle import read_bundle
from geoseg.model.contract import InputSpec
from geoseg.model.export import export, run_onnx, run_torchscript
from geoseg.model.weights import load_model
from geoseg.predict.tiling import ChipGrid
from tests.conftest import make_bundle


@pytest.fixture(scope="module")
def unet_bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bundle")
    spec = InputSpec(bands=["red", "green", "blue"], mean=[60.0, 60.0, 60.0], std=[40.0, 40.0, 40.0])
    return make_bundle(folder / "model", architecture="unet", chip=128, overlap=0, input=spec, seed=3)


def _class_map(scene, contract, run) -> np.ndarray:
    """The class map of nine chips of the scene's global grid (edges included), with ``run(batch) -> logits``."""
    info = inspect_scene(scene)
    reader = SceneReader(str(scene), [1, 2, 3], contract.input.mean, contract.input.std)
    out = np.zeros((info.height, info.width), dtype=np.int64)
    chips = [c for c in ChipGrid(info.width, info.height, 128, 0) if c.row in (0, 2, 5) and c.col in (1, 3, 6)]
    batch = np.stack([reader.read(c.window, size=(128, 128))[0] for c in chips])
    logits = np.concatenate([run(batch[i:i + 16]) for i in range(0, len(batch), 16)])
    for chip, lg in zip(chips, logits, strict=True):
        w = chip.window
        h, wd = min(128, info.height - w.row_off), min(128, info.width - w.col_off)
        out[w.row_off:w.row_off + h, w.col_off:w.col_off + wd] = lg.argmax(0)[:h, :wd]
    reader.close()
    return out


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_gives_the_same_class_map_on_a_real_scene(fmt, unet_bundle, real_data, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnx")
    result = export(unet_bundle, fmt, tmp_path / f"exp-{fmt}")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-3
    contract = json.loads(result.contract_path.read_text())
    assert contract["weights"] == result.model_path.name and contract["metadata"]["export"]["format"] == fmt
    assert read_bundle(unet_bundle).contract.input == read_bundle(result.folder).contract.input
    loaded = load_model(unet_bundle)
    scene = real_data / "landsat_rgb" / "RGB.byte.tif"
    runner = run_onnx if fmt == "onnx" else run_torchscript

    def torch_run(x):  # the ONNX graph ends in a softmax (probabilities, for Deepness); TorchScript in logits
        with torch.no_grad():
            logits = loaded.module(torch.from_numpy(x))
            return (logits.softmax(1) if fmt == "onnx" else logits).numpy()

    want = _class_map(scene, loaded.contract, torch_run)
    got = _class_map(scene, loaded.contract, lambda x: runner(result.model_path, x))
    assert len(np.unique(want)) > 1
    assert (want == got).mean() > 0.9999  # only exact logit ties could flip


def test_export_errors(unet_bundle, tmp_path):
    with pytest.raises(UnknownNameError, match="onnx, torchscript"):
        export(unet_bundle, "tflite")
    out = export(unet_bundle, "torchscript", tmp_path / "x", check=False)
    assert out.max_abs_diff is None
    with pytest.raises(OutputExistsError):
        export(unet_bundle, "torchscript", tmp_path / "x")


def test_cli_export(tmp_path):
    from geoseg.cli import main

    model = make_bundle(tmp_path / "m")
    res = CliRunner().invoke(main, ["export", str(model), "--format", "torchscript"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "m-torchscript" / "model.json").exists() and "model.torchscript.pt" in res.output
