"""Training from a pretrained weights file: a config that names only the file, the bundle's record of it, and the
fine-tuning knobs (each has a test that fails when the knob does nothing)."""

from __future__ import annotations

import math

import pytest
import torch

from geoseg.errors import ConfigError
from geoseg.learn.config import config_from_dict
from geoseg.learn.sizing import fit_to_data
from geoseg.learn.train import train
from geoseg.model.bundle import read_bundle
from tests._training import tiny_config, write_scene
from tests.model.test_pretrained import write_weights

RGB = ["red", "green", "blue"]


@pytest.fixture
def scene(tmp_path):
    return write_scene(tmp_path)


def _named(scene, weights, **overrides):
    """A tiny config whose model names only the weights file (the rest sized), bands named red, green, blue."""
    cfg = tiny_config(*scene, **overrides)
    cfg["model"] = {"encoder_weights": str(weights), **overrides.get("model", {})}
    cfg["data"]["band_names"] = RGB
    return cfg


def test_naming_the_file_is_enough_the_encoder_comes_from_its_metadata(tmp_path, scene):
    timm = write_weights(tmp_path, "timm", bands=RGB)
    fitted = fit_to_data(config_from_dict(_named(scene, timm)))
    assert fitted.model.encoder == "tu-resnet10t" and fitted.model.architecture == "unet"
    assert fitted.model.params["encoder_depth"] == 3  # the rest sized as without weights
    network = write_weights(tmp_path, "network", bands=RGB, architecture="unetplusplus")
    cfg = _named(scene, network)
    assert fit_to_data(config_from_dict(cfg)).model.architecture == "unetplusplus"
    cfg["model"]["architecture"] = "fpn"  # what the user sets stays
    assert fit_to_data(config_from_dict(cfg)).model.architecture == "fpn"
    cfg["model"]["encoder"] = "mobilenet_v2"
    with pytest.raises(ConfigError, match=r"model.encoder 'mobilenet_v2' disagrees with model.encoder_weights "
                                          r".*network-3.safetensors.*made for 'resnet18'"):
        fit_to_data(config_from_dict(cfg))
    cfg["model"]["encoder"] = "resnet18"  # agreeing is fine
    assert fit_to_data(config_from_dict(cfg)).model.encoder == "resnet18"


def test_a_run_records_where_its_encoder_came_from_and_info_shows_it(tmp_path, scene):
    from geoseg.model.mlm import mlm_item
    from geoseg.predict.report import describe_path, describe_text

    weights = write_weights(tmp_path, "encoder", bands=["blue", "green", "red", "nir"])
    cfg = _named(scene, weights, epochs=1)
    res = train(cfg, tmp_path / "run")
    c = read_bundle(res.bundle_path).contract
    assert c.model.encoder == "resnet18"
    p = c.pretrained
    assert p is not None and p.file == weights.name and len(p.sha256 or "") == 64
    assert p.pretrained_on == "test encoder" and p.matched == RGB and p.bands == ["blue", "green", "red", "nir"]
    text = describe_text(describe_path(str(res.bundle_path)))
    assert f"started from {weights.name}, sha256 {p.sha256[:12]}" in text and "pretrained on test encoder" in text
    assert "red <- red, green <- green, blue <- blue" in text
    item = mlm_item(read_bundle(res.bundle_path), tmp_path / "item.json")
    assert item["properties"]["mlm:pretrained"] is True
    assert item["properties"]["mlm:pretrained_source"] == "test encoder"
    # without weights: nothing recorded
    plain = train(tiny_config(*scene, epochs=1), tmp_path / "plain")
    assert read_bundle(plain.bundle_path).contract.pretrained is None


