"""An ONNX bundle predicts without torch: from preflight to polygons, numpy and ONNX Runtime only; and in int8,
quantised here or at export, checked against fp32 on the first batch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import rasterio

from geoseg.errors import InputError
from tests.conftest import make_bundle, write_raster

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

HEAVY = ("torch", "segmentation_models_pytorch", "timm", "torchvision")


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory):
    from geoseg.model.export import export

    d = tmp_path_factory.mktemp("onnx")
    bundle = make_bundle(d / "m", n_bands=3, n_classes=3, chip=64, overlap=16, architecture="unet", seed=3)
    onnx_dir = export(bundle, "onnx", d / "m-onnx").folder
    rng = np.random.default_rng(0)
    scene = write_raster(d / "scene.tif", rng.normal(size=(3, 200, 170)).astype(np.float32))
    return bundle, onnx_dir, scene


def _run_cli(args: list[str]) -> dict:
    """``geoseg ARGS`` in a fresh interpreter; the modules it imported, and its exit code."""
    code = textwrap.dedent(f"""
        import json, sys
        from geoseg.cli import main
        try:
            main({args!r}, standalone_mode=False)
            rc = 0
        except SystemExit as exc:
            rc = exc.code or 0
        print("MODULES=" + json.dumps({{"rc": rc, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    line = next(x for x in out.stdout.splitlines() if x.startswith("MODULES="))
    return json.loads(line[len("MODULES="):])


def test_an_onnx_bundle_predicts_to_polygons_without_importing_torch(onnx_bundle, tmp_path):
    _, onnx_dir, scene = onnx_bundle
    got = _run_cli(["--quiet", "predict", str(scene), "--model", str(onnx_dir), "--output-dir", str(tmp_path),
                    "--report", str(tmp_path / "report.json")])
    assert got == {"rc": 0, "heavy": []}
    assert (tmp_path / "scene.classes.tif").is_file() and (tmp_path / "scene.gpkg").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "done" and "torch" not in report["versions"]


def test_backend_auto_probes_an_onnx_bundle_without_importing_torch(onnx_bundle, tmp_path):
    _, onnx_dir, scene = onnx_bundle
    got = _run_cli(["--quiet", "predict", str(scene), "--model", str(onnx_dir), "--output-dir", str(tmp_path),
                    "--backend", "auto", "--no-vector", "--report", str(tmp_path / "report.json")])
    assert got == {"rc": 0, "heavy": []}
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["settings"]["backend"] in ("onnxruntime", "openvino")


def test_the_torch_free_path_gives_the_class_map_of_the_torch_wrapped_onnx_path(onnx_bundle, tmp_path):
    from geoseg.model.weights import load_model
    from geoseg.predict.api import predict_scenes

    bundle, onnx_dir, scene = onnx_bundle
    maps = {}
    for name, model in (("free", onnx_dir), ("wrapped", load_model(onnx_dir)), ("torch", bundle)):
        run = predict_scenes([scene], model, tmp_path / name, device="cpu", precision="fp32", vector_format=None)
        with rasterio.open(run.scenes[0].classes_path) as ds:
            maps[name] = ds.read(1)
    assert len(np.unique(maps["torch"])) > 1
    assert np.array_equal(maps["free"], maps["wrapped"])
    assert (maps["free"] == maps["torch"]).mean() >= 0.9999


def test_int8_is_checked_against_fp32_and_says_where_it_calibrated(onnx_bundle, tmp_path, caplog):
    from geoseg.predict.api import predict_scenes

    _, onnx_dir, scene = onnx_bundle
    with caplog.at_level("INFO"):
        try:
            run = predict_scenes([scene], onnx_dir, tmp_path / "int8", device="cpu", precision="int8",
                                 vector_format=None, batch_size=4)
        except InputError as exc:  # refused: the reason is one line naming fp32
            assert "int8 agrees with fp32 on only" in str(exc) and "\n" not in str(exc)
            return
    assert run.options.precision == "int8" and run.scenes[0].status == "done"
    text = caplog.text
    assert re.search(r"calibrates on the job's first \d+ chip\(s\)", text) and "arg max agreement with fp32" in text


def test_precisions_an_onnx_bundle_refuses(onnx_bundle, tmp_path):
    from geoseg.predict.api import predict_scenes

    bundle, onnx_dir, scene = onnx_bundle
    for precision in ("bf16", "fp16"):
        with pytest.raises(InputError, match="float32 or int8"):
            predict_scenes([scene], onnx_dir, tmp_path / precision, device="cpu", precision=precision,
                           vector_format=None)
    with pytest.raises(InputError, match="int8 runs an ONNX model"):
        predict_scenes([scene], bundle, tmp_path / "torch-int8", device="cpu", precision="int8", vector_format=None)


def test_export_int8_keeps_the_contract_the_deepness_keys_and_its_fp32_network(onnx_bundle, tmp_path):
    import onnx

    from geoseg.errors import BundleError
    from geoseg.model.bundle import read_bundle
    from geoseg.model.export import export
    from geoseg.model.quantize import FP32_FILE, int8_step, is_int8_bundle
    from geoseg.predict.api import predict_scenes

    bundle, _, scene = onnx_bundle
    with pytest.raises(BundleError, match="--calibration SCENE"):  # the test bundle carries no training chips
        export(bundle, "onnx", tmp_path / "none", int8=True)
    folder = export(bundle, "onnx", tmp_path / "m-int8", int8=True, calibration=scene).folder
    b = read_bundle(folder)
    assert is_int8_bundle(b) and b.contract.classes == read_bundle(bundle).contract.classes
    assert (folder / FP32_FILE).is_file()
    graph = onnx.load(str(folder / "model.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in graph.graph.node)
    props = {p.key for p in graph.metadata_props}
    assert {"geoseg_contract", "model_type", "class_names", "tile_size"} <= props
    export_meta = b.contract.metadata["export"]
    assert export_meta["precision"] == "int8" and 0 <= export_meta["int8"]["agreement"] <= 1
    assert export_meta["int8"]["float32"] in ("stem", "decoder")
    assert export_meta["int8"]["calibration_method"] in ("minmax", "percentile")
    from geoseg.model.quantize import int8_backends

    by_backend = export_meta["int8"]["agreement_by_backend"]  # checked in every CPU runtime installed here
    assert set(by_backend) == set(int8_backends()) and export_meta["int8"]["agreement"] == min(by_backend.values())
    assert int8_step(b) == (export_meta["int8"]["float32"], export_meta["int8"]["calibration_method"])
    try:
        run = predict_scenes([scene], folder, tmp_path / "out", device="cpu", vector_format=None)
    except InputError as exc:  # a random network may fall below the bar; the refusal is one line
        assert "int8 agrees with fp32 on only" in str(exc)
    else:
        assert run.options.precision == "int8"  # auto: the bundle's own precision


def test_calibration_chips_survive_their_uint8_storage(tmp_path):
    from geoseg.model.quantize import read_calibration, write_calibration

    chips = np.random.default_rng(1).normal(size=(5, 3, 32, 32)).astype(np.float32)
    back = read_calibration(write_calibration(tmp_path / "calibration.npz", chips))
    step = (chips.max(axis=(0, 2, 3)) - chips.min(axis=(0, 2, 3))) / 255
    assert back.shape == chips.shape and (np.abs(back - chips) <= step[None, :, None, None] / 2 + 1e-6).all()


def test_openvino_runs_an_onnx_bundle_to_the_same_classes_without_torch(onnx_bundle, tmp_path):
    pytest.importorskip("openvino")
    _, onnx_dir, scene = onnx_bundle
    got = _run_cli(["--quiet", "predict", str(scene), "--model", str(onnx_dir), "--output-dir", str(tmp_path / "ov"),
                    "--backend", "openvino", "--no-vector"])
    assert got == {"rc": 0, "heavy": []}
    from geoseg.predict.api import predict_scenes

    run = predict_scenes([scene], onnx_dir, tmp_path / "ort", device="cpu", vector_format=None)
    with rasterio.open(run.scenes[0].classes_path) as a, rasterio.open(tmp_path / "ov" / "scene.classes.tif") as b:
        assert (a.read(1) == b.read(1)).mean() >= 0.9999


def test_openvino_compiles_for_the_batch_shape_pads_a_short_batch_and_recompiles_for_another(onnx_bundle):
    """OpenVINO's fixed-shape kernels are faster than its dynamic ones: the network is compiled for the shape
    of the batches it runs; a job's shorter last batch is padded to it (the same probabilities as run alone),
    a batch of another chip size compiles it again."""
    pytest.importorskip("openvino")
    from geoseg.model.onnxrt import OnnxSession, OpenVinoSession

    _, onnx_dir, _ = onnx_bundle
    ov, ort = OpenVinoSession(onnx_dir / "model.onnx"), OnnxSession(onnx_dir / "model.onnx")
    x = np.random.default_rng(2).normal(size=(3, 3, 64, 64)).astype(np.float32)
    full = ov.run(x)
    assert ov._shape == (3, 3, 64, 64) and full.shape == (3, 3, 64, 64)
    request = ov.session()
    short = ov.run(x[:1])  # padded to 3 chips, not recompiled
    assert ov.session() is request and short.shape == (1, 3, 64, 64)
    assert np.allclose(short, full[:1], atol=1e-5) and np.allclose(full, ort.run(x), atol=1e-4)
    other = ov.run(x[:2, :, :32, :32])  # another chip size: compiled again
    assert ov._shape == (2, 3, 32, 32) and ov.session() is not request
    assert np.allclose(other, ort.run(x[:2, :, :32, :32]), atol=1e-4)


def test_openvino_frees_the_loaders_onnx_runtime_session(onnx_bundle):
    """The loader checks the graph in ONNX Runtime; with --backend openvino that session would hold a second
    copy of the network for the whole job."""
    from geoseg.model.onnxrt import load_onnx_model
    from geoseg.predict.onnx_predictor import OnnxPredictor

    _, onnx_dir, _ = onnx_bundle
    loaded = load_onnx_model(onnx_dir)
    assert loaded.module.loaded
    OnnxPredictor(loaded, device="cpu", backend="openvino")
    assert not loaded.module.loaded
    loaded = load_onnx_model(onnx_dir)
    pred = OnnxPredictor(loaded, device="cpu", backend="onnxruntime")
    assert loaded.module.loaded and pred.session is loaded.module  # ONNX Runtime runs the loader's session


def test_the_session_holds_one_run_of_activations_and_the_job_frees_it_before_finishing(onnx_bundle, tmp_path,
                                                                                      monkeypatch):
    """No memory pattern (it doubles the activation arena), and the network's memory goes once the chips are
    done: the finishing step (COGs, quicklook, polygons) runs without it. The model works again afterwards."""
    import geoseg.predict.schedule as schedule
    from geoseg.model.onnxrt import load_onnx_model
    from geoseg.predict.api import predict_scenes

    _, onnx_dir, scene = onnx_bundle
    loaded = load_onnx_model(onnx_dir)
    assert loaded.module.session().get_session_options().enable_mem_pattern is False
    seen = []
    finish = schedule.finish_scene

    def spy(*args, **kwargs):
        seen.append(loaded.module.loaded)
        return finish(*args, **kwargs)

    monkeypatch.setattr(schedule, "finish_scene", spy)
    maps = []
    for name in ("first", "again"):
        run = predict_scenes([scene], loaded, tmp_path / name, device="cpu", vector_format=None, quicklook=False)
        assert run.scenes[0].status == "done"
        with rasterio.open(run.scenes[0].classes_path) as ds:
            maps.append(ds.read(1))
    assert seen == [False, False]
    assert np.array_equal(maps[0], maps[1])


def _small_network(tmp_path):
    """A float32 ONNX network shaped like an exported U-Net: a stem, a depthwise and a pointwise convolution
    (the encoder), then one convolution named as smp's decoder."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w_stem", (8, 3, 3, 3)), ("w_dw", (8, 1, 3, 3)), ("w_pw", (8, 8, 1, 1)),
                                 ("w_dec", (4, 8, 3, 3)))]
    dec = "/net/decoder/blocks.0/conv1/Conv"
    nodes = [helper.make_node("Conv", ["image", "w_stem"], ["a"], name="stem", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"], name="relu"),
             helper.make_node("Conv", ["b", "w_dw"], ["c"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c", "w_pw"], ["d"], name="pointwise"),
             helper.make_node("Conv", ["d", "w_dec"], ["e"], name=dec, pads=[1, 1, 1, 1]),
             helper.make_node("Softmax", ["e"], ["probabilities"], name="softmax", axis=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 16, 16])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 4, 16, 16])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = tmp_path / "net.onnx"
    onnx.save(model, str(src))
    return onnx, model, src, dec, rng.standard_normal((8, 3, 16, 16)).astype(np.float32)


def _weights_quantized(onnx, path):
    q = onnx.load(str(path))
    dequantized = {n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name: any(i in dequantized for i in n.input[1:2]) for n in q.graph.node if n.op_type == "Conv"}


def test_int8_keeps_the_stem_and_the_depthwise_convolutions_in_float32(tmp_path):
    from geoseg.model.quantize import float_convolutions, quantize_onnx

    onnx, model, src, dec, chips = _small_network(tmp_path)
    assert float_convolutions(model) == ["stem", "depthwise"]
    assert float_convolutions(model, "decoder") == ["stem", "depthwise", dec]
    with pytest.raises(ValueError, match="unknown float level"):
        float_convolutions(model, "everything")

    quantize_onnx(src, tmp_path / "int8.onnx", chips)
    assert _weights_quantized(onnx, tmp_path / "int8.onnx") == {"stem": False, "depthwise": False, "pointwise": True,
                                                                dec: True}
    quantize_onnx(src, tmp_path / "int8-decoder.onnx", chips, level="decoder")
    assert _weights_quantized(onnx, tmp_path / "int8-decoder.onnx") == {"stem": False, "depthwise": False,
                                                                        "pointwise": True, dec: False}


def test_quantize_agreeing_keeps_more_in_float32_only_when_the_finer_level_disagrees(tmp_path):
    from geoseg.model.quantize import INT8_STEPS, quantize_agreeing

    onnx, _, src, dec, chips = _small_network(tmp_path)
    step, agree, each = quantize_agreeing(src, tmp_path / "easy.onnx", chips, chips, target=0.0)
    assert step == ("stem", "minmax") and 0 < agree <= 1 and each == {"onnxruntime": agree}
    assert _weights_quantized(onnx, tmp_path / "easy.onnx")[dec] is True
    step, agree, _ = quantize_agreeing(src, tmp_path / "hard.onnx", chips, chips, target=1.01)  # never reached
    assert step == INT8_STEPS[-1] == ("decoder", "percentile") and 0 < agree <= 1
    assert _weights_quantized(onnx, tmp_path / "hard.onnx")[dec] is False


def test_the_export_step_must_agree_in_every_runtime_installed(tmp_path, monkeypatch):
    """OpenVINO runs the same QDQ file with its own int8 kernels: a step that agrees in ONNX Runtime but not in
    OpenVINO is not the export's (predict would quantise again at every OpenVINO run)."""
    import geoseg.model.quantize as q

    onnx, _, src, dec, chips = _small_network(tmp_path)
    real = q._outputs
    seen: list[str] = []

    def outputs(path, check, backend="onnxruntime"):
        seen.append(backend)
        out = real(path, check)
        if backend == "openvino" and path.name == "int8.onnx" and _weights_quantized(onnx, path)[dec]:
            out = out[:, ::-1].copy()  # this runtime's int8 flips every pixel while the decoder is int8
        return out

    monkeypatch.setattr(q, "_outputs", outputs)
    step, agree, each = q.quantize_agreeing(src, tmp_path / "int8.onnx", chips, chips, target=0.9,
                                            backends=("onnxruntime", "openvino"))
    assert step == ("decoder", "minmax") and set(each) == {"onnxruntime", "openvino"} and agree == min(each.values())
    assert {"onnxruntime", "openvino"} <= set(seen)
    assert q.int8_backends()[0] == "onnxruntime"


def _activation_ranges(onnx, path):
    """Each quantised activation's (min, max) as its QuantizeLinear's uint8 scale and zero point give it."""
    from onnx import numpy_helper

    q = onnx.load(str(path))
    consts = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    out = {}
    for n in q.graph.node:
        if n.op_type == "QuantizeLinear" and n.input[0] not in consts:
            scale, zero = float(consts[n.input[1]]), int(consts[n.input[2]])
            out[n.input[0]] = (-zero * scale, (255 - zero) * scale)
    return out


def test_min_max_ranges_take_every_chip_and_percentile_ranges_are_no_wider(tmp_path, capsys):
    from geoseg.model.quantize import quantize_onnx

    onnx, _, src, _, chips = _small_network(tmp_path)
    calm = _activation_ranges(onnx, quantize_onnx(src, tmp_path / "calm.onnx", np.concatenate([chips] * 16)))
    for i in (0, 5, 127):  # an outlier pixel in one of 128 chips, first, within or after the calibrator's slices
        spiky = np.concatenate([chips] * 16)
        spiky[i, :, 3, 3] = 1000.0
        minmax = _activation_ranges(onnx, quantize_onnx(src, tmp_path / f"minmax{i}.onnx", spiky))
        assert minmax["c"][1] > 10 * calm["c"][1], i  # every chip sets the ranges, wherever it comes
        pct = _activation_ranges(onnx, quantize_onnx(src, tmp_path / f"pct{i}.onnx", spiky, calibration="percentile"))
        assert pct.keys() == minmax.keys() == {"c", "d", "e"}
        for name, (lo, hi) in pct.items():  # never wider than what occurred (a range symmetric about 0, clipped)
            assert hi - lo <= 1.01 * (minmax[name][1] - minmax[name][0]), (i, name)
        assert any(hi - lo < 0.95 * (minmax[n][1] - minmax[n][0]) for n, (lo, hi) in pct.items()), i
    assert capsys.readouterr().out == ""  # the percentile calibrator's prints stay off stdout
    with pytest.raises(ValueError, match="unknown calibration"):
        quantize_onnx(src, tmp_path / "x.onnx", chips, calibration="entropy")


def test_int8_below_the_bar_is_quantised_again_at_each_step_then_refused(onnx_bundle, tmp_path, monkeypatch, caplog):
    import geoseg.predict.onnx_predictor as op
    from geoseg.predict.api import predict_scenes

    _, onnx_dir, scene = onnx_bundle
    steps: list[tuple[str, str]] = []
    real = op.OnnxPredictor._quantize

    def spy(self, first, step):
        steps.append(step)
        return real(self, first, step)

    monkeypatch.setattr(op.OnnxPredictor, "_quantize", spy)
    # the first step falls short of the bar and the second clears it
    answers = iter([0.9, 1.0])
    monkeypatch.setattr(op, "class_agreement", lambda got, ref: next(answers))
    with caplog.at_level("INFO"):
        run = predict_scenes([scene], onnx_dir, tmp_path / "ladder", device="cpu", precision="int8",
                             vector_format=None, batch_size=4)
    assert run.scenes[0].status == "done" and steps == [("stem", "minmax"), ("decoder", "minmax")]
    assert "quantising again (float32 kept: decoder)" in caplog.text

    steps.clear()
    # no step clears it; the message gives the best of them. One chip a batch: the batches queued behind the
    # first get its refusal, not another round of quantising
    answers = iter([0.9, 0.95, 0.93])
    monkeypatch.setattr(op, "class_agreement", lambda got, ref: next(answers))
    with pytest.raises(InputError, match=r"int8 agrees with fp32 on only 95\.00 % .*best of 3 quantisation\(s\), "
                                         r"float32 kept: decoder;"):
        predict_scenes([scene], onnx_dir, tmp_path / "refused", device="cpu", precision="int8",
                       vector_format=None, batch_size=1)
    assert steps == [("stem", "minmax"), ("decoder", "minmax"), ("decoder", "percentile")]
    assert not list((tmp_path / "refused").glob("*.tif"))


def test_int8_is_checked_on_the_same_chips_of_the_scene_in_every_run(onnx_bundle, tmp_path, monkeypatch, caplog):
    """One chip is too few pixels to judge int8 by, the first chips share the scene's first rows, and which chip
    reaches the model first depends on the reader threads: the check runs on CHECK_CHIPS chips of the scene, its
    first and others spread over it, once per process, the same ones in every run."""
    import geoseg.predict.onnx_predictor as op
    from geoseg.predict.api import predict_scenes

    _, onnx_dir, scene = onnx_bundle
    checked: list[np.ndarray] = []
    real_agree = op.class_agreement

    def agree(got, ref):
        checked.append(ref)
        assert 0 <= real_agree(got, ref) <= 1
        return 1.0  # this tiny random network's verdict is not the point here

    monkeypatch.setattr(op, "class_agreement", agree)
    with caplog.at_level("INFO"):
        for k in range(2):
            run = predict_scenes([scene], onnx_dir, tmp_path / f"run{k}", device="cpu", precision="int8",
                                 vector_format=None, batch_size=1)
            assert run.scenes[0].status == "done"
    assert len(checked) >= 2 and all(len(r) == op.CHECK_CHIPS for r in checked)
    assert np.array_equal(checked[0], checked[-1])  # the same chips, the same fp32 classes
    assert f"{op.CHECK_CHIPS} chips of the scene (its first and others spread over it)" in caplog.text


def test_an_int8_network_quantised_at_predict_time_is_reused_by_the_next_run(onnx_bundle, tmp_path, monkeypatch,
                                                                              caplog):
    import shutil
    import tempfile

    import geoseg.predict.onnx_predictor as op
    from geoseg.model.quantize import CALIBRATION_FILE, write_calibration
    from geoseg.predict.api import predict_scenes

    _, src, scene = onnx_bundle
    onnx_dir = shutil.copytree(src, tmp_path / "m-onnx")  # a float32 bundle that carries calibration chips
    write_calibration(onnx_dir / CALIBRATION_FILE, np.random.default_rng(5).normal(size=(4, 3, 64, 64)))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # this test's own cache
    (tmp_path / "tmp").mkdir()
    calls: list[str] = []
    real = op.quantize_onnx

    def spy(src, dst, chips, **kw):
        calls.append(str(dst))
        return real(src, dst, chips, **kw)

    monkeypatch.setattr(op, "quantize_onnx", spy)
    monkeypatch.setattr(op, "class_agreement", lambda got, ref: 1.0)  # passes at the first step: one network
    first = predict_scenes([scene], onnx_dir, tmp_path / "a", device="cpu", precision="int8", vector_format=None)
    assert len(calls) >= 1 and list((tmp_path / "tmp" / "geoseg-int8").glob("*.onnx"))
    calls.clear()
    with caplog.at_level("INFO"):
        again = predict_scenes([scene], onnx_dir, tmp_path / "b", device="cpu", precision="int8", vector_format=None)
    assert calls == [] and "quantised by an earlier run" in caplog.text
    a, b = (rasterio.open(r.scenes[0].classes_path).read() for r in (first, again))
    assert (a == b).all()
