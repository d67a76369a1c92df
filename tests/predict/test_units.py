"""Units are plain data: they cover the scene, pickle, and run in another process with nothing but the
bundle and the scene path; strips staged by a unit are its record of what is done."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.errors import InputError
from geoseg.io.raster import BLOCK, SceneInfo, inspect_scene, scene_stem
from geoseg.io.store import Store
from geoseg.model.bundle import bundle_digest, read_bundle
from geoseg.model.preflight import check_scene
from geoseg.predict.schedule import check_scheduler
from geoseg.predict.units import (
    ModelRef,
    PredictOptions,
    ScenePlan,
    fingerprint,
    parse_strip,
    plan_units,
    strip_key,
)
from tests.conftest import make_bundle, write_raster


def _info(width: int, height: int) -> SceneInfo:
    return SceneInfo("s.tif", width, height, 3, "uint8", None, (1, 0, 0, 0, -1, 0), None, "none", None, (), "GTiff",
                     (0, 0, 1, 1), ())


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 5000), h=st.integers(1, 5000), panel=st.sampled_from([512, 1024, 8192]),
       rows=st.sampled_from([None, 512, 1536]))
def test_units_tile_the_scene_on_output_tiles(w, h, panel, rows):
    plan = ScenePlan(_info(w, h), "s", (1, 2, 3), 256, 32, "out", "f" * 32)
    units = plan_units(plan, ModelRef("m", "d"), PredictOptions(panel_width=panel, unit_rows=rows))
    covered = np.zeros((h, w), np.int8)
    for u in units:
        assert u.c0 % BLOCK == 0 and u.r0 % BLOCK == 0 and u.c1 - u.c0 <= panel
        covered[u.r0:u.r1, u.c0:u.c1] += 1
        assert u.strip_rows[0] == u.r0 and all(r % BLOCK == 0 for r in u.strip_rows)
    assert (covered == 1).all()


def test_unit_rows_must_be_whole_output_tiles():
    plan = ScenePlan(_info(100, 100), "s", (1,), 64, 16, "out", "f")
    with pytest.raises(InputError, match="multiple of 512"):
        plan_units(plan, ModelRef("m", "d"), PredictOptions(unit_rows=700))


def test_names_and_fingerprints():
    assert parse_strip(strip_key("classes", 1024, 512, 1000).split("/")[1]) == (1024, 512, 1000)
    assert parse_strip(".r0000000_c0000000-0000512.tif.tmp-x") is None
    assert scene_stem("s3://b/k/scene.TIFF?x=1") == "scene" and scene_stem("a/b.c.tif") == "b.c"
    info, ref = _info(300, 200), ModelRef("m", "digest")
    base = fingerprint(info, [1, 2, 3], 64, 16, ref, PredictOptions())
    same = [PredictOptions(device="cpu"), PredictOptions(workers=7), PredictOptions(overwrite=True)]
    assert all(fingerprint(info, [1, 2, 3], 64, 16, ref, o) == base for o in same)
    other = [fingerprint(info, [1, 2, 3], 32, 16, ref, PredictOptions()),
             fingerprint(info, [3, 2, 1], 64, 16, ref, PredictOptions()),
             fingerprint(info, [1, 2, 3], 64, 16, ModelRef("m", "other"), PredictOptions()),
             fingerprint(info, [1, 2, 3], 64, 16, ref, PredictOptions(blend="hann")),
             fingerprint(_info(301, 200), [1, 2, 3], 64, 16, ref, PredictOptions())]
    assert base not in other and len(set(other)) == len(other)


@pytest.mark.parametrize("spec", ["threads", "local:2", "tcp://10.0.0.5:8786", "tls://host:8786", None])
def test_scheduler_forms(spec):
    check_scheduler(spec)


@pytest.mark.parametrize("spec", ["local:0", "localhost:8786", "dask", "tcp:/x"])
def test_bad_scheduler_forms(spec):
    with pytest.raises(InputError, match="local:N"):
        check_scheduler(spec)


def test_a_pickled_unit_runs_in_another_process_and_resumes(tmp_path):
    model = make_bundle(tmp_path / "m", n_bands=3, chip=64, overlap=16)
    data = np.random.default_rng(3).normal(size=(3, 1100, 700)).astype(np.float32)
    scene = write_raster(tmp_path / "s.tif", data)
    bundle = read_bundle(model)
    ref = ModelRef(str(model), bundle_digest(bundle.files))
    info = inspect_scene(scene)
    opts = PredictOptions(unit_rows=512)
    bands = check_scene(bundle.contract, info).band_indexes
    plan = ScenePlan(info, "s", tuple(bands), 64, 16, str(tmp_path / "out"),
                     fingerprint(info, bands, 64, 16, ref, opts))
    units = plan_units(plan, ref, opts)
    assert len(units) == 3 and all(u.c1 - u.c0 == 700 for u in units)
    blob = tmp_path / "unit.pkl"
    blob.write_bytes(pickle.dumps(units[1]))
    code = ("import pickle, sys; from geoseg.predict.engine import run_unit; "
            "r = run_unit(pickle.loads(open(sys.argv[1], 'rb').read())); print(r.chips, r.rows_resumed)")
    out = subprocess.run([sys.executable, "-c", code, str(blob)], check=True, capture_output=True, text=True)
    chips, resumed = map(int, out.stdout.split())
    assert chips == units[1].chips() and resumed == 0
    stage = Store(plan.staging)
    assert stage.list("classes") == [Path(strip_key("classes", 512, 0, 700)).name]
    # run again: the strip is there, nothing is computed
    out = subprocess.run([sys.executable, "-c", code, str(blob)], check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["0", "512"]
    # a worker refuses a bundle that is not the job's model
    bad = dataclasses.replace(units[0], model=ModelRef(str(model), "0" * 32))
    blob.write_bytes(pickle.dumps(bad))
    res = subprocess.run([sys.executable, "-c", code, str(blob)], capture_output=True, text=True)
    assert res.returncode != 0 and "digest mismatch" in res.stderr