def test_a_file_that_shares_no_band_fails_before_the_run_folder_is_made(tmp_path, scene):
    weights = write_weights(tmp_path, "encoder", bands=["nir", "swir16"])
    with pytest.raises(ConfigError, match=r"bands \(nir, swir16\) share none with the config's \(red, green, blue\)"):
        train(_named(scene, weights), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_pretrained_normalisation_uses_the_statistics_the_weights_expect(tmp_path, scene):
    weights = write_weights(tmp_path, "encoder", bands=RGB, pretrained_on="ImageNet (test)")
    res = train(_named(scene, weights, epochs=1, model={"normalization": "pretrained"}), tmp_path / "run")
    c = read_bundle(res.bundle_path).contract
    assert c.input.mean == pytest.approx([0.485 * 255, 0.456 * 255, 0.406 * 255])
    assert c.input.std == pytest.approx([0.229 * 255, 0.224 * 255, 0.225 * 255])
    data = train(_named(scene, weights, epochs=1), tmp_path / "data")  # the default: the data's statistics
    assert read_bundle(data.bundle_path).contract.input.mean[0] != pytest.approx(0.485 * 255)
    with pytest.raises(ConfigError, match="normalization 'pretrained' needs model.encoder_weights"):
        config_from_dict(tiny_config(*scene, model={"normalization": "pretrained"}))


def test_the_encoder_learning_rate_scale_and_the_warm_up():
    from geoseg.learn.optim import Schedule, optimizer
    from geoseg.model.contract import ArchSpec
    from geoseg.model.networks import create_network

    net = create_network(ArchSpec(encoder="resnet18", params={"encoder_depth": 3, "decoder_channels": [16, 8, 8]}), 3, 2)
    base = {"name": "t", "classes": [{"id": 0, "name": "a"}, {"id": 1, "name": "b"}],
            "data": {"scenes": [{"image": "x.tif", "labels": "y.tif"}]}}
    cfg = config_from_dict({**base, "optimizer": {"encoder_lr_scale": 0.1, "schedule": "none"}})
    opt = optimizer(cfg, net)
    Schedule("none", 1e-3, opt, 10, None)
    enc = {id(p) for p in net.encoder.parameters()}  # type: ignore[union-attr]
    for g in opt.param_groups:
        inside = all(id(p) in enc for p in g["params"])
        assert inside or not any(id(p) in enc for p in g["params"])
        assert g["lr"] == pytest.approx(1e-4 if inside else 1e-3)
    assert len(optimizer(config_from_dict(base), net).param_groups) == 2  # the default: one rate, two groups
    s = Schedule("cosine", 1.0, opt, 100, None, warmup=0.2)
    assert s.rate(0.0) == pytest.approx(1 / 25) and s.rate(0.1) < s.rate(0.2) == pytest.approx(1.0)
    assert s.rate(1.0) == pytest.approx(0.01)
    assert Schedule("cosine", 1.0, opt, 100, None).rate(0.0) == pytest.approx(1.0)  # no warm-up unless asked
    one = Schedule("onecycle", 1.0, opt, 100, None, warmup=0.1)
    assert one.rate(0.1) == pytest.approx(1.0) and one.rate(0.3) < 1.0
    assert math.isclose(Schedule("onecycle", 1.0, opt, 100, None).rate(0.3), 1.0)


def _encoder_state(bundle_path):
    from safetensors.torch import load_file

    return {k: v for k, v in load_file(str(bundle_path / "weights.safetensors")).items() if k.startswith("encoder.")}


def test_frozen_batchnorm_and_a_frozen_encoder_keep_the_pretrained_weights(tmp_path, scene):
    weights = write_weights(tmp_path, "encoder", bands=RGB)
    start = {f"encoder.{k}": v for k, v in read_weights(weights).items()}
    res = train(_named(scene, weights, model={"freeze_bn": True}), tmp_path / "bn")
    after = _encoder_state(res.bundle_path)
    bn = [k for k in after if ".bn" in k or k.startswith("encoder.bn1.")]
    assert bn and all(torch.equal(after[k], start[k]) for k in bn if not k.endswith("num_batches_tracked"))
    assert not torch.equal(after["encoder.conv1.weight"], start["encoder.conv1.weight"])  # the convolutions train
    free = train(_named(scene, weights), tmp_path / "free")  # without the knob, BatchNorm statistics move
    assert not torch.equal(_encoder_state(free.bundle_path)["encoder.bn1.running_mean"], start["encoder.bn1.running_mean"])
    # frozen for the whole (4-step) run: the encoder's weights stay, the decoder's train
    frozen = train(_named(scene, weights, model={"freeze_encoder_fraction": 0.9, "freeze_bn": True}), tmp_path / "enc")
    after = _encoder_state(frozen.bundle_path)
    assert all(torch.equal(after[k], start[k]) for k in after if k in start and not k.endswith("num_batches_tracked"))


def read_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_the_encoder_freeze_follows_the_run_progress():
    from geoseg.learn.finetune import EncoderFreeze
    from geoseg.model.contract import ArchSpec
    from geoseg.model.networks import create_network

    net = create_network(ArchSpec(encoder="resnet18", params={"encoder_depth": 3, "decoder_channels": [16, 8, 8]}), 3, 2)
    freeze = EncoderFreeze(net, 0.25)
    freeze.update(0.0)
    assert not any(p.requires_grad for p in net.encoder.parameters())  # type: ignore[union-attr]
    assert all(p.requires_grad for p in net.decoder.parameters())  # type: ignore[union-attr]
    freeze.update(0.3)
    assert all(p.requires_grad for p in net.encoder.parameters())  # type: ignore[union-attr]


def test_rotation_shift_and_shear_move_image_and_target_together():
    from geoseg.learn.augment import Affine, from_config
    from geoseg.learn.config import AugmentConfig

    image = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4)
    target = torch.arange(16).reshape(4, 4) % 3
    g = torch.Generator().manual_seed(0)
    img, tgt = Affine(rotate=180, p=1.0)(image, target, g)  # an angle in +-180: a real rotation
    assert img.shape == image.shape and tgt.dtype == torch.int64
    exact = Affine(rotate=0, shift=0.5, p=1.0, ignore_index=-100)
    img, tgt = exact(image, target, torch.Generator().manual_seed(3))
    outside = tgt == -100
    assert outside.any() and img[0][outside].sum() < image[0][outside].sum()  # brought in from outside: ignored
    kept = ~outside
    assert set(tgt[kept].tolist()) <= {0, 1, 2}
    assert from_config(AugmentConfig()) is not None and not any(
        isinstance(t, Affine) for t in from_config(AugmentConfig()).transforms)  # type: ignore[union-attr]
    paper = from_config(AugmentConfig(rotate=180, shift=0.1, shear=10))
    assert any(isinstance(t, Affine) for t in paper.transforms)  # type: ignore[union-attr]
    # a rotation turns about the chip's centre: the centre keeps its class whatever the angle
    centre = torch.zeros(5, 5, dtype=torch.int64)
    centre[2, 2] = 1
    for seed in range(5):
        _, t = Affine(rotate=180, p=1.0)(torch.zeros(1, 5, 5), centre, torch.Generator().manual_seed(seed))
        assert t[2, 2] == 1
