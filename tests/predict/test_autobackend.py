"""``--backend auto``: the fastest backend by a short probe, chosen once per job, recorded, and kept on resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from geoseg.cli import main
from geoseg.errors import InputError
from geoseg.predict.probe import ProbeResult, time_backends
from geoseg.predict.units import PredictOptions
from tests.conftest import make_bundle, write_raster

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def unet(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "unet", n_bands=3, n_classes=3, chip=64, overlap=16,
                       architecture="unet", seed=5)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("s")
    rng = np.random.default_rng(24)
    return [write_raster(d / f"s{i}.tif", rng.normal(size=(3, 1100, 300)).astype(np.float32)) for i in range(2)]


def _fixed(winner: str, other: str):
    """A stand-in for the probe that measures nothing and makes ``winner`` the fastest."""
    calls: list[list[str]] = []

    def fake(builders, batch, *args, **kwargs):
        calls.append(list(builders))
        assert batch.dtype == np.float32 and batch.ndim == 4
        return ProbeResult({winner: 0.1, other: 0.2}, wall=0.0)

    return fake, calls


def test_the_probe_times_each_candidate_and_drops_one_that_refuses():
    def refuses():
        raise InputError("--backend b cannot run this network; use --backend eager")

    runs: dict[str, int] = {"a": 0, "c": 0}

    def counting(name):
        def build():
            def forward(batch):
                runs[name] += 1
                return batch
            return forward
        return build

    got = time_backends({"a": counting("a"), "b": refuses, "c": counting("c")}, np.zeros(1), runs=3, budget=60)
    assert set(got.seconds) == {"a", "c"} and got.winner in ("a", "c")
    assert runs == {"a": 4, "c": 4}  # a warm-up and three timed forwards each
    assert got.dropped == {"b": "--backend b cannot run this network; use --backend eager"}
    assert "b dropped (" in got.describe() and "\n" not in got.describe()
    assert time_backends({"b": refuses}, np.zeros(1)).winner is None


def test_auto_resolves_to_a_measured_candidate_and_records_it(unet):
    from geoseg.model.bundle import read_bundle
    from geoseg.predict.runtime import backend_candidates, load_for_predict, resolve_settings

    bundle = read_bundle(unet)
    model = load_for_predict(bundle)
    assert backend_candidates("safetensors", "cpu", "auto") == ["eager", "onnxruntime"]
    assert backend_candidates("safetensors", "cpu", "bf16") == ["eager"]  # ONNX Runtime runs float32 only
    assert backend_candidates("safetensors", "cuda", "auto") == ["eager"]
    assert backend_candidates("onnx", "cuda", "auto") == ["onnxruntime"]
    s = resolve_settings(PredictOptions(backend="auto", device="cpu", precision="fp32"), 64, 3, bundle=bundle,
                         load=lambda: model)
    assert s.backend in ("eager", "onnxruntime") and s.precision == "fp32" and s.batch_size == 32
    assert [b for b, _, _ in s.probe][0] == s.backend and {b for b, _, _ in s.probe} == {"eager", "onnxruntime"}
    assert all(sec > 0 for _, _, sec in s.probe)
    one = resolve_settings(PredictOptions(backend="auto", device="cpu", precision="bf16"), 64, 3, bundle=bundle,
                           load=lambda: model)
    assert (one.backend, one.probe) == ("eager", ())  # one candidate: nothing timed


def test_auto_is_chosen_once_per_job_and_every_unit_runs_it(unet, scenes, tmp_path, monkeypatch, caplog):
    import geoseg.predict.probe as probe
    import geoseg.predict.runtime as runtime
    import geoseg.predict.schedule as schedule
    from geoseg.predict.api import predict_scenes

    fake, calls = _fixed("onnxruntime", "eager")
    monkeypatch.setattr(probe, "time_backends", fake)
    units: list[str] = []
    real_unit = schedule.run_unit
    monkeypatch.setattr(schedule, "run_unit", lambda unit, *a: units.append(unit.options.backend) or
                        real_unit(unit, *a))
    made: list[str] = []
    real_make = runtime.make_predictor
    monkeypatch.setattr(runtime, "make_predictor", lambda model, *a: made.append(a[-1]) or real_make(model, *a))
    with caplog.at_level("INFO"):
        run = predict_scenes(scenes, unet, tmp_path / "out", device="cpu", backend="auto", unit_rows=512,
                             vector_format=None, quicklook=False)
    assert len(calls) == 1 and calls[0] == ["eager", "onnxruntime"]  # one probe for the whole job
    assert len(units) == 6 and set(units) == {"onnxruntime"}  # 2 scenes x 3 row bands
    assert made == ["onnxruntime"]  # the job's one predictor (the fake probe built none)
    assert run.options.backend == "onnxruntime" and run.options.precision == "fp32"
    assert "model settings: onnxruntime (auto: onnxruntime 0.100 s, eager 0.200 s per batch), fp32" in caplog.text


def test_a_resumed_auto_job_keeps_the_backend_it_began_with(unet, scenes, tmp_path, monkeypatch, caplog):
    import geoseg.predict.probe as probe
    from geoseg.predict.api import predict_scenes

    out = tmp_path / "out"
    first = predict_scenes(scenes, unet, out, device="cpu", precision="fp32", backend="eager", vector_format=None,
                           quicklook=False)
    assert [s.status for s in first.scenes] == ["done", "done"]
    fake, calls = _fixed("onnxruntime", "eager")  # this time the probe prefers another backend
    monkeypatch.setattr(probe, "time_backends", fake)
    with caplog.at_level("INFO"):
        again = predict_scenes(scenes, unet, out, device="cpu", precision="fp32", backend="auto",
                               vector_format=None, quicklook=False)
    assert calls and [s.status for s in again.scenes] == ["skipped", "skipped"]
    assert again.options.backend == "eager"
    assert "resuming with eager (fp32), the choice of the run that began this job" in caplog.text


def test_auto_in_the_job_file_and_the_cli_report(unet, scenes, tmp_path):
    from geoseg.predict.jobfile import JobOptions

    assert JobOptions(backend="auto").backend == "auto"
    report = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["-q", "predict", str(scenes[0]), "-m", str(unet), "-o", str(tmp_path / "o"),
                                    "--backend", "auto", "--precision", "fp32", "--no-vector", "--report",
                                    str(report)])
    assert res.exit_code == 0, res.output
    assert json.loads(report.read_text())["settings"]["backend"] in ("eager", "onnxruntime")


def test_an_unknown_backend_is_one_line_listing_the_valid_ones(unet, scenes, tmp_path):
    from geoseg.model.export import export
    from geoseg.predict.api import predict_scenes

    onnx_dir = export(unet, "onnx", tmp_path / "m-onnx").folder
    for model in (unet, onnx_dir):  # an ONNX bundle no longer takes any name for onnxruntime
        with pytest.raises(InputError) as info:
            predict_scenes([scenes[0]], model, tmp_path / "x", backend="fastest", vector_format=None)
        msg = str(info.value)
        assert msg == "--backend fastest: valid values are eager, onnxruntime, openvino, auto"
    res = CliRunner().invoke(main, ["predict", str(scenes[0]), "-m", str(unet), "--backend", "fastest"])
    assert res.exit_code != 0 and "'fastest' is not one of 'eager', 'onnxruntime', 'openvino', 'auto'" in res.output
