import json
import pickle

import numpy as np
import pytest
import torch

from geoseg.errors import BundleError, OutputExistsError, UnknownNameError
from geoseg.io.raster import inspect_scene
from geoseg.model.bundle import read_bundle, save_bundle
from geoseg.model.contract import ArchSpec, ClassInfo, Contract, InputSpec
from geoseg.model.networks import build_network
from geoseg.model.preflight import check_scene
from geoseg.model.weights import load_model
from tests.conftest import make_bundle, write_raster


def _contract(**kw):
    base = dict(model=ArchSpec(architecture="conv1x1", encoder=None),
                input=InputSpec(bands=["r", "g"], mean=[1, 2], std=[3, 4], pixel_size=0.5),
                classes=[ClassInfo(id=0, name="bg"), ClassInfo(id=7, name="house", color=(255, 0, 0))],
                chip_size=64, overlap=8)
    base.update(kw)
    return Contract(**base)


@pytest.mark.parametrize("name", ["model", "model.safetensors"])
def test_round_trip_keeps_contract_and_weights(tmp_path, name):
    c = _contract()
    torch.manual_seed(0)
    net = build_network(c)
    b = save_bundle(tmp_path / name, c, net)
    loaded = load_model(b.path)
    assert loaded.contract.model_dump(exclude={"weights"}) == c.model_dump(exclude={"weights"})
    x = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), net.eval()(x))
    with pytest.raises(OutputExistsError):
        save_bundle(tmp_path / name, c, net)


def test_smp_bundle_round_trip(tmp_path):
    p = make_bundle(tmp_path / "u", architecture="unet", n_classes=2)
    m = load_model(p)
    assert m.contract.model.architecture == "unet"
    assert read_bundle(p / "model.json").contract.name == "tiny"


def test_invalid_contract_names_the_key(tmp_path):
    p = make_bundle(tmp_path / "m")
    data = json.loads((p / "model.json").read_text())
    data["input"]["std"] = [1.0, 0.0, 1.0]
    (p / "model.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"model.json: invalid model contract at 'input'.*positive"):
        read_bundle(p)
    data["input"]["std"] = [1.0, 1.0, 1.0]
    data["overlap"] = 60
    (p / "model.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="at most half"):
        read_bundle(p)


def test_missing_or_mismatched_weights(tmp_path):
    p = make_bundle(tmp_path / "m")
    other = make_bundle(tmp_path / "o", n_bands=4)
    (p / "weights.safetensors").write_bytes((other / "weights.safetensors").read_bytes())
    with pytest.raises(BundleError, match="do not fit"):
        load_model(p)
    (p / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match="missing"):
        read_bundle(p)
    with pytest.raises(BundleError, match="no such model bundle"):
        read_bundle(tmp_path / "nope")
    with pytest.raises(BundleError, match="not a model bundle"):
        read_bundle(tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_loading_never_executes_code_from_the_file(tmp_path, capsys):
    p = make_bundle(tmp_path / "m")
    data = json.loads((p / "model.json").read_text())
    data["weights"] = "weights.pt"
    (p / "model.json").write_text(json.dumps(data))
    with open(p / "weights.pt", "wb") as f:
        pickle.dump({"weight": _Evil()}, f)
    with pytest.raises(BundleError):
        load_model(p)
    assert "must never run" not in capsys.readouterr().out


def test_unknown_architecture_lists_valid_names(tmp_path):
    c = _contract(model=ArchSpec(architecture="unetx", encoder="resnet18"))
    with pytest.raises(UnknownNameError, match="deeplabv3plus.*unet"):
        build_network(c)


def test_preflight_checks_bands_and_warns_on_scale(tmp_path):
    c = _contract()
    scene = write_raster(tmp_path / "one.tif", np.zeros((1, 8, 8), np.uint8))
    info = inspect_scene(scene)
    with pytest.raises(BundleError, match=r"one.tif: has 1 band\(s\) but model 'model' reads band\(s\) 1,2.*--bands 1,1"):
        check_scene(c, info)
    pre = check_scene(c, info, [1, 1])
    assert pre.band_indexes == [1, 1]
    assert any("pixel size 2 m is far from the 0.5 m" in w for w in pre.warnings)


@pytest.mark.parametrize("change, where, what", [
    (lambda d: d.update(extra_key=1), "'extra_key'", "Extra inputs are not permitted"),
    (lambda d: d.pop("classes"), "'classes'", "Field required"),
    (lambda d: d.update(chip_size="big"), "'chip_size'", "valid integer"),
    (lambda d: d["input"].update(mean="x"), "'input.mean'", "valid list"),
    (lambda d: d["classes"][0].update(color=[300, 0, 0]), "'classes.0.color", "255"),
    (lambda d: d.update(weights="../../elsewhere.safetensors"), "'weights'", "file name"),
], ids=["extra", "missing", "mistyped", "mistyped-nested", "colour-range", "weights-path"])
def test_a_contract_with_extra_missing_or_mistyped_keys_is_refused_in_one_line(tmp_path, change, where, what):
    from click.testing import CliRunner

    from geoseg.cli import main

    p = make_bundle(tmp_path / "m")
    data = json.loads((p / "model.json").read_text())
    change(data)
    (p / "model.json").write_text(json.dumps(data))
    scene = write_raster(tmp_path / "s.tif", np.ones((3, 40, 40), dtype=np.uint8))
    r = CliRunner().invoke(main, ["predict", str(scene), "-m", str(p), "-o", str(tmp_path / "out")])
    line = r.output.strip().splitlines()[-1]
    assert r.exit_code == 1 and "model.json" in line and where in line and what in line, r.output
    assert "Traceback" not in r.output and not (tmp_path / "out").exists()


def test_a_scene_with_more_bands_than_the_training_scenes_is_ambiguous(tmp_path):
    """Indexes 1..3 recorded by training on 3-band scenes do not say which 3 of 5 unnamed bands to read."""
    from rasterio.transform import from_origin

    five = inspect_scene(write_raster(tmp_path / "five.tif", np.ones((5, 8, 8), np.uint8),
                                      transform=from_origin(500000, 5100000, 1, 1)))
    three = inspect_scene(write_raster(tmp_path / "three.tif", np.ones((3, 8, 8), np.uint8)))
    spec = dict(bands=["r", "g", "b"], band_indexes=[1, 2, 3], mean=[0.0] * 3, std=[1.0] * 3)
    for inputs, metadata in (({"scene_bands": 3}, {}), ({}, {}),  # recorded; implied by default indexes
                             ({}, {"training": {"config": {"data": {"bands": None}}}})):
        contract = Contract(model=ArchSpec(), input=InputSpec(**spec, **inputs), metadata=metadata,
                            classes=[ClassInfo(id=1, name="a")])
        with pytest.raises(BundleError, match=r"five.tif: has 5 bands .* trained on scenes of 3 .*--bands 1,2,3"):
            check_scene(contract, five)
        assert check_scene(contract, five, [5, 4, 3]).band_indexes == [5, 4, 3]
        assert check_scene(contract, three).band_indexes == [1, 2, 3]
    # indexes chosen on purpose are trusted: training on 5-band scenes, or data.bands, or [4, 3, 2]
    for inputs, metadata in (({"scene_bands": 5}, {}), ({}, {"training": {"config": {"data": {"bands": [1, 2, 3]}}}}),
                             ({"band_indexes": [4, 3, 2]}, {})):
        contract = Contract(model=ArchSpec(), input=InputSpec(**{**spec, **inputs}), metadata=metadata,
                            classes=[ClassInfo(id=1, name="a")])
        assert check_scene(contract, five).band_indexes == contract.input.default_indexes
