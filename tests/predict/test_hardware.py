"""Device settings: the auto precision and batch size, made concrete once per job and recorded."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

import geoseg.predict.hardware as hw
from geoseg.cli import main
from geoseg.errors import InputError
from geoseg.predict.api import predict_scene
from geoseg.predict.inference import resolve_settings
from geoseg.predict.units import PredictOptions
from tests.conftest import make_bundle, write_raster


def test_cpu_batch_is_about_one_512_chip_of_pixels():
    assert [hw.cpu_batch_size(t) for t in (1024, 768, 512, 384, 256, 128, 64, 32)] == [1, 1, 1, 1, 4, 16, 32, 32]


def test_gpu_batch_fits_the_memory_share():
    gib = 1024**3
    # 60 % of 10 GiB = 6 GiB; 0.5 GiB fixed, 0.3 GiB per chip: 18 chips fit, the power of two below is 16
    assert hw.batch_for_memory(0.5 * gib, 0.3 * gib, 10 * gib) == 16
    assert hw.batch_for_memory(0.5 * gib, 0.01 * gib, 80 * gib) == hw.MAX_BATCH
    assert hw.batch_for_memory(2 * gib, 3 * gib, 4 * gib) == 1  # nothing fits: one chip, and an OOM names the fix


@pytest.mark.parametrize("amx, avx512_bf16, want", [(True, True, "bf16"), (False, True, "fp32"), (False, False, "fp32")])
def test_auto_precision_on_cpu_follows_the_detected_features(monkeypatch, amx, avx512_bf16, want):
    monkeypatch.setattr(hw, "cpu_features", lambda: hw.CpuFeatures("test cpu", 2, amx, avx512_bf16))
    assert hw.resolve_precision("auto", "cpu") == want
    assert hw.resolve_precision("fp32", "cpu") == "fp32" and hw.resolve_precision("bf16", "cpu") == "bf16"


def test_cpu_features_are_detected_not_guessed(monkeypatch):
    import torch

    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    f = hw.cpu_features()
    assert f.amx == torch.cpu._is_amx_tile_supported() and f.avx512_bf16 == torch.cpu._is_avx512_bf16_supported()
    assert f.cores >= 1 and f.name in f.describe()


@pytest.mark.parametrize("cap, amx, bf16", [("avx512_core_bf16", False, True), ("AVX512_CORE_VNNI", False, False),
                                            ("AVX2", False, False), ("AVX512_CORE_AMX", True, True),
                                            ("ALL", True, True)])
def test_an_instruction_set_capped_by_the_environment_caps_the_features(monkeypatch, cap, amx, bf16):
    """ONEDNN_MAX_CPU_ISA caps PyTorch's and OpenVINO's CPU kernels: an AMX machine capped at AVX512_CORE_BF16
    runs as one without AMX, so --precision auto must not pick bf16 there."""
    import torch

    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    f = hw.cpu_features()
    assert f.amx == (amx and torch.cpu._is_amx_tile_supported())
    assert f.avx512_bf16 == (bf16 and torch.cpu._is_avx512_bf16_supported())
    if not f.amx:
        assert hw.resolve_precision("auto", "cpu") == "fp32"


def test_bad_precision_and_batch_are_refused():
    with pytest.raises(InputError, match="fp16"):
        hw.resolve_precision("fp16", "cpu")
    with pytest.raises(InputError, match="unknown precision"):
        hw.resolve_precision("int8", "cpu")
    with pytest.raises(InputError, match="positive whole number or auto"):
        resolve_settings(PredictOptions(device="cpu", batch_size=0), 64, 3)


def test_a_job_records_its_resolved_settings_and_auto_equals_the_same_explicit_values(tmp_path, monkeypatch):
    monkeypatch.setattr(hw, "cpu_features", lambda: hw.CpuFeatures("test cpu", 2, False, False))
    model = make_bundle(tmp_path / "m", n_bands=3, chip=64, overlap=16, architecture="unet")
    scene = write_raster(tmp_path / "s.tif", np.random.default_rng(0).normal(size=(3, 150, 130)).astype(np.float32))
    auto = predict_scene(scene, model, tmp_path / "a", device="cpu", vector_format=None)
    explicit = predict_scene(scene, model, tmp_path / "b", device="cpu", vector_format=None, precision="fp32",
                             batch_size=32)  # what auto picks for 64 px chips on this CPU
    with rasterio.open(auto.classes_path) as a, rasterio.open(explicit.classes_path) as b:
        assert (a.read() == b.read()).all()
    from geoseg.predict.manifest import Manifest

    fp = [Manifest(str(tmp_path / d)).scenes["s"]["fingerprint"] for d in "ab"]
    assert fp[0] == fp[1]  # the same concrete settings: the same outputs, so one resumes the other


def test_cli_batch_size_takes_auto_or_a_number(tmp_path):
    model = make_bundle(tmp_path / "m", n_bands=3, chip=64, overlap=16)
    scene = write_raster(tmp_path / "s.tif", np.random.default_rng(0).normal(size=(3, 70, 90)).astype(np.float32))
    r = CliRunner().invoke(main, ["predict", str(scene), "-m", str(model), "-o", str(tmp_path / "o"),
                                  "--batch-size", "0", "--no-vector"])
    assert r.exit_code == 2 and "positive whole number of chips, or auto" in r.output
    r = CliRunner().invoke(main, ["predict", str(scene), "-m", str(model), "-o", str(tmp_path / "o"),
                                  "--batch-size", "auto", "--device", "cpu", "--no-vector"])
    assert r.exit_code == 0, r.output
    assert "(fp32, batch 32)" in r.output or "(bf16, batch 32)" in r.output


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device on this machine")
def test_gpu_batch_probe_measures_real_memory_and_the_batch_runs(tmp_path):
    """--batch-size auto on a real GPU: a power of two within MAX_BATCH, resolved once with bf16 (or fp16)
    where the device has it, and a batch of that size runs within the memory share it was sized for."""
    import torch

    from geoseg.model.bundle import load_model
    from geoseg.predict.inference import Predictor

    loaded = load_model(make_bundle(tmp_path / "m", n_bands=3, n_classes=4, chip=128, architecture="unet"))
    settings = hw.resolve_settings(PredictOptions(device="cuda"), 128, 3, load=lambda: loaded)
    assert settings.device.startswith("cuda") and "CUDA" in settings.machine
    assert settings.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    b = settings.batch_size
    assert 1 <= b <= hw.MAX_BATCH and b & (b - 1) == 0
    pred = Predictor(loaded, "cuda", settings.precision)
    free, _ = torch.cuda.mem_get_info()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    x = torch.randn(b, 3, 128, 128, device="cuda").contiguous(memory_format=torch.channels_last)
    probs = pred.forward(x)
    torch.cuda.synchronize()
    assert probs.shape == (b, 4, 128, 128) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(1), torch.ones(1, device="cuda"), atol=1e-5)
    assert torch.cuda.max_memory_allocated() - start <= hw.GPU_MEMORY_SHARE * free
