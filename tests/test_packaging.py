"""The lean install: requirements/runtime.txt is pyproject's dependencies minus the training stack (plus what
int8 needs), it covers every distribution a torch-free predict imports, and in a fresh virtual environment
with only that set installed an ONNX bundle predicts (slow: needs a package index or a pip cache)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "requirements" / "runtime.txt"
TRAINING_STACK = {"torch", "torchvision", "segmentation-models-pytorch", "timm", "tensorboard"}


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _runtime() -> list[str]:
    return [ln.strip() for ln in RUNTIME.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_the_runtime_set_is_the_core_minus_the_training_stack():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    runtime = _runtime()
    assert not {_name(r) for r in runtime} & TRAINING_STACK
    # the same pins as the core, so the two installs never disagree on a version
    assert {r for r in core if _name(r) not in TRAINING_STACK} == set(runtime)


def test_the_runtime_set_covers_what_a_torch_free_predict_imports(tmp_path):
    """Every third-party distribution whose modules a torch-free predict (to polygons) loaded is in the set,
    or installed by one in it."""
    pytest.importorskip("onnxruntime")
    from importlib.metadata import PackageNotFoundError, packages_distributions, requires

    from tests.predict.test_torch_free import HEAVY

    scene = tmp_path / "scene.tif"
    code = f"""
import sys, json
sys.path.insert(0, {str(ROOT)!r})
import numpy as np
from tests.conftest import make_bundle, write_raster
from geoseg.model.export import export
b = make_bundle(__import__('pathlib').Path({str(tmp_path)!r}) / 'm', n_bands=3, chip=32, overlap=8)
onnx_dir = export(b, 'onnx', {str(tmp_path / 'm-onnx')!r}).folder
write_raster(__import__('pathlib').Path({str(scene)!r}), np.random.default_rng(0).normal(size=(3, 70, 60)).astype(np.float32))
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=240)
    probe = f"""
import sys, json
from geoseg.cli import main
main(['-q', 'predict', {str(scene)!r}, '--model', {str(tmp_path / 'm-onnx')!r}, '--output-dir',
      {str(tmp_path / 'out')!r}], standalone_mode=False)
print('MODULES=' + json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))
"""
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=ROOT,
                         timeout=240).stdout
    tops = __import__("json").loads(next(ln for ln in out.splitlines() if ln.startswith("MODULES="))[8:])
    assert not set(tops) & set(HEAVY)
    dists = packages_distributions()
    used = {_name(d) for t in tops for d in dists.get(t, [])} - {"geoseg"}
    allowed = {_name(r) for r in _runtime()}
    frontier = list(allowed)
    while frontier:  # the set and everything it installs
        try:
            reqs = requires(frontier.pop()) or []
        except PackageNotFoundError:  # a conditional dependency not installed here
            continue
        for req in reqs:
            if "extra ==" in req and "distributed" not in req:
                continue
            n = _name(req)
            if n not in allowed:
                allowed.add(n)
                frontier.append(n)
    stdlib_like = {"setuptools", "pip", "packaging", "importlib-metadata", "zipp", "typing-extensions"}
    # imported only where installed: rasterio's AWS session takes boto3 when present, requests its charset
    # detector; the lean venv (below) runs without them
    optional = {"boto3", "botocore", "s3transfer", "jmespath", "charset-normalizer", "chardet", "lazy-importer"}
    assert used - allowed - stdlib_like - optional == set()


@pytest.mark.skipif(not os.environ.get("GEOSEG_LEAN_VENV"), reason="set GEOSEG_LEAN_VENV to a venv made with "
                    "pip install --no-deps -e . && pip install -r requirements/runtime.txt (needs an index)")
def test_a_lean_venv_predicts_an_onnx_bundle(tmp_path):
    venv = Path(os.environ["GEOSEG_LEAN_VENV"])
    py = venv / "bin" / "python"
    assert subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode != 0, \
        "the lean venv must not have torch"
    import numpy as np

    from geoseg.model.export import export
    from tests.conftest import make_bundle, write_raster

    b = make_bundle(tmp_path / "m", n_bands=3, chip=32, overlap=8)
    onnx_dir = export(b, "onnx", tmp_path / "m-onnx").folder
    scene = write_raster(tmp_path / "s.tif", np.random.default_rng(0).normal(size=(3, 70, 60)).astype(np.float32))
    res = subprocess.run([str(venv / "bin" / "geoseg"), "-q", "predict", str(scene), "--model", str(onnx_dir),
                          "--output-dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "s.classes.tif").is_file() and (tmp_path / "out" / "s.gpkg").is_file()
