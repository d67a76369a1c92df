"""The model stage: NHWC on CPU gives the same probabilities, and a chip's result does not depend on the
chips batched with it (short batches are padded to a fixed shape)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geoseg.model.weights import load_model
from geoseg.predict.inference import ModelServer, Predictor
from tests.conftest import make_bundle


def test_cpu_runs_channels_last_with_the_same_probabilities(tmp_path):
    loaded = load_model(make_bundle(tmp_path / "m", n_bands=3, n_classes=4, chip=64, architecture="unet"))
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 3, 64, 64)).astype(np.float32))
    with torch.inference_mode():
        want = torch.softmax(loaded.module.eval()(x), dim=1)
        pred = Predictor(loaded, "cpu", "fp32")
        got = pred.forward(x.contiguous(memory_format=torch.channels_last))
    conv = next(m for m in pred.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert pred.channels_last and conv.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
    assert (got.argmax(1) == want.argmax(1)).all()


def test_a_chip_gets_the_same_probabilities_whatever_it_is_batched_with(tmp_path):
    loaded = load_model(make_bundle(tmp_path / "m", n_bands=3, n_classes=4, chip=64, architecture="unet"))
    chips = np.random.default_rng(1).normal(size=(5, 3, 64, 64)).astype(np.float32)
    with ModelServer(Predictor(loaded, "cpu", "fp32"), batch_size=4, max_wait=0.5) as server:
        together = [server.submit(c) for c in chips]  # one full batch of 4, then one padded batch of 1
        together = [f.result() for f in together]
        alone = [server.submit(c).result() for c in chips[::-1]]  # each in its own padded batch
    for (p_all, seconds), (p_one, _) in zip(together, alone[::-1]):
        assert seconds > 0 and p_all.shape == (4, 64, 64) and p_all.flags.c_contiguous
        np.testing.assert_array_equal(p_all, p_one)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_overflow_is_counted_once_its_batch_is_done_and_the_results_match_the_cpu(tmp_path, caplog):
    """On a GPU the overflow check waits for nothing (no host sync per batch): the count is read when the
    batch's results are, and the probabilities are the CPU's."""
    import logging

    loaded = load_model(make_bundle(tmp_path / "m", n_bands=3, n_classes=4, chip=64, architecture="unet"))
    chips = np.random.default_rng(2).normal(size=(6, 3, 64, 64)).astype(np.float32)
    with ModelServer(Predictor(loaded, "cpu", "fp32"), batch_size=2) as server:
        want = [f.result()[0] for f in [server.submit(c) for c in chips]]
    pred = Predictor(load_model(tmp_path / "m"), "cuda", "fp32")
    with ModelServer(pred, batch_size=2) as server:
        got = [f.result()[0] for f in [server.submit(c) for c in chips]]
    assert pred.overflowed == 0 and not pred._bad
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-3)
    with torch.no_grad():
        for p in pred.net.parameters():
            p.mul_(1e38)  # logits past float32's range
    with caplog.at_level(logging.WARNING), ModelServer(pred, batch_size=2) as server:
        probs = [f.result()[0] for f in [server.submit(c) for c in chips[:4]]]
    assert pred.overflowed >= 1 and "overflowed" in caplog.text
    assert all(np.isfinite(p).all() and np.allclose(p.sum(0), 1, atol=1e-5) for p in probs)


def test_on_a_cpu_every_network_call_has_the_same_shape():
    """net_batch: the server gathers a whole number of calls and pads the last, so no chip is ever summed in a
    batch of another shape (a lone small chip gets other kernels than a batch of two)."""

    class Recorder:
        device = type("D", (), {"type": "cpu"})()
        torch_cuda = False

        def __init__(self) -> None:
            self.shapes: list[int] = []

        def run_batch(self, batch: np.ndarray) -> np.ndarray:
            self.shapes.append(len(batch))
            return batch[:, :1] * 2

    rec = Recorder()
    with ModelServer(rec, batch_size=3, max_wait=0.2, net_batch=2) as server:
        assert server.batch_size == 4  # a whole number of network calls
        futures = [server.submit(np.full((1, 2, 2), i, np.float32)) for i in range(5)]
        got = [f.result()[0] for f in futures]
    assert set(rec.shapes) == {2}
    assert [float(g[0, 0, 0]) for g in got] == [0, 2, 4, 6, 8]
