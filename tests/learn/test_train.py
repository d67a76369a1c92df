import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from geoseg.errors import ConfigError, OutputExistsError, UnknownNameError
from geoseg.io.staging import HOST
from geoseg.learn.config import TrainConfig, config_from_dict, load_config
from geoseg.learn.data import IGNORE_INDEX
from geoseg.learn.train import LOSSES, TrainProgress, build_loss, train
from geoseg.model.bundle import read_bundle
from geoseg.model.weights import load_model
from tests._training import tiny_config, write_scene
from tests.conftest import write_raster


@pytest.fixture
def scene(tmp_path):
    return write_scene(tmp_path)


def _interrupt_in_epoch_2(ev: TrainProgress) -> None:
    """A progress callback that stops the run during its second epoch, as Ctrl-C does."""
    if ev.stage == "train" and ev.epoch == 2:
        raise KeyboardInterrupt


def _weights(result):
    return load_file(str(result.bundle_path / "weights.safetensors"))


def test_train_writes_a_bundle_with_the_full_contract(tmp_path, scene):
    events: list[TrainProgress] = []
    cfg = tiny_config(*scene, plots=True, tensorboard=True, model={"dropout": 0.2})
    result = train(cfg, tmp_path / "run", progress=events.append)
    b = read_bundle(result.bundle_path)
    c = b.contract
    assert c.model.architecture == "unet" and c.model.params["encoder_depth"] == 3
    assert c.input.bands == ["band1", "band2", "band3"] and c.input.band_indexes == [1, 2, 3]
    assert c.input.dtype == "uint8" and c.input.pixel_size == pytest.approx(2.0)
    assert len(c.input.mean) == 3 and all(s > 0 for s in c.input.std)
    assert [k.name for k in c.classes] == ["water", "vegetation", "buildings"] and c.class_ids == [1, 2, 3]
    assert c.classes[0].color == (0, 0, 255)
    assert c.chip_size == 32 and c.overlap == 8
    assert c.metadata["training"]["config"]["data"]["chip_size"] == 32
    assert c.metadata["validation"]["miou"] == result.metrics["miou"]
    assert 0 <= result.metrics["miou"] <= 1 and len(result.metrics["classes"]) == 3
    net = load_model(result.bundle_path).module
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 3, 32, 32)
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "split/split.json",
                 "model/config.yaml", "model/metrics.json", "model/metrics.md", "plots/loss.png",
                 "plots/metrics.png", "plots/confusion.png", "plots/val_chips.png"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").iterdir())
    from geoseg.model.quantize import bundle_calibration

    chips = bundle_calibration(b)  # training chips for int8 calibration, normalised like the network's input
    assert chips is not None and chips.shape[1:] == (3, 32, 32) and 1 <= len(chips) <= 64
    assert len((out / "metrics.csv").read_text().splitlines()) == 3
    assert json.loads((out / "model" / "metrics.json").read_text())["epoch"] == result.best_epoch
    stages = {e.stage for e in events}
    assert {"train", "val"} <= stages and any(e.stage.startswith("scan") for e in events)
    assert config_from_dict(yaml.safe_load((out / "config.yaml").read_text())).data.chip_size == 32
    with pytest.raises(OutputExistsError, match="--resume"):
        train(cfg, out)


def test_a_fixed_seed_makes_runs_repeatable(tmp_path, scene):
    cfg = tiny_config(*scene, model={"dropout": 0.3})
    a = train(cfg, tmp_path / "a")
    b = train(cfg, tmp_path / "b")
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a.metrics == b.metrics and [r["train_loss"] for r in a.history] == [r["train_loss"] for r in b.history]
    c = train(tiny_config(*scene, seed=1, model={"dropout": 0.3}), tmp_path / "c")
    assert not all(torch.equal(wa[k], _weights(c)[k]) for k in wa)


