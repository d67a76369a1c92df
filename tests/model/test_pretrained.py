"""Pretrained weights files of each kind, read with their metadata; bands matched by name (tiny generated files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from geoseg.errors import ConfigError
from geoseg.model.contract import ArchSpec
from geoseg.model.networks import create_network
from geoseg.model.pretrained import band_key, first_conv_for_bands, read_encoder_file

SIX = ["blue", "green", "red", "nir", "swir16", "swir22"]
SMALL = {"encoder_depth": 3, "decoder_channels": [16, 8, 8]}


def _unet(encoder: str, bands: int, classes: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_network(ArchSpec(architecture="unet", encoder=encoder, params=SMALL), bands, classes)


def _small(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Without the stages a depth-3 resnet never calls (a small file; they stay at random and are dropped)."""
    return {k: v.contiguous() for k, v in state.items() if ".layer3." not in f".{k}" and ".layer4." not in f".{k}"}


def write_weights(folder: Path, kind: str, bands: list[str] | None = SIX, seed: int = 0, **meta: str) -> Path:
    """A tiny weights file of one of the kinds geoseg takes:

    - ``encoder``: an smp encoder's own keys (resnet18), metadata encoder/bands/pretrained_on;
    - ``timm``: the ``model.*`` keys of smp's ``tu-resnet10t`` encoder;
    - ``network``: a whole smp U-Net (``encoder.*``, ``decoder.*``, ``segmentation_head.*``), with architecture.
    """
    n = len(bands) if bands else 3
    encoder = {"encoder": "resnet18", "timm": "tu-resnet10t", "network": "resnet18"}[kind]
    net = _unet(encoder, n, 3, seed)
    state = _small(net.state_dict() if kind == "network" else net.encoder.state_dict())  # type: ignore[union-attr]
    metadata = {"encoder": encoder, "pretrained_on": f"test {kind}"}
    if kind == "network":
        metadata["architecture"] = "unet"
    if bands is not None:
        metadata["bands"] = json.dumps(bands)
    metadata.update(meta)
    path = folder / f"{kind}-{n}.safetensors"
    save_file(state, str(path), metadata={k: v for k, v in metadata.items() if v})
    return path


def _first(net: torch.nn.Module, key: str = "encoder.conv1.weight") -> torch.Tensor:
    return net.state_dict()[key]


@pytest.mark.parametrize("kind", ["encoder", "timm", "network"])
def test_each_kind_of_file_starts_the_encoder_from_its_weights(tmp_path, kind):
    path = write_weights(tmp_path, kind, bands=["red", "green", "blue"])
    said = read_encoder_file(str(path))
    assert said.encoder == ("tu-resnet10t" if kind == "timm" else "resnet18")
    assert said.bands == ["red", "green", "blue"] and said.pretrained_on == f"test {kind}"
    assert (said.architecture == "unet") == (kind == "network")
    assert said.state and not any(k.startswith(("encoder.", "decoder.", "segmentation_head.")) for k in said.state)
    assert len(said.sha256) == 64
    net = create_network(ArchSpec(architecture="unet", encoder=said.encoder, params=SMALL), 3, 2, str(path),
                         ["red", "green", "blue"])
    own = net.encoder.state_dict()  # type: ignore[union-attr]
    taken = [k for k in said.state if k in own]
    assert len(taken) == len(said.state)
    assert all(torch.equal(own[k], said.state[k]) for k in taken)
    src = net.geoseg_pretrained  # type: ignore[attr-defined]
    assert src.file == path.name and src.sha256 == said.sha256 and src.matched == ["red", "green", "blue"]


def test_a_four_or_five_band_scene_takes_the_six_band_filters_it_shares(tmp_path):
    path = write_weights(tmp_path, "network")
    w = read_encoder_file(str(path)).state["conv1.weight"]  # (64, 6, 7, 7)
    four = create_network(ArchSpec(encoder="resnet18", params=SMALL), 4, 2, str(path), ["Red", "green", "B02", "NIR"])
    assert torch.allclose(_first(four), w[:, [2, 1, 0, 3]] * 6 / 4)
    assert four.geoseg_pretrained.matched == ["red", "green", "blue", "nir"]  # type: ignore[attr-defined]
    # a band the file lacks: another band's filter, cycled, and all rescaled as smp does for extra bands
    five = create_network(ArchSpec(encoder="resnet18", params=SMALL), 5, 2, str(path),
                          ["red", "green", "blue", "nir08", "elevation"])
    assert torch.allclose(_first(five)[:, :4], w[:, [2, 1, 0, 3]] * 6 / 5)
    assert torch.allclose(_first(five)[:, 4], w[:, 4 % 6] * 6 / 5)
    assert five.geoseg_pretrained.matched == ["red", "green", "blue", "nir", None]  # type: ignore[attr-defined]
    # the file's own bands in another order: the filters as they are
    same = create_network(ArchSpec(encoder="resnet18", params=SMALL), 6, 2, str(path), SIX[::-1])
    assert torch.equal(_first(same), w[:, [5, 4, 3, 2, 1, 0]])


