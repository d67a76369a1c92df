"""geoseg pretrain: masked-image modelling on unlabelled scenes writes an encoder that training starts from."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from geoseg.cli import main
from geoseg.errors import ConfigError, InputError
from geoseg.learn.config import PretrainConfig, config_from_dict
from geoseg.learn.network import build_model
from geoseg.learn.pretrain import pretrain
from tests._training import tiny_config, write_scene

MODEL = {"architecture": "unet", "encoder": "resnet18", "params": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}}


@pytest.fixture
def scene(tmp_path):
    return write_scene(tmp_path, size=128)


def test_pretraining_writes_an_encoder_that_training_starts_from(tmp_path, scene):
    cfg = PretrainConfig(scenes=[str(scene[0])], model=MODEL, chip_size=32, batch_size=4, mask_patch=8, steps=6,
                         max_seconds=None)
    res = pretrain(cfg, tmp_path / "enc.safetensors")
    assert res.steps == 6 and res.chips == 24
    state = load_file(str(res.path))
    assert state and all(k.startswith("encoder.") for k in state)
    with safe_open(str(res.path), "pt") as f:
        meta = json.loads(f.metadata()["geoseg_pretrain"])
    assert meta["encoder"] == "resnet18" and meta["bands"] == [1, 2, 3] and meta["steps"] == 6
    # a seeded run of fixed steps is repeatable
    again = pretrain(cfg, tmp_path / "again.safetensors")
    assert all(torch.equal(state[k], load_file(str(again.path))[k]) for k in state)
    # training names the file and its encoder starts there
    net = build_model(config_from_dict(tiny_config(*scene, model={**MODEL, "encoder_weights": str(res.path)})), 3)
    assert torch.equal(net.state_dict()["encoder.layer1.0.conv1.weight"], state["encoder.layer1.0.conv1.weight"])


def test_pretrain_cli_and_its_errors(tmp_path, scene):
    cfg = tmp_path / "p.yaml"
    cfg.write_text(yaml.safe_dump({"scenes": [scene[0].name], "model": MODEL, "chip_size": 32, "batch_size": 2,
                                   "mask_patch": 8, "steps": 2, "max_seconds": None}))
    out = tmp_path / "enc.safetensors"
    r = CliRunner().invoke(main, ["pretrain", str(cfg), "-o", str(out)])
    assert r.exit_code == 0 and "encoder:" in r.output and out.exists(), r.output
    r = CliRunner().invoke(main, ["pretrain", str(cfg), "-o", str(out)])
    assert r.exit_code == 1 and "--overwrite" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"scenes": [scene[0].name], "chip_size": 32, "mask_patch": 7}))
    r = CliRunner().invoke(main, ["pretrain", str(bad), "-o", str(tmp_path / "x.safetensors")])
    assert r.exit_code == 1 and "mask_patch 7 must divide chip_size 32" in r.output
    with pytest.raises(InputError, match="smaller than chip_size"):
        pretrain(PretrainConfig(scenes=[str(scene[0])], model=MODEL, chip_size=256, steps=1), tmp_path / "y.safetensors")
    with pytest.raises(ConfigError, match="unknown key"):
        from geoseg.learn.config import load_pretrain_config

        bad.write_text(yaml.safe_dump({"scenes": ["a.tif"], "epochs": 3}))
        load_pretrain_config(bad)
