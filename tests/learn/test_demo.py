import numpy as np
import pytest
import rasterio

from geoseg.errors import OutputExistsError
from geoseg.learn.demo import run_demo
from geoseg.learn.evaluate import evaluate
from geoseg.learn.synthetic import CLASSES, make_scene


def test_synthetic_scene_has_exact_labels_and_a_nodata_corner(tmp_path):
    s = make_scene(tmp_path / "i.tif", tmp_path / "l.tif", (300, 200), seed=3, strip=64)
    with rasterio.open(s.image) as img, rasterio.open(s.labels) as lab:
        assert (img.width, img.height, img.count, img.nodata) == (300, 200, 3, 0)
        assert img.crs == lab.crs and img.transform == lab.transform
        data, labels = img.read(), lab.read(1)
    assert labels[0, 0] == 0 and (data[:, 0, 0] == 0).all()  # the corner is nodata in both
    assert ((labels == 0) == (data == 0).all(axis=0)).all()
    assert set(np.unique(labels)) <= {0} | {c.id for c in CLASSES}


def test_demo_runs_end_to_end(tmp_path):
    res = run_demo(tmp_path / "demo", size=256, train_size=256, epochs=1, device="cpu")
    for p in (res.train_scene, res.train_labels, res.scene, res.truth, res.classes, res.polygons):
        assert p is not None and p.exists()
    assert (res.bundle / "model.json").exists()
    with rasterio.open(res.scene) as a, rasterio.open(res.classes) as b:
        assert (a.crs, a.transform, a.shape) == (b.crs, b.transform, b.shape)
    assert [c["name"] for c in res.scores["classes"]] == [c.name for c in CLASSES]
    assert 0 <= res.scores["accuracy"] <= 1 and "mean IoU" in res.summary()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_demo(tmp_path / "demo", size=256, train_size=256, epochs=1, device="cpu")
    # the trained model in bf16 (what --precision auto picks on an AMX CPU) against fp32, on its scene
    maps, mious = {}, {}
    for p in ("fp32", "bf16"):
        ev = evaluate(res.bundle, res.scene, res.truth, output_dir=tmp_path / p, precision=p, device="cpu",
                      keep_prediction=True)
        assert ev.prediction_path is not None
        with rasterio.open(ev.prediction_path) as ds:
            maps[p] = ds.read(1)
        mious[p] = ev.metrics["miou"]
    assert (maps["fp32"] == maps["bf16"]).mean() >= 0.995
    assert abs(mious["fp32"] - mious["bf16"]) <= 0.002
    # the same model exported to ONNX and TorchScript: a bundle each, the same map on the demo scene
    from geoseg.model.export import export

    pytest.importorskip("onnxruntime")
    for fmt in ("onnx", "torchscript"):
        folder = export(res.bundle, fmt, tmp_path / f"model-{fmt}").folder
        ev = evaluate(folder, res.scene, res.truth, output_dir=tmp_path / fmt, precision="fp32", device="cpu",
                      keep_prediction=True)
        with rasterio.open(ev.prediction_path) as ds:
            assert (ds.read(1) == maps["fp32"]).mean() >= 0.9999, fmt
        assert ev.metrics["miou"] == pytest.approx(mious["fp32"], abs=1e-3)