def test_rgb_from_rgb_unnamed_bands_and_no_shared_band(tmp_path, caplog):
    path = write_weights(tmp_path, "encoder", bands=["red", "green", "blue"])
    w = read_encoder_file(str(path)).state["conv1.weight"]
    bgr = create_network(ArchSpec(encoder="resnet18", params=SMALL), 3, 2, str(path), ["blue", "green", "red"])
    assert torch.equal(_first(bgr), w[:, [2, 1, 0]])
    with caplog.at_level("WARNING"):
        unnamed = create_network(ArchSpec(encoder="resnet18", params=SMALL), 3, 2, str(path), ["band1", "band2", "band3"])
    assert torch.equal(_first(unnamed), w) and "no names" in caplog.text
    pan = create_network(ArchSpec(encoder="resnet18", params=SMALL), 1, 2, str(path), ["pan"])
    assert torch.allclose(_first(pan), w.sum(dim=1, keepdim=True), atol=1e-6)  # smp's one-band rule
    with pytest.raises(ConfigError, match=r"model.encoder_weights .*encoder-3.safetensors.*bands \(red, green, blue\) "
                                          r"share none with the config's \(ndvi\)"):
        create_network(ArchSpec(encoder="resnet18", params=SMALL), 1, 2, str(path), ["ndvi"])
    with pytest.raises(ConfigError, match="share none"):  # unnamed bands of another count
        create_network(ArchSpec(encoder="resnet18", params=SMALL), 4, 2, str(path), ["band1", "band2", "band3", "band4"])


def test_a_plain_state_dict_without_metadata_keeps_working(tmp_path):
    net = _unet("resnet18", 3)
    path = tmp_path / "plain.pth"
    torch.save(_small(net.encoder.state_dict()), path)  # type: ignore[union-attr]
    said = read_encoder_file(str(path))
    assert said.encoder is None and said.bands is None
    four = create_network(ArchSpec(encoder="resnet18", params=SMALL), 4, 2, str(path), ["a", "b", "c", "d"])
    w = said.state["conv1.weight"]
    assert torch.allclose(_first(four), w[:, [0, 1, 2, 0]] * 3 / 4)  # smp's cycling, by count
    with pytest.raises(ConfigError, match="does not fit encoder"):
        create_network(ArchSpec(encoder="mobilenet_v2", params=SMALL), 3, 2, str(path))


def test_band_names_and_the_first_convolution_rule():
    assert [band_key(b) for b in ["B04", "Red", "NIR08", "swir1", "B12", "gray"]] == \
        ["red", "red", "nir", "swir16", "swir22", "pan"]
    w = torch.arange(2 * 3 * 1 * 1, dtype=torch.float32).reshape(2, 3, 1, 1)
    assert torch.equal(first_conv_for_bands(w, [[2], [0], [1]]), w[:, [2, 0, 1]])
    assert torch.allclose(first_conv_for_bands(w, [[0], []]), w[:, [0, 1]] * 3 / 2)


def test_normalisation_the_weights_expect(tmp_path):
    from geoseg.model.pretrained import pretrained_normalization

    path = write_weights(tmp_path, "encoder", bands=["red", "green", "blue"], pretrained_on="ImageNet (test)")
    said = read_encoder_file(str(path), tensors=False)
    assert said.mean == pytest.approx([0.485, 0.456, 0.406]) and said.sha256 == ""
    mean, std, changed = pretrained_normalization(said, ["blue", "nir"], [1.0, 2.0], [3.0, 4.0], 255)
    assert mean == pytest.approx([0.406 * 255, 2.0]) and std == pytest.approx([0.225 * 255, 4.0]) and changed == ["blue"]
    side = write_weights(tmp_path, "network", bands=["blue", "green"])
    side.with_suffix(".json").write_text(json.dumps({"mean": [0.1, 0.2], "std": [0.3, 0.4]}))
    assert read_encoder_file(str(side), tensors=False).std == [0.3, 0.4]


def test_imagenet_is_still_smps_download_and_is_recorded(monkeypatch):
    import segmentation_models_pytorch as smp

    asked: list[str | None] = []
    real = smp.create_model

    def offline(*args, encoder_weights=None, **kwargs):  # no network here: record what smp would download
        asked.append(encoder_weights)
        return real(*args, encoder_weights=None, **kwargs)

    monkeypatch.setattr(smp, "create_model", offline)
    net = create_network(ArchSpec(encoder="resnet18", params=SMALL), 3, 2, "imagenet", ["red", "green", "blue"])
    assert asked == ["imagenet"]
    src = net.geoseg_pretrained  # type: ignore[attr-defined]
    assert src.file == "imagenet" and src.encoder == "resnet18" and "smp download" in (src.pretrained_on or "")
