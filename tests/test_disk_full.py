"""A disk that fills during a write: one line, a non-zero exit, nothing under a final name, no temporaries."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from geoseg.cli import main
from geoseg.errors import DiskFullError
from geoseg.io.staging import disk_full
from tests._training import tiny_config, write_scene
from tests.conftest import make_bundle, write_raster


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (mounting needs root, as on CI; skipped elsewhere, the file-size limit test still runs)."""
    where = tmp_path / "disk"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def _scene(tmp_path, size=1024):
    rng = np.random.default_rng(1)
    return write_raster(tmp_path / "scene.tif", rng.integers(1, 255, (3, size, size), dtype=np.uint8), nodata=0)


def _left(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.name != ".geoseg.lock"]


def test_a_disk_that_fills_during_predict_ends_in_one_line_and_leaves_nothing(tmp_path, small_disk):
    scene, model = _scene(tmp_path), make_bundle(tmp_path / "m", chip=256, overlap=32)
    out = small_disk / "out"
    r = CliRunner().invoke(main, ["predict", str(scene), "-m", str(model), "-o", str(out), "--probabilities",
                                  "--device", "cpu"])
    assert r.exit_code == 1, r.output
    line = r.output.strip().splitlines()[-1]
    assert str(out) in line and "the disk is full" in line and "run the same command again" in line, r.output
    assert "internal error" not in r.output and "Traceback" not in r.output
    assert _left(small_disk) == []  # no final file, no staged strip, no temporary


def test_a_disk_that_fills_during_training_ends_in_one_line(tmp_path, small_disk):
    image, labels = write_scene(tmp_path, size=128)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(image, labels, epochs=3)))  # a U-Net's checkpoints: ~5 MB each
    out = small_disk / "run"
    r = CliRunner().invoke(main, ["train", str(cfg), "-o", str(out)])
    assert r.exit_code == 1, r.output
    line = r.output.strip().splitlines()[-1]
    assert "the disk is full" in line and "internal error" not in r.output, r.output
    assert not [p for p in _left(small_disk) if ".tmp-" in str(p)]  # no temporaries (a resumable run may stay)


def test_a_file_size_limit_during_predict_ends_in_one_line(tmp_path):
    """``ulimit -f``: GDAL's write fails with EFBIG; the same one line, and nothing left (no root needed)."""
    scene, model = _scene(tmp_path), make_bundle(tmp_path / "m", chip=256, overlap=32)
    out = tmp_path / "out"
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
            "from geoseg.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    r = subprocess.run([sys.executable, "-c", code, "predict", str(scene), "-m", str(model), "-o", str(out),
                        "--probabilities", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "file-size limit" in line and "internal error" not in r.stderr, r.stderr
    assert _left(out) == []


def test_disk_full_is_told_from_other_failures(tmp_path):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("could not save") from inner
    except RuntimeError as exc:
        found = disk_full(exc, tmp_path)
    assert isinstance(found, DiskFullError) and str(tmp_path) in str(found)
    assert disk_full(ValueError("bad value"), tmp_path) is None
    assert disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path) is None
    # a GDAL write error says nothing of space: plenty free here, so it is not taken for a full disk
    assert disk_full(RuntimeError("Write failed. See previous exception"), tmp_path) is None