def test_resume_continues_exactly_where_the_run_stopped(tmp_path, scene):
    full = train(tiny_config(*scene, epochs=3, optimizer={"schedule": "cosine"}), tmp_path / "full")
    # interrupted during the second epoch (as by Ctrl-C), then resumed
    part = config_from_dict(tiny_config(*scene, epochs=3, optimizer={"schedule": "cosine"}))
    part_run = tmp_path / "part"

    with pytest.raises(KeyboardInterrupt):
        train(part, part_run, progress=_interrupt_in_epoch_2)
    ckpt = torch.load(part_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["progress"]["epoch"] == 1
    resumed = train(part, part_run, resume=True)
    assert resumed.epochs_run == 3
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in full.history]
    wf, wr = _weights(full), _weights(resumed)
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    with pytest.raises(ConfigError, match="differs"):
        train(tiny_config(*scene, epochs=3, batch_size=2), part_run, resume=True)


def test_resume_sweeps_the_temporary_of_a_checkpoint_killed_mid_save(tmp_path, scene):
    cfg = tiny_config(*scene, epochs=1)
    train(cfg, tmp_path / "run")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ckpts = tmp_path / "run" / "checkpoints"
    stale = ckpts / f".best.ckpt.tmp-{HOST}-{dead.pid}-0123abcd"  # SIGKILL between staging and publishing
    live = ckpts / f".last.ckpt.tmp-{HOST}-{os.getppid()}-0123abcd"  # another live process's: left alone
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    result = train(cfg, tmp_path / "run", resume=True)  # the run had ended: it only writes its bundle again
    assert result.epochs_run == 1
    assert not stale.exists() and live.exists()


def test_conv1x1_sigmoid_binary_sgd_onecycle_and_early_stopping(tmp_path):
    image, labels = write_scene(tmp_path)
    cfg = tiny_config(image, labels, classes=[{"id": 1, "name": "water"}, {"id": 2, "name": "land"}],
                      model={"architecture": "conv1x1", "encoder": None, "params": {}, "activation": "sigmoid"},
                      loss={"bce": 1.0, "dice": 0.5, "focal": 0.5, "lovasz": 0.5, "jaccard": 0.5},
                      optimizer={"name": "sgd", "schedule": "onecycle", "lr": 0.05},
                      epochs=6, early_stopping={"patience": 1, "min_delta": 10.0}, class_weights="auto")
    result = train(cfg, tmp_path / "run")
    assert result.stopped_early and result.epochs_run == 2 and result.best_epoch == 1
    c = read_bundle(result.bundle_path).contract
    assert c.model.activation == "sigmoid" and c.out_channels == 1


def test_every_loss_in_both_modes_handles_ignored_pixels(scene):
    image, labels = scene
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :4] = IGNORE_INDEX
    for name in LOSSES:
        for mode in ("softmax", "sigmoid"):
            classes = tiny_config(image, labels)["classes"][: 3 if mode == "softmax" else 2]
            cfg = config_from_dict(tiny_config(image, labels, classes=classes, loss=[name],
                                               model={"activation": mode}))
            loss = build_loss(cfg, [1.0] * len(classes))
            k = 1 if mode == "sigmoid" else 3
            t = target.clamp(max=len(classes) - 1).masked_fill(target == IGNORE_INDEX, IGNORE_INDEX)
            logits = torch.randn(2, k, 8, 8, requires_grad=True)
            value = loss(logits, t)
            value.backward()
            assert torch.isfinite(value), (name, mode)
            all_ignored = torch.full_like(t, IGNORE_INDEX)
            assert torch.isfinite(loss(torch.randn(2, k, 8, 8), all_ignored)), (name, mode)


