"""Mapping jobs: the same bytes on any scheduler and split, a lost worker, resume after SIGKILL, object
storage in and out, a corrupt scene among good ones. Real parts: a distributed.LocalCluster of worker
processes, a geoseg CLI process killed with SIGKILL, a loopback S3 server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from click.testing import CliRunner

from geoseg.cli import main
from geoseg.predict.api import predict_scenes
from geoseg.predict.manifest import MANIFEST
from geoseg.predict.units import STAGING
from tests.conftest import make_bundle, write_raster


@pytest.fixture(scope="module")
def unet(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("b") / "unet", n_bands=3, n_classes=4, chip=64, overlap=16,
                       architecture="unet")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> list[str]:
    tmp = tmp_path_factory.mktemp("scenes")
    out = []
    for i, (h, w) in enumerate([(700, 900), (530, 610), (300, 1100)]):
        data = np.random.default_rng(i).normal(size=(3, h, w)).astype(np.float32)
        out.append(str(write_raster(tmp / f"s{i}.tif", data)))
    return out


EPOCH = "1764028800"  # SOURCE_DATE_EPOCH: GeoPackages then record this date, so their bytes can be compared


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    mp = pytest.MonkeyPatch()
    mp.setenv("SOURCE_DATE_EPOCH", EPOCH)  # the worker processes inherit it
    try:
        lc = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    finally:
        mp.undo()
    with lc, distributed.Client(lc) as client:
        yield client


def _bytes(folder: Path, pattern: str = "*.classes.tif") -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(pattern))}


def test_same_bytes_on_threads_and_on_a_cluster_whatever_the_split(tmp_path, unet, scenes, cluster, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    ref = predict_scenes(scenes, unet, tmp_path / "local", probabilities=True, confidence=True)
    assert [s.status for s in ref.scenes] == ["done"] * 3 and ref.scheduler == "threads"
    predict_scenes(scenes, unet, tmp_path / "split", probabilities=True, confidence=True, panel_width=512,
                   unit_rows=512)
    dist = predict_scenes(scenes, unet, tmp_path / "dist", probabilities=True, confidence=True, scheduler=cluster,
                          panel_width=512, unit_rows=512, name="job", merge_vectors=True)
    assert dist.scheduler == "distributed" and dist.workers == 2
    assert [s.status for s in dist.scenes] == ["done"] * 3
    want = _bytes(tmp_path / "local")
    assert len(want) == 3
    assert _bytes(tmp_path / "split") == want and _bytes(tmp_path / "dist") == want
    assert _bytes(tmp_path / "split", "*.probs.tif") == _bytes(tmp_path / "local", "*.probs.tif")
    assert _bytes(tmp_path / "split", "*.confidence.tif") == _bytes(tmp_path / "local", "*.confidence.tif")
    assert len(_bytes(tmp_path / "local", "*.confidence.tif")) == 3
    # one network call shape on every worker (geoseg.predict.server): the same probabilities, the same confidence
    assert _bytes(tmp_path / "dist", "*.probs.tif") == _bytes(tmp_path / "local", "*.probs.tif")
    assert _bytes(tmp_path / "dist", "*.confidence.tif") == _bytes(tmp_path / "local", "*.confidence.tif")
    import pyogrio

    assert _bytes(tmp_path / "dist", "s*.gpkg") == _bytes(tmp_path / "local", "s*.gpkg")  # polygons too
    assert len(_bytes(tmp_path / "local", "s*.gpkg")) == 3
    # one scene, more panels and row bands than workers: the same bytes again
    one = predict_scenes(scenes[:1], unet, tmp_path / "one", scheduler=cluster, panel_width=512, unit_rows=512,
                         vector_format=None)
    assert (tmp_path / "one" / "s0.classes.tif").read_bytes() == want["s0.classes.tif"]
    # the same job into another folder on the same client: computed again, never handed the last job's results
    predict_scenes(scenes[:1], unet, tmp_path / "one2", scheduler=cluster, panel_width=512, unit_rows=512,
                   vector_format=None)
    assert (tmp_path / "one2" / "s0.classes.tif").read_bytes() == want["s0.classes.tif"]
    assert one.stage_seconds["model"] > 0 and one.scenes[0].chips_computed >= one.scenes[0].chips
    # the job's mosaic opens as one layer with the colour table; no staging is left
    with rasterio.open(tmp_path / "dist" / "job.vrt") as ds:
        assert ds.count == 1 and ds.colormap(1)[1][:3] == (0, 90, 200)
    merged = pyogrio.read_dataframe(tmp_path / "dist" / "job.gpkg")
    assert len(merged) == sum(len(pyogrio.read_dataframe(tmp_path / "dist" / f"{s}.gpkg")) for s in ("s0", "s1", "s2"))
    assert sorted(set(merged["scene"])) == sorted(scenes)
    for d in ("local", "split", "dist", "one"):
        assert not (tmp_path / d / STAGING).exists()


def test_a_worker_killed_mid_job_does_not_fail_the_job(tmp_path, unet, scenes, cluster):
    predict_scenes(scenes, unet, tmp_path / "ref", vector_format=None)
    pids = list(cluster.run(os.getpid).values())
    holder: dict[str, object] = {}

    def job() -> None:
        holder["run"] = predict_scenes(scenes, unet, tmp_path / "job", vector_format=None, scheduler=cluster,
                                       panel_width=512, unit_rows=512)

    t = threading.Thread(target=job)
    t.start()
    staging = tmp_path / "job" / STAGING
    deadline = time.time() + 60
    while time.time() < deadline and not list(staging.glob("*/classes/*.tif")):
        time.sleep(0.05)
    assert t.is_alive(), "the job ended before a worker could be killed; make the scenes larger"
    os.kill(pids[0], signal.SIGKILL)  # the nanny starts a new worker; its tasks run again elsewhere
    t.join(timeout=240)
    run = holder["run"]
    assert [s.status for s in run.scenes] == ["done"] * 3  # type: ignore[attr-defined]
    assert _bytes(tmp_path / "job") == _bytes(tmp_path / "ref")
    assert not staging.exists()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "geoseg.cli", "-q", *args]


def test_resume_after_sigkill_gives_identical_bytes_and_less_work(tmp_path, unet):
    data = np.random.default_rng(5).normal(size=(3, 2560, 2048)).astype(np.float32)
    scene = str(write_raster(tmp_path / "big.tif", data))
    args = [scene, "-m", str(unet), "--panel-width", "1024", "--workers", "2", "--no-vector"]
    subprocess.run(_cli("predict", *args, "-o", str(tmp_path / "ref")), check=True, timeout=300)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("predict", *args, "-o", str(out)))
    staging = out / STAGING / "big" / "classes"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(staging.glob("r*.tif"))) < 4 and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed; make the scene larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "big.classes.tif").exists()  # nothing incomplete under a final name
    staged = len(list(staging.glob("r*.tif")))
    assert staged >= 4
    # Ctrl-C part-way through the resumed run: a clean stop, exit 130, the staging kept for the next run
    proc = subprocess.Popen(_cli("predict", *args, "-o", str(out)), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(staging.glob("r*.tif"))) < staged + 2 and proc.poll() is None:
        time.sleep(0.02)
    finished = proc.poll() is not None
    if not finished:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        if proc.returncode == 0:  # the signal came as the job was ending (its finishing step): it finished
            finished = True
        else:
            assert proc.returncode == 130 and "run the same command again" in err
            assert not (out / "big.classes.tif").exists() and len(list(staging.glob("r*.tif"))) >= staged
    if not finished:
        report = tmp_path / "resume.json"
        subprocess.run(_cli("predict", *args, "-o", str(out), "--report", str(report)), check=True, timeout=300)
        rep = json.loads(report.read_text())["outputs"][0]
        assert rep["status"] == "done" and rep["rows_resumed"] > 0
        assert rep["chips_computed"] < rep["chips"]  # the finished strips were not computed again
    assert (out / "big.classes.tif").read_bytes() == (tmp_path / "ref" / "big.classes.tif").read_bytes()
    assert not (out / STAGING).exists()
    # and the same command once more: the scene is finished, nothing is computed
    res = CliRunner().invoke(main, ["-q", "predict", *args, "-o", str(out)])
    assert res.exit_code == 0 and json.loads((out / MANIFEST).read_text())["scenes"]["big"]["files"]


def test_object_storage_in_and_out(tmp_path, unet, real_data, s3_env):
    import fsspec

    src = real_data / "landsat_rgb" / "RGB.byte.tif"
    fs = fsspec.filesystem("s3", endpoint_url=s3_env.endpoint)
    fs.put(str(src), f"{s3_env.bucket}/scenes/RGB.byte.tif")
    predict_scenes([src], unet, tmp_path / "local", tile_size=256, overlap=32)
    fs.put(str(unet), f"{s3_env.bucket}/models/unet", recursive=True)  # workers rarely share a disk
    model_url = s3_env.url("models/unet")
    remote = predict_scenes([s3_env.url("scenes/RGB.byte.tif")], model_url, s3_env.url("maps"), tile_size=256,
                            overlap=32)
    assert remote.scenes[0].status == "done" and str(remote.scenes[0].classes_path).startswith("s3://")
    assert remote.scenes[0].status == "done"
    # a worker fetches the bundle from the URL the job names, and checks it is the job's model
    from geoseg.model.bundle import bundle_digest, read_bundle
    from geoseg.predict.engine import worker_runtime
    from geoseg.predict.units import ModelRef, PredictOptions

    ref = ModelRef(model_url, bundle_digest(read_bundle(model_url).files))
    assert worker_runtime(ref, PredictOptions(device="cpu")).contract == read_bundle(unet).contract
    names = sorted(Path(p).name for p in fs.ls(f"{s3_env.bucket}/maps"))
    assert names == ["RGB.byte.classes.qml", "RGB.byte.classes.tif", "RGB.byte.classes.tif.aux.xml", "RGB.byte.gpkg",
                     "RGB.byte.quicklook.png", "RGB.byte.stac.json", MANIFEST]  # no staging left
    got = tmp_path / "got.tif"
    fs.get(f"{s3_env.bucket}/maps/RGB.byte.classes.tif", str(got))
    assert got.read_bytes() == (tmp_path / "local" / "RGB.byte.classes.tif").read_bytes()
    # the same call again resumes from the manifest in the bucket: skipped
    again = predict_scenes([s3_env.url("scenes/RGB.byte.tif")], model_url, s3_env.url("maps"), tile_size=256,
                           overlap=32)
    assert again.scenes[0].status == "skipped"


def test_no_credentials_is_one_line_and_creates_no_local_folder(tmp_path, unet, scenes, s3_env, monkeypatch):
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    empty = tmp_path / "empty"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["predict", scenes[0], "-m", str(unet), "-o", "s3://results/job1/"])
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "s3://results" in lines[0] and "AWS_ACCESS_KEY_ID" in lines[0]
    assert not (tmp_path / "s3:").exists()


def test_a_corrupt_scene_fails_alone(tmp_path, unet, scenes):
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"II*\x00" + os.urandom(3000))
    truncated = tmp_path / "truncated.tif"
    big = write_raster(tmp_path / "whole.tif", np.random.default_rng(9).normal(size=(3, 400, 400)).astype(np.float32))
    truncated.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    report = tmp_path / "run.json"
    res = CliRunner().invoke(main, ["predict", scenes[0], str(garbage), str(truncated), scenes[1], "-m", str(unet),
                                    "-o", str(tmp_path / "out"), "--no-vector", "--report", str(report)])
    assert res.exit_code == 3, res.output
    rep = json.loads(report.read_text())
    status = {Path(o["scene"]).name: (o["status"], o["error"]) for o in rep["outputs"]}
    assert status["s0.tif"] == ("done", None) and status["s1.tif"] == ("done", None)
    assert status["garbage.tif"][0] == "failed" and "garbage.tif" in status["garbage.tif"][1]
    assert status["truncated.tif"][0] == "failed" and status["truncated.tif"][1]
    assert rep["status"] == "partial"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tif")) == ["s0.classes.tif", "s1.classes.tif"]
    assert not (tmp_path / "out" / STAGING).exists()


def test_job_file_runs_the_same_job(tmp_path, unet, scenes):
    folder = tmp_path / "scenes"
    folder.mkdir()
    for s in scenes[:2]:
        shutil.copy(s, folder)
    job = tmp_path / "job.yaml"
    job.write_text(f"scenes: ['scenes/*.tif']\nmodel: {unet}\noutput_dir: maps\nname: test-job\n"
                   "options:\n  vector_format: null\n  probabilities: true\n")
    res = CliRunner().invoke(main, ["-q", "predict", "--job", str(job), "--probabilities-dtype", "float32"])
    assert res.exit_code == 0, res.output
    maps = tmp_path / "maps"
    assert sorted(p.name for p in maps.iterdir()) == [
        MANIFEST, *(f"{s}.{kind}" for s in ("s0", "s1") for kind in (
            "classes.qml", "classes.tif", "classes.tif.aux.xml", "probs.tif", "quicklook.png", "stac.json")),
        "test-job.vrt"]
    with rasterio.open(maps / "s0.probs.tif") as ds:
        assert ds.dtypes[0] == "float32"  # the command line overrides the job file


def test_cli_reaches_a_cluster_by_address_and_by_dask_env(tmp_path, unet, scenes, cluster, monkeypatch):
    address = cluster.scheduler.address
    report = tmp_path / "run.json"
    res = CliRunner().invoke(main, ["-q", "predict", *scenes[:2], "-m", str(unet), "-o", str(tmp_path / "a"),
                                    "--scheduler", address, "--no-vector", "--report", str(report)])
    assert res.exit_code == 0, res.output
    rep = json.loads(report.read_text())
    assert rep["settings"]["scheduler"] == "distributed" and rep["workers"] == 2
    assert rep["settings"]["vector_format"] is None and rep["settings"]["workers"] >= 1
    assert set(rep["files"]) >= {str(tmp_path / "a" / n) for n in ("s0.classes.tif", "s1.classes.tif", "mosaic.vrt")}
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", address)
    res = CliRunner().invoke(main, ["-q", "predict", scenes[0], "-m", str(unet), "-o", str(tmp_path / "b"),
                                    "--report", str(report)])
    assert res.exit_code == 0, res.output
    rep = json.loads(report.read_text())
    assert rep["settings"]["scheduler"] == "distributed" and rep["outputs"][0]["vector"].endswith("s0.gpkg")
    res = CliRunner().invoke(main, ["predict", scenes[0], "-m", str(unet), "--scheduler", "nowhere:1"])
    assert res.exit_code == 1 and "tcp://host:8786" in res.output


def test_a_cog_over_http_is_read_by_range_requests(tmp_path, unet, real_data, http_folder):
    folder, base = http_folder
    src = real_data / "aerial_cog" / "cogeo.tif"
    shutil.copy(src, folder / "cogeo.tif")
    local = predict_scenes([src], unet, tmp_path / "local", vector_format=None)
    remote = predict_scenes([f"{base}/cogeo.tif"], unet, tmp_path / "http", vector_format=None)
    assert Path(remote.scenes[0].classes_path).read_bytes() == Path(local.scenes[0].classes_path).read_bytes()
