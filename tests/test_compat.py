"""Work begun before the package moved into rooms (issue 20) goes on after it.

The last flat-layout commit's ``geoseg/`` is taken from git history and run in a subprocess: it writes a
bundle, finishes one scene of a job (its manifest) and is interrupted in the second scene after one strip
(its staging folder). Today's code must load that bundle, read that job file, skip the finished scene and
resume the interrupted one from its staged strip, giving the same bytes as a fresh run.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from tests.conftest import write_raster

PRE_MOVE = "8ba9581"  # the last commit of the flat layout
ROOT = Path(__file__).resolve().parents[1]

OLD_RUN = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch
    from click.testing import CliRunner

    import geoseg.schedule as schedule
    from geoseg.bundle import ArchSpec, ClassInfo, Contract, InputSpec, save_bundle
    from geoseg.cli import main
    from geoseg.models import build_network

    work = Path(sys.argv[1])
    c = Contract(name="old", model=ArchSpec(architecture="conv1x1"),
                 input=InputSpec(bands=["b1", "b2", "b3"], mean=[0.0] * 3, std=[1.0] * 3),
                 classes=[ClassInfo(id=i + 1, name=f"c{i + 1}") for i in range(3)], chip_size=64, overlap=16)
    torch.manual_seed(0)
    save_bundle(work / "model", c, build_network(c).eval())

    real = schedule.run_unit

    def run_unit(unit, *args, **kwargs):  # Ctrl-C once the second scene's first strip is staged
        if unit.scene.stem == "b" and unit.r0 > 0:
            raise KeyboardInterrupt
        return real(unit, *args, **kwargs)

    schedule.run_unit = run_unit
    first = CliRunner().invoke(main, ["-q", "predict", "--job", str(work / "first.yaml")])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(main, ["-q", "predict", "--job", str(work / "job.yaml")])
    assert second.exit_code == 130, (second.exit_code, second.output)
""")


def _job(path: Path, scenes: list[str], output_dir: str) -> None:
    listed = "\n".join(f"  - {s}" for s in scenes)
    path.write_text(f"scenes:\n{listed}\nmodel: model\noutput_dir: {output_dir}\n"
                    "options:\n  workers: 1\n  unit_rows: 512\n  vector_format: null\n  quicklook: false\n")


@pytest.fixture(scope="module")
def pre_move_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout of geoseg to take the pre-move package from history")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", PRE_MOVE, "geoseg"], capture_output=True)
    if archive.returncode:
        pytest.skip(f"commit {PRE_MOVE} is not in this clone (shallow?): {archive.stderr.decode().strip()}")
    folder = tmp_path_factory.mktemp("pre-move")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def test_a_job_begun_before_the_move_resumes_after_it(pre_move_package: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import geoseg.predict.schedule as schedule
    from geoseg.cli import main
    from geoseg.model.weights import load_model

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_raster(tmp_path / f"{name}.tif", rng.normal(size=(3, 1100, 300)).astype(np.float32))
    _job(tmp_path / "first.yaml", ["a.tif"], "out")
    _job(tmp_path / "job.yaml", ["a.tif", "b.tif"], "out")
    env = {**os.environ, "PYTHONPATH": str(pre_move_package)}
    old = subprocess.run([sys.executable, "-c", OLD_RUN, str(tmp_path)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert old.returncode == 0, old.stdout + old.stderr
    staged = sorted(p.name for p in (tmp_path / "out" / ".geoseg-staging" / "b").rglob("*.tif"))
    assert len(staged) == 1, staged  # one strip of b, staged by the old code
    assert (tmp_path / "out" / "geoseg-manifest.json").is_file() and (tmp_path / "out" / "a.classes.tif").is_file()
    a_before = (tmp_path / "out" / "a.classes.tif").read_bytes()

    load_model(tmp_path / "model")  # the old bundle loads as it is
    ran: list[tuple[str, int, int]] = []
    real = schedule.run_unit

    def run_unit(unit, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = real(unit, *args, **kwargs)
        ran.append((unit.scene.stem, unit.r0, result.rows_resumed))
        return result

    monkeypatch.setattr(schedule, "run_unit", run_unit)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["-q", "predict", "--job", str(tmp_path / "job.yaml")])
    assert res.exit_code == 0, res.output
    # a was finished; b's first strip was staged, and only the other two were computed
    assert sorted(ran) == [("b", 0, 512), ("b", 512, 0), ("b", 1024, 0)]
    assert (tmp_path / "out" / "a.classes.tif").read_bytes() == a_before
    assert not (tmp_path / "out" / ".geoseg-staging").exists()

    _job(tmp_path / "fresh.yaml", ["b.tif"], "fresh")
    res = CliRunner().invoke(main, ["-q", "predict", "--job", str(tmp_path / "fresh.yaml")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "b.classes.tif").read_bytes() == (tmp_path / "fresh" / "b.classes.tif").read_bytes()
