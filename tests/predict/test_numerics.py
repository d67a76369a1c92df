"""Numerical safety: blended probabilities sum to 1, overflow under autocast keeps a distribution, metrics
of classes absent from the labels divide by nothing."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import rasterio
import torch

from geoseg.learn.metrics import ConfusionMatrix, scores
from geoseg.model.weights import load_model
from geoseg.predict.api import predict_scene
from geoseg.predict.inference import Predictor
from tests.conftest import make_bundle, write_raster


def test_blended_probabilities_sum_to_one_where_valid_and_are_nodata_elsewhere(tmp_path):
    rng = np.random.default_rng(7)
    data = rng.normal(size=(3, 150, 170)).astype(np.float32)
    data[:, :20, :30] = np.nan  # a hole
    scene = write_raster(tmp_path / "s.tif", data)
    model = make_bundle(tmp_path / "m", n_bands=3, n_classes=4, architecture="unet", chip=64, overlap=24)
    r = predict_scene(scene, model, tmp_path / "out", probabilities=True, probabilities_dtype="float32",
                      vector_format=None)
    with rasterio.open(r.probabilities_path) as ds:
        probs = ds.read()
        nodata = ds.nodata
    valid = np.isfinite(data).any(axis=0)
    total = probs[:, valid].sum(axis=0)
    assert np.allclose(total, 1.0, atol=1e-5), (total.min(), total.max())
    assert (probs[:, valid] >= 0).all() and (probs[:, valid] <= 1).all()
    hole = probs[:, ~valid]
    assert np.isnan(hole).all() if nodata is None or np.isnan(nodata) else (hole == nodata).all()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_logits_that_overflow_stay_a_distribution_and_are_reported(tmp_path, caplog, precision):
    model = load_model(make_bundle(tmp_path / "m", n_bands=3, chip=32, overlap=8))
    with torch.no_grad():
        model.module.weight.mul_(1e38)  # logits past float32's (and bf16's) range on ordinary inputs
    predictor = Predictor(model, device="cpu", precision=precision)
    x = torch.zeros(2, 3, 32, 32)
    x[:, 1] = 5.0  # class 2 wins, by an infinite margin
    x[1, 0, :4, :4] = float("nan")  # a NaN input reaching the network (the engine masks these first)
    with caplog.at_level(logging.WARNING):
        probs = predictor.forward(x)
    assert torch.isfinite(probs).all()
    assert torch.allclose(probs.sum(dim=1), torch.ones(2, 32, 32), atol=1e-6)
    assert (probs.argmax(dim=1)[0] == 1).all()
    assert "overflowed" in caplog.text and predictor.overflowed == 1


def test_metrics_of_classes_absent_from_labels_and_predictions_divide_by_nothing():
    cm = ConfusionMatrix(4)
    cm.update(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]))  # classes 2 and 3 never occur
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 RuntimeWarning anywhere
        s = scores(cm.matrix, ["a", "b", "c", "d"])
        empty = scores(np.zeros((3, 3), dtype=np.int64))
    assert [c["iou"] for c in s["classes"]][2:] == [None, None]
    assert s["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert s["accuracy"] == pytest.approx(0.75)
    assert empty["accuracy"] is None and empty["miou"] is None and empty["mf1"] is None