def test_config_errors_name_the_file_key_and_allowed_values(tmp_path, scene):
    cfg = tiny_config(*scene)
    path = tmp_path / "c.yaml"

    def err(mutate):
        d = json.loads(json.dumps(cfg))
        mutate(d)
        path.write_text(yaml.safe_dump(d))
        with pytest.raises(ConfigError) as info:
            load_config(path)
        msg = str(info.value)
        assert str(path) in msg and "\n" not in msg
        return msg

    msg = err(lambda d: d.__setitem__("optimizer", {"name": "adam"}))
    assert "optimizer.name" in msg and "'adamw' or 'sgd'" in msg
    msg = err(lambda d: d["data"].__setitem__("chipsize", 3))
    assert "data.chipsize" in msg and "chip_size" in msg and "unknown key" in msg
    msg = err(lambda d: d.__setitem__("loss", ["dice", "hinge"]))
    assert "loss.1.name" in msg and "lovasz" in msg
    msg = err(lambda d: d["model"].__setitem__("architecture", "resnet"))
    assert "unet" in msg and "deeplabv3plus" in msg
    msg = err(lambda d: d.pop("classes"))
    assert "'classes'" in msg and "missing" in msg
    path.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config"):
        load_config(tmp_path / "none.yaml")


def test_example_configs_validate():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    for name in ("buildings-unet.yaml", "landcover-unet.yaml"):
        assert isinstance(load_config(root / name), TrainConfig)


def test_unknown_loss_lists_valid_names(scene):
    cfg = config_from_dict(tiny_config(*scene))
    cfg.loss[0].__dict__["name"] = "hinge"  # bypass validation to reach the registry
    with pytest.raises(UnknownNameError, match="cross_entropy, dice"):
        build_loss(cfg)


