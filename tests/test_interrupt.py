"""Killed at random moments (SIGKILL, SIGINT), then run again: no partial file under a final name, no stale
staging or temporaries; predict's outputs are byte-identical to an uninterrupted run, train resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import yaml
from scipy import ndimage

from tests._training import tiny_config, write_scene
from tests.conftest import make_bundle, write_raster

# one worker runs this module, so each signal's test shares the module's uninterrupted runs (pytest-xdist)
pytestmark = pytest.mark.xdist_group("interrupt")

MOMENTS = 1  # random moments per signal, drawn over the uninterrupted run's duration (other ones per signal:
# the two signals together try two moments; the suite's whole run stays under ten minutes)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "geoseg.cli", "-q", *args]


def _run_and_kill(cmd: list[str], after: float, sig: int) -> int:
    # a session of its own, signalled as a terminal does: the whole group (vectorize's workers too)
    p = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    if p.poll() is None:
        os.killpg(p.pid, sig)
    p.communicate(timeout=300)
    return p.returncode


def _temporaries(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if ".tmp-" in p.name or p.name.startswith((".geoseg-staging", ".geoseg-work", ".finish-")))


def _finals(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def predicted(tmp_path_factory) -> tuple[list[str], float, Path]:
    """One uninterrupted predict, shared by both signals: its arguments, its duration and its output folder."""
    tmp_path = tmp_path_factory.mktemp("interrupt")
    field = ndimage.zoom(np.random.default_rng(11).normal(size=(3, 48, 48)), (1, 32, 32), order=1).astype(np.float32)
    scene = write_raster(tmp_path / "scene.tif", field)
    model = make_bundle(tmp_path / "m", n_bands=3, chip=256, overlap=32)
    args = ["predict", str(scene), "-m", str(model), "--probabilities", "--workers", "2"]
    t0 = time.perf_counter()
    subprocess.run(_cli(*args, "-o", str(tmp_path / "ref")), check=True, timeout=300)
    return args, time.perf_counter() - t0, tmp_path / "ref"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_predict_killed_at_random_moments_then_rerun_gives_identical_outputs(tmp_path, sig, predicted):
    rng = np.random.default_rng([11, sig])
    args, duration, ref_dir = predicted
    ref = _finals(ref_dir)
    assert {"scene.classes.tif", "scene.probs.tif", "scene.gpkg"} <= set(ref)
    ref_polys = pyogrio.read_dataframe(ref_dir / "scene.gpkg")
    for k, after in enumerate(sorted(rng.uniform(0.3, 1.0, MOMENTS) * duration)):
        out = tmp_path / f"out{k}"
        _run_and_kill(_cli(*args, "-o", str(out)), after, sig)
        for name, data in _finals(out).items() if out.exists() else []:
            # whatever carries a final name is whole: a raster equals the uninterrupted run's, polygons read
            if name.endswith(".tif"):
                assert data == ref[name], (after, name)
            elif name.endswith(".gpkg"):
                assert len(pyogrio.read_dataframe(out / name)) == len(ref_polys), (after, name)
        r = subprocess.run(_cli(*args, "-o", str(out)), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (after, r.stderr)
        again = _finals(out)
        for name in ("scene.classes.tif", "scene.probs.tif"):
            assert again[name] == ref[name], (after, name)
        polys = pyogrio.read_dataframe(out / "scene.gpkg")
        assert polys.drop(columns="geometry").equals(ref_polys.drop(columns="geometry"))
        assert polys.geometry.geom_equals_exact(ref_polys.geometry, 0).all()
        assert _temporaries(out) == [], (after, _temporaries(out))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, float]:
    """One uninterrupted training run, shared by both signals: its config and its duration."""
    tmp_path = tmp_path_factory.mktemp("interrupt-train")
    image, labels = write_scene(tmp_path, size=128)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(image, labels, epochs=6, steps_per_epoch=4)))
    t0 = time.perf_counter()
    subprocess.run(_cli("train", str(cfg), "-o", str(tmp_path / "ref")), check=True, timeout=300)
    return cfg, time.perf_counter() - t0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_train_killed_at_random_moments_resumes(tmp_path, sig, trained):
    cfg, duration = trained
    rng = np.random.default_rng([12, sig])
    for k, after in enumerate(sorted(rng.uniform(0.3, 1.0, MOMENTS) * duration)):
        out = tmp_path / f"run{k}"
        code = _run_and_kill(_cli("train", str(cfg), "-o", str(out)), after, sig)
        if sig == signal.SIGINT and code == 130:
            assert (out / "checkpoints" / "last.ckpt").exists() or not out.exists()
        if sig == signal.SIGINT:  # a SIGKILL between staging and publishing leaves a temporary: --resume sweeps it
            assert _temporaries(out) == [] if out.exists() else True, (after, _temporaries(out))
        r = subprocess.run(_cli("train", str(cfg), "-o", str(out), "--resume"), capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (after, r.stderr)
        rows = (out / "metrics.csv").read_text().strip().splitlines()
        assert [int(line.split(",")[0]) for line in rows[1:]] == list(range(1, 7)), (after, rows)
        assert (out / "model" / "model.json").exists() and _temporaries(out) == []
