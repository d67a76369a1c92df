import json

import numpy as np
import pytest
from click.testing import CliRunner

from geoseg.errors import InputError, OutputExistsError
from geoseg.evaluate import evaluate
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
    res = CliRunner().invoke(main, ["-q", "evaluate", "--model", str(model), "--image", str(image), "--labels",
                                    str(labels), "-o", str(tmp_path / "ev"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "mean IoU 1.0000" in res.output and "scene.evaluation.json" in res.output
