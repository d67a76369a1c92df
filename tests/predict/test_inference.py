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


def test_after_a_failed_batch_the_queued_chips_fail_the_same_way_without_running():
    """A refusal (an int8 network below the bar) or a crash is said once: the chips queued behind it get the
    same error, the network is not called again, and the server says it failed."""
    import threading

    class Failing:
        device = type("D", (), {"type": "cpu"})()
        torch_cuda = False

        def __init__(self) -> None:
            self.calls = 0
            self.started = threading.Event()
            self.go = threading.Event()

        def run_batch(self, batch: np.ndarray) -> np.ndarray:
            self.calls += 1
            self.started.set()
            self.go.wait(5)  # the other chips queue up meanwhile
            raise ValueError("refused")

    pred = Failing()
    with ModelServer(pred, batch_size=1, max_wait=0.01) as server:
        futures = [server.submit(np.zeros((1, 2, 2), np.float32))]
        assert pred.started.wait(5)
        futures += [server.submit(np.zeros((1, 2, 2), np.float32)) for _ in range(4)]
        pred.go.set()
        errors = [f.exception(5) for f in futures]
        assert server.failed
    assert pred.calls == 1 and all(isinstance(e, ValueError) and str(e) == "refused" for e in errors)


def test_a_worker_does_not_keep_a_runtime_whose_model_failed(tmp_path):
    from geoseg.model.bundle import bundle_digest, read_bundle
    from geoseg.predict.engine import worker_runtime
    from geoseg.predict.units import ModelRef, PredictOptions

    bundle = make_bundle(tmp_path / "m", n_bands=3, chip=32, overlap=8)
    ref, options = ModelRef(str(bundle), bundle_digest(read_bundle(bundle).files)), PredictOptions(device="cpu")
    rt = worker_runtime(ref, options)
    assert worker_runtime(ref, options) is rt  # kept for the worker's next unit
    rt.server.submit(np.zeros((2, 32), np.float32)).exception(30)  # a chip of the wrong shape fails the model
    assert rt.server.failed
    fresh = worker_runtime(ref, options)
    assert fresh is not rt and not fresh.server.failed
    probs, _ = fresh.server.submit(np.zeros((3, 32, 32), np.float32)).result(30)
    assert probs.shape[1:] == (32, 32)