def test_cli_train(tmp_path, scene):
    from geoseg.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_config(*scene, epochs=1, model={"architecture": "conv1x1", "encoder": None,
                                                                        "params": {}})))
    res = CliRunner().invoke(main, ["train", str(path), "--output-dir", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "model bundle:" in res.output and (tmp_path / "run" / "model" / "model.json").exists()
    res = CliRunner().invoke(main, ["train", str(path), "--output-dir", str(tmp_path / "run")])
    assert res.exit_code == 1 and "--overwrite" in res.output
    res = CliRunner().invoke(main, ["train", str(path), "-o", str(tmp_path / "run"), "--resume"])
    assert res.exit_code == 0, res.output
    np.testing.assert_equal(len((tmp_path / "run" / "metrics.csv").read_text().splitlines()), 2)


def _schedule(kind, total_steps=100, max_seconds=None, lr=1e-3):
    from geoseg.learn.optim import Schedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    return Schedule(kind, lr, opt, total_steps, max_seconds), opt


@pytest.mark.parametrize("kind", ["onecycle", "cosine", "none"])
def test_the_schedule_completes_within_the_steps_or_the_time_budget_whichever_binds(kind):
    by_steps, opt = _schedule(kind)
    rates = []
    for k in range(100):
        by_steps.step(seconds=float(k))  # no budget: time does not count
        rates.append(opt.param_groups[0]["lr"])
    assert by_steps.done and by_steps.progress == 1.0
    by_time, opt2 = _schedule(kind, total_steps=10_000, max_seconds=50.0)
    timed = []
    for k in range(1, 1000):
        by_time.step(seconds=k * 0.5)  # 2 steps per second: the budget ends after 100 of 10,000 steps
        timed.append(opt2.param_groups[0]["lr"])
        if by_time.done:
            break
    assert by_time.steps == 100 and timed == pytest.approx(rates)  # the same curve, driven by time
    if kind == "onecycle":
        assert max(rates) == pytest.approx(1e-3, rel=1e-3) and 25 <= rates.index(max(rates)) <= 31
        assert rates[-1] == pytest.approx(1e-3 / 25 / 1e4)
    elif kind == "cosine":
        assert rates[-1] == pytest.approx(1e-5) and rates == sorted(rates, reverse=True)
    else:
        assert set(rates) == {1e-3}


def test_time_kept_for_the_last_validation_ends_the_schedule_earlier():
    s, _ = _schedule("cosine", total_steps=10_000, max_seconds=100.0)
    s.reserve = 20.0
    s.step(seconds=40.0)
    assert s.progress == pytest.approx(0.5)


def test_a_time_budget_ends_the_run_with_its_schedule_complete_and_says_what_it_bought(tmp_path, scene):
    cfg = tiny_config(*scene, epochs=500, steps_per_epoch=2, max_seconds=4.0, optimizer={"schedule": "onecycle"})
    res = train(cfg, tmp_path / "run")
    assert res.stopped_by == "max_seconds" and 1 <= res.epochs_run < 500
    assert res.chips_seen == res.history[-1]["chips"] > 0
    assert res.history[-1]["lr"] < 1e-3 / 100  # annealed: the schedule ran to its end within the budget
    training = json.loads((res.bundle_path / "model.json").read_text())["metadata"]["training"]
    assert training["stopped_by"] == "max_seconds" and training["chips_seen"] == res.chips_seen
    assert training["epochs_run"] == res.epochs_run and training["best_epoch"] == res.best_epoch
    assert 0 < training["seconds"] <= 4.0 + 3.0  # the budget, and the last validation it kept time for


def test_passes_over_the_labelled_pixels_end_the_run_with_its_schedule_complete(tmp_path, scene):
    cfg = tiny_config(*scene, epochs=None, steps_per_epoch=2, max_seconds=600.0, passes=3.0,
                      optimizer={"schedule": "onecycle"})
    res = train(cfg, tmp_path / "run")
    training = json.loads((res.bundle_path / "model.json").read_text())["metadata"]["training"]
    assert res.stopped_by == training["stopped_by"] == "passes"
    per_step = training["passes"] / (res.chips_seen / 4)  # 4 chips a step
    assert 3.0 <= training["passes"] < 3.0 + per_step + 1e-6  # the step that reached 3 passes was the last
    assert res.history[-1]["lr"] < 1e-3 / 100  # annealed within the passes
    assert training["seconds"] < 600


def test_pretrained_weights_cap_the_passes_unless_told_otherwise(scene):
    weights = {"encoder_weights": "encoder.safetensors"}
    assert config_from_dict(tiny_config(*scene, epochs=None, max_seconds=60.0, model=weights)).pass_limit == 200
    assert config_from_dict(tiny_config(*scene, epochs=None, model=weights)).pass_limit == 200
    assert config_from_dict(tiny_config(*scene, epochs=None, max_seconds=60.0)).pass_limit is None  # from scratch
    assert config_from_dict(tiny_config(*scene, epochs=50, model=weights)).pass_limit is None  # epochs decide
    assert config_from_dict(tiny_config(*scene, epochs=50, model=weights, passes=10)).pass_limit == 10


def test_a_bundle_holds_only_the_weights_its_network_uses(tmp_path, scene):
    from geoseg.model.weights import load_model

    res = train(tiny_config(*scene, epochs=1), tmp_path / "run")  # U-Net resnet18 at encoder_depth 3
    contract = json.loads((res.bundle_path / "model.json").read_text())
    assert contract["model"]["unused"] == ["encoder.layer3", "encoder.layer4"]
    loaded = load_model(res.bundle_path)
    names = set(loaded.module.state_dict())
    assert not any(n.startswith(("encoder.layer3.", "encoder.layer4.")) for n in names)
    assert (res.bundle_path / "weights.safetensors").stat().st_size < 3_000_000  # was 45 MB at resnet34 depth 3
    # the bundle's network gives what the trained one gives
    import torch

    from geoseg.learn.config import config_from_dict
    from geoseg.learn.network import build_model

    full = build_model(config_from_dict(tiny_config(*scene)), 3)
    full.load_state_dict(loaded.module.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(full.eval()(x), loaded.module(x))


def test_encoder_weights_from_a_local_file_start_the_encoder_there(tmp_path, scene):
    """No network needed: a pretrained encoder from a local file (here a trained bundle's), bands adapted."""
    from safetensors.torch import load_file

    from geoseg.errors import ConfigError
    from geoseg.learn.config import config_from_dict
    from geoseg.learn.network import build_model

    first = train(tiny_config(*scene, epochs=1), tmp_path / "first")
    weights = first.bundle_path / "weights.safetensors"
    saved = load_file(str(weights))
    net = build_model(config_from_dict(tiny_config(*scene, model={"encoder_weights": str(weights)})), 3)
    assert torch.equal(net.state_dict()["encoder.layer1.0.conv1.weight"], saved["encoder.layer1.0.conv1.weight"])
    one_band = build_model(config_from_dict(tiny_config(*scene, model={"encoder_weights": str(weights)})), 1)
    assert torch.allclose(one_band.state_dict()["encoder.conv1.weight"],
                          saved["encoder.conv1.weight"].sum(dim=1, keepdim=True))
    with pytest.raises(ConfigError, match="model.encoder_weights .*no such file"):
        build_model(config_from_dict(tiny_config(*scene, model={"encoder_weights": str(tmp_path / "x.pth")})), 3)
    other = tiny_config(*scene, model={"encoder": "efficientnet-b0", "encoder_weights": str(weights),
                                       "params": {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}})
    with pytest.raises(ConfigError, match="does not fit encoder"):
        build_model(config_from_dict(other), 3)


def test_what_a_config_leaves_unset_is_sized_to_the_scenes(tmp_path):
    from geoseg.learn.sizing import fit_to_data

    small, small_labels = write_scene(tmp_path, size=64, name="small")  # 64 px: 32 px chips, depth 3
    cfg = tiny_config(small, small_labels)
    del cfg["model"]
    del cfg["data"]["chip_size"]
    del cfg["data"]["split_block"]
    fitted = fit_to_data(config_from_dict(cfg))
    assert fitted.data.chip_size == 32 and fitted.data.split_block == 32 and fitted.data.overlap == 8
    assert fitted.model.encoder == "resnet18" and fitted.model.params["encoder_depth"] == 3
    big = write_raster(tmp_path / "big.tif", np.zeros((1, 600, 700), dtype=np.uint8))
    cfg["data"]["scenes"] = [{"image": str(big), "labels": str(big)}]
    fitted = fit_to_data(config_from_dict(cfg))
    assert fitted.data.chip_size == 256 and fitted.model.params == {"encoder_depth": 5,
                                                                  "decoder_channels": [256, 128, 64, 32, 16]}
    cfg["data"]["chip_size"] = 128  # a chip the user sets sizes the default network too
    fitted = fit_to_data(config_from_dict(cfg))
    assert fitted.model.params == {"encoder_depth": 4, "decoder_channels": [128, 64, 32, 16]}
    cfg["data"]["chip_size"] = 64  # what the user sets stays; what they leave unset is sized, key by key
    cfg["model"] = {"encoder": "resnet34"}
    fitted = fit_to_data(config_from_dict(cfg))
    assert fitted.data.chip_size == 64 and fitted.model.encoder == "resnet34"
    assert fitted.model.params == {"encoder_depth": 3, "decoder_channels": [64, 32, 16]}
    cfg["model"] = {"dropout": 0.3}  # a regularisation setting does not swap the network
    fitted = fit_to_data(config_from_dict(cfg))
    assert fitted.model.encoder == "resnet18" and fitted.model.params["encoder_depth"] == 3
    assert fitted.model.dropout == 0.3
    cfg["model"] = {"architecture": "fpn"}  # another architecture keeps its own parameters
    fitted = fit_to_data(config_from_dict(cfg))
    assert fitted.model.encoder == "resnet18" and fitted.model.params == {}


def test_a_moving_average_of_the_weights_is_what_validation_scores_and_the_bundle_keeps(tmp_path, scene):
    cfg = tiny_config(*scene, epochs=2, optimizer={"ema": 0.5})
    cfg["data"]["val_fraction"] = 0.0  # every epoch is kept: the bundle is the last epoch's average
    result = train(cfg, tmp_path / "run")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    kept = _weights(result)
    averaged = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert kept and all(torch.equal(kept[k], averaged[k]) for k in kept)
    assert not all(torch.equal(kept[k], last["model"][k]) for k in kept)  # the raw weights are not the bundle's
    # an interrupted run with a moving average resumes to the same bundle
    part = tmp_path / "part"

    with pytest.raises(KeyboardInterrupt):
        train(cfg, part, progress=_interrupt_in_epoch_2)
    resumed = _weights(train(cfg, part, resume=True))
    assert all(torch.equal(kept[k], resumed[k]) for k in kept)


def test_keep_last_bundles_the_end_of_the_schedule_and_still_reports_validation(tmp_path, scene):
    result = train(tiny_config(*scene, epochs=3, keep="last"), tmp_path / "run")
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    kept = _weights(result)
    assert all(torch.equal(kept[k], last["model"][k]) for k in kept)
    assert result.best_epoch == result.epochs_run == 3 and result.kept == "last"
    assert result.metrics["miou"] == result.history[-1]["val_miou"]  # the kept epoch's validation scores
    meta = read_bundle(result.bundle_path).contract.metadata
    assert meta["training"]["kept"] == "last" and meta["training"]["best_epoch"] == 3
    assert meta["validation"]["miou"] == result.history[-1]["val_miou"]


def test_keep_may_change_on_resume_and_an_unset_ema_keeps_older_runs_resumable(scene):
    from geoseg.learn.train import _config_hash

    base = config_from_dict(tiny_config(*scene))
    assert _config_hash(base) == _config_hash(config_from_dict(tiny_config(*scene, keep="best")))
    assert _config_hash(base) != _config_hash(config_from_dict(tiny_config(*scene, optimizer={"ema": 0.9})))
    # a run begun before keep and optimizer.ema existed: its checkpoint holds the hash of the config without them
    import hashlib

    d = base.model_dump(mode="json")
    for key in ("epochs", "passes", "max_seconds", "device", "threads", "plots", "tensorboard", "preview_chips",
                "early_stopping", "keep"):
        d.pop(key)
    d["data"].pop("workers")
    # and before the fine-tuning keys (issue 21): at their defaults they leave the hash as it was
    for section, keys in (("optimizer", ("ema", "encoder_lr_scale", "warmup")),
                          ("model", ("normalization", "pretrained_scale", "freeze_bn", "freeze_encoder_fraction")),
                          ("augment", ("rotate", "shift", "shear", "affine_p"))):
        for key in keys:
            d[section].pop(key)
    assert _config_hash(base) == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def test_a_set_too_small_to_spare_a_validation_block_trains_on_all_and_records_it(tmp_path, scene, caplog):
    cfg = tiny_config(*scene, epochs=2)
    del cfg["data"]["val_fraction"]  # the default 0.2 of 4 labelled blocks is less than one block
    with caplog.at_level("WARNING", logger="geoseg"):
        result = train(cfg, tmp_path / "run")
    assert "no validation split: 4 labelled block(s)" in caplog.text
    assert "no validation chip fits" not in caplog.text
    split = json.loads((tmp_path / "run" / "split" / "split.json").read_text())
    assert {b["split"] for b in split["scenes"][0]["blocks"]} == {"train"}
    recorded = load_config(tmp_path / "run" / "config.yaml")
    assert recorded.data.val_fraction == 0.0 and result.kept == "last"
    assert "val_miou" not in result.history[-1]
    # the recorded config resumes the run (same split, same config hash)
    again = train(tmp_path / "run" / "config.yaml", tmp_path / "run", resume=True)
    assert again.epochs_run == 2
    # with more blocks than 1 / val_fraction the default holds a share out as before
    cfg["data"]["split_block"] = 32
    result = train(cfg, tmp_path / "run16")
    assert load_config(tmp_path / "run16" / "config.yaml").data.val_fraction == 0.2
    assert "val_miou" in result.history[-1]
