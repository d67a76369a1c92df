import json

import numpy as np
import pytest
from click.testing import CliRunner

from geoseg.errors import InputError, OutputExistsError
from geoseg.learn.evaluate import evaluate
from tests.conftest import make_bundle, write_raster


def _scene(tmp_path, labels: np.ndarray):
    """A 3-band float scene whose argmax is ``labels - 1`` (an identity conv1x1 model predicts ``labels``)."""
    onehot = np.stack([(labels == k).astype(np.float32) for k in (1, 2, 3)])
    onehot[:, :10, :10] = np.nan  # nodata: predicted as nodata, never scored
    return write_raster(tmp_path / "scene.tif", onehot, nodata=np.nan)


def test_perfect_model_scores_one_and_confusion_is_exact(tmp_path):
    lab = np.ones((90, 120), dtype=np.uint8)
    lab[:, 60:] = 2
    lab[30:60, 30:90] = 3
    image = _scene(tmp_path, lab)
    model = make_bundle(tmp_path / "m")
    truth = lab.copy()
    truth[80:, :] = 0  # unlabelled
    labels = write_raster(tmp_path / "labels.tif", truth, nodata=0)
    res = evaluate(model, image, labels, output_dir=tmp_path / "ev", device="cpu")
    m = res.metrics
    assert m["miou"] == 1.0 and m["accuracy"] == 1.0
    assert m["pixels"] == 80 * 120 - 100
    # now disagree on a known block: 200 pixels of class 2 labelled as class 1
    truth[0:10, 60:80] = 1
    labels = write_raster(tmp_path / "labels.tif", truth, nodata=0)
    res = evaluate(model, image, labels, output_dir=tmp_path / "ev", overwrite=True, device="cpu")
    cm = np.array(res.metrics["confusion_matrix"])
    assert cm[0, 1] == 200 and cm.sum() - np.trace(cm) == 200
    water = res.metrics["classes"][0]
    assert water["recall"] == pytest.approx(1 - 200 / cm[0].sum())
    assert json.loads(res.json_path.read_text())["confusion_matrix"] == cm.tolist()
    assert "| class 1 |" in res.markdown_path.read_text() and res.plot_path.exists()
    with pytest.raises(OutputExistsError):
        evaluate(model, image, labels, output_dir=tmp_path / "ev", device="cpu")


def test_polygon_labels_with_background_and_within(tmp_path):
    import geopandas as gpd
    from shapely.geometry import box

    lab = np.ones((64, 64), dtype=np.uint8)
    lab[16:48, 16:48] = 2
    image = _scene(tmp_path, lab)
    model = make_bundle(tmp_path / "m", n_classes=3, background_class=1)
    # the scene grid: origin (500000, 5100000), 2 m pixels
    square = box(500_032, 5_100_000 - 96, 500_096, 5_100_000 - 32)
    gpd.GeoDataFrame({"cls": ["class 2"]}, geometry=[square], crs="EPSG:32633").to_crs("EPSG:3857").to_file(
        tmp_path / "labels.gpkg")
    res = evaluate(model, image, tmp_path / "labels.gpkg", label_column="cls", output_dir=tmp_path / "ev",
                   device="cpu", keep_prediction=True)
    assert res.metrics["accuracy"] > 0.99 and res.prediction_path is not None and res.prediction_path.exists()
    half = box(500_000, 5_100_000 - 128, 500_064, 5_100_000)
    res = evaluate(model, image, tmp_path / "labels.gpkg", label_column="cls", output_dir=tmp_path / "ev2",
                   within=half, device="cpu")
    assert res.metrics["pixels"] == 32 * 64 - 100
    with pytest.raises(InputError, match="no labelled pixel"):
        far = write_raster(tmp_path / "far.tif", np.full((64, 64), 9, np.uint8), nodata=0)
        evaluate(model, image, far, output_dir=tmp_path / "ev3", device="cpu")


def test_cli_evaluate(tmp_path):
    from geoseg.cli import main

    lab = np.ones((40, 40), dtype=np.uint8)
    lab[:, 20:] = 3
    image = _scene(tmp_path, lab)
    labels = write_raster(tmp_path / "labels.tif", lab, nodata=0)
    model = make_bundle(tmp_path / "m")
    res = CliRunner().invoke(main, ["evaluate", str(image), "--model", str(model), "-q", "--labels",
                                    str(labels), "-o", str(tmp_path / "ev"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "mean IoU 1.0000" in res.output and "scene.evaluation.json" in res.output


def test_classes_without_reference_pixels_are_left_out_of_the_means_and_outside_can_be_background(tmp_path):
    """Building polygons scored by a 3-class model: one class never labelled must not drag the mean."""
    import geopandas as gpd
    from click.testing import CliRunner
    from shapely.geometry import box

    from geoseg.cli import main

    lab = np.ones((64, 64), dtype=np.uint8)
    lab[16:48, 16:48] = 2
    lab[0:8, 40:64] = 3  # class 3 is predicted here, and no polygon says what it is
    image = _scene(tmp_path, lab)
    model = make_bundle(tmp_path / "m", n_classes=3)  # no background class in the bundle
    square = box(500_032, 5_100_000 - 96, 500_096, 5_100_000 - 32)
    gpd.GeoDataFrame({"v": [2]}, geometry=[square], crs="EPSG:32633").to_file(tmp_path / "b.gpkg")
    inside = evaluate(model, image, tmp_path / "b.gpkg", label_value=2, output_dir=tmp_path / "e1", device="cpu")
    assert inside.metrics["pixels"] == 32 * 32 and inside.metrics["miou"] == 1.0  # only the polygon scored
    r = CliRunner().invoke(main, ["evaluate", "-m", str(model), "-i", str(image), "-l", str(tmp_path / "b.gpkg"),
                                  "--label-value", "2", "--background-outside", "class 1", "-o",
                                  str(tmp_path / "e2"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "e2" / "scene.evaluation.json").read_text())
    by = {c["name"]: c for c in m["classes"]}
    assert by["class 3"]["support"] == 0 and by["class 3"]["iou"] == 0.0  # predicted, never labelled
    assert m["left_out"] == ["class 3"] and "Left out of the means" in r.output
    assert m["miou"] == pytest.approx((by["class 1"]["iou"] + by["class 2"]["iou"]) / 2)
    assert m["pixels"] == 64 * 64 - 100  # outside the polygon is class 1 now (nodata corner never scored)
    r = CliRunner().invoke(main, ["evaluate", "-m", str(model), "-i", str(image), "-l", str(tmp_path / "b.gpkg"),
                                  "--label-value", "2", "--background-outside", "water", "-o",
                                  str(tmp_path / "e3"), "--device", "cpu"])
    assert r.exit_code == 1 and "not a class of the model" in r.output
