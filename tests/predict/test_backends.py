"""Inference backends: each gives eager's classes on a small smp network, and each failure is one clear line."""

from __future__ import annotations

import sys

import pytest
import torch

from geoseg.errors import InputError, UnknownNameError
from geoseg.predict import backends
from geoseg.predict.backends import BACKENDS, MIN_AGREEMENT, agreement, prepare


def _net() -> torch.nn.Module:
    """A small U-Net with an auxiliary head, so that the network returns a (mask, label) tuple."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    net = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(32, 16, 8),
                   in_channels=3, classes=4, aux_params={"classes": 2})
    return net.eval().to(memory_format=torch.channels_last)


def _chips(n: int, side: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth random images (a coarse field upsampled, plus a little noise), normalised per band."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, side // 8, side // 8, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
    return x.contiguous(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return _net()


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_gives_eagers_classes(net, backend):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    forward = prepare(net, backend, torch.device("cpu"), _chips(2))
    # other chips than the example, and other batch sizes: a short last batch, a longer one
    for x in (_chips(2, seed=1), _chips(1, seed=2), _chips(3, seed=3)):
        with torch.inference_mode():
            want = net(x)[0]
        logits = forward(x)
        assert logits.shape == (x.shape[0], 4, 64, 64) and logits.dtype == torch.float32
        assert agreement(logits, want) >= MIN_AGREEMENT


def test_eager_is_the_default_and_needs_no_example(net):
    x = _chips(1)
    with torch.inference_mode():
        want = net(x)[0]
    torch.testing.assert_close(prepare(net)(x), want)


def test_eager_autocast_gives_float32_logits(net):
    logits = prepare(net, "eager", torch.device("cpu"), amp_dtype=torch.bfloat16)(_chips(1))
    assert logits.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_eager_runs_on_cuda(net):
    cuda = torch.device("cuda")
    gpu = _net().to(cuda)
    x = _chips(1)
    logits = prepare(gpu, "eager", cuda, amp_dtype=torch.float16)(x.to(cuda))
    with torch.inference_mode():
        want = net(x)[0]
    assert agreement(logits.cpu(), want) >= MIN_AGREEMENT


def test_an_unknown_backend_lists_the_valid_ones(net):
    with pytest.raises(UnknownNameError, match="eager"):
        prepare(net, "tensorrt", torch.device("cpu"), _chips(1))


def test_other_backends_need_the_cpu_and_an_example(net):
    other = next(b for b in BACKENDS if b != "eager")
    with pytest.raises(InputError, match="CPU only.*--backend eager"):
        prepare(net, other, torch.device("cuda"), _chips(1))
    with pytest.raises(InputError, match="example"):
        prepare(net, other, torch.device("cpu"), None)


@pytest.mark.skipif("onnxruntime" not in BACKENDS, reason="onnxruntime backend not shipped")
def test_onnxruntime_missing_names_the_package(net, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(InputError, match="pip install") as info:
        prepare(net, "onnxruntime", torch.device("cpu"), _chips(1))
    assert "\n" not in str(info.value)


@pytest.mark.skipif("onnxruntime" not in BACKENDS, reason="onnxruntime backend not shipped")
def test_onnxruntime_refuses_reduced_precision(net):
    pytest.importorskip("onnxruntime")
    with pytest.raises(InputError, match="float32 only"):
        prepare(net, "onnxruntime", torch.device("cpu"), _chips(1), torch.bfloat16)


class _Histogram(torch.nn.Module):
    """A network with an op that ONNX cannot express (``aten::histc``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.histc(x, bins=4).max()


def test_a_network_onnx_cannot_express_gives_one_line():
    pytest.importorskip("onnxruntime")
    with pytest.raises(InputError) as info:
        prepare(_Histogram(), "onnxruntime", torch.device("cpu"), _chips(1))
    msg = str(info.value)
    assert "\n" not in msg and "--backend onnxruntime" in msg and "--backend eager" in msg and "histc" in msg


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "eager"])
def test_any_conversion_failure_gives_one_line(net, backend, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("unsupported op: aten::frobnicate\nwith a long trace below")

    monkeypatch.setitem(backends._BUILDERS, backend, fail)
    with pytest.raises(InputError) as info:
        prepare(net, backend, torch.device("cpu"), _chips(1))
    msg = str(info.value)
    assert "\n" not in msg and f"--backend {backend}" in msg and "--backend eager" in msg
    assert "aten::frobnicate" in msg


def test_a_backend_that_disagrees_with_eager_is_refused(net, monkeypatch):
    other = next(b for b in BACKENDS if b != "eager")

    def wrong(net, device, example, amp_dtype):
        return lambda x: -backends._eager(net, device, example, amp_dtype)(x)

    monkeypatch.setitem(backends._BUILDERS, other, wrong)
    with pytest.raises(InputError, match=r"agrees with eager on only .*--backend eager"):
        prepare(net, other, torch.device("cpu"), _chips(1))


def test_predict_with_onnxruntime_matches_eager_and_is_recorded(tmp_path):
    pytest.importorskip("onnxruntime")
    import numpy as np
    import rasterio
    from click.testing import CliRunner

    from geoseg.cli import main
    from tests.conftest import make_bundle, write_raster

    model = make_bundle(tmp_path / "m", n_bands=3, chip=64, overlap=16, architecture="unet")
    rng = np.random.default_rng(0)
    scene = write_raster(tmp_path / "s.tif", rng.normal(size=(3, 150, 170)).astype(np.float32))
    maps = {}
    for backend in ("eager", "onnxruntime"):
        r = CliRunner().invoke(main, ["predict", str(scene), "-m", str(model), "-o", str(tmp_path / backend),
                                      "--device", "cpu", "--backend", backend, "--no-vector",
                                      "--precision", "fp32"])  # not bf16 autocast on CPUs with AMX
        assert r.exit_code == 0, r.output
        assert "(fp32, batch" in r.output
        with rasterio.open(tmp_path / backend / "s.classes.tif") as ds:
            maps[backend] = ds.read(1)
    assert (maps["eager"] == maps["onnxruntime"]).mean() >= 0.995
