"""Tests of geoseg.io.store against a local folder and a real S3-compatible server on loopback (moto)."""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import rasterio

from geoseg.errors import InputError, StorageError
from geoseg.io.store import (
    Store,
    gdal_path,
    gdal_remote_options,
    is_remote,
    local_workdir,
    s3_storage_options,
)
from tests.conftest import S3Bucket, write_raster


class Boom(RuntimeError):
    """Raised inside a staging block to simulate a failed build."""


@pytest.fixture
def scratch_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point :func:`tempfile.gettempdir` at an empty folder so leftovers can be seen."""
    folder = tmp_path / "systmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, scratch_tmp: Path) -> Store:
    """The same store contract, on a local folder and on a bucket prefix."""
    if request.param == "local":
        return Store(tmp_path / "out")
    bucket: S3Bucket = request.getfixturevalue("s3_env")
    return Store(bucket.url("results/job1/"))


def _leftovers(store: Store, scratch: Path) -> list[str]:
    """Staging debris: hidden temp entries beside local outputs, or anything in the temp dir."""
    found = [p.name for p in scratch.iterdir()]
    if not store.remote and os.path.isdir(store.location):
        for _root, dirs, files in os.walk(store.location):
            found += [n for n in dirs + files if ".tmp-" in n or ".old-" in n]
    return found


# -- pure helpers -----------------------------------------------------------------------------------


def test_is_remote() -> None:
    assert is_remote("s3://b/k") and is_remote("gs://b") and is_remote("https://x/y.tif")
    assert not is_remote("out/dir") and not is_remote(Path("/tmp/x")) and not is_remote("file:///tmp/x")
    assert not is_remote("C:\\data\\x.tif")


def test_gdal_path() -> None:
    assert gdal_path("s3://b/k/x.tif") == "/vsis3/b/k/x.tif"
    assert gdal_path("gs://b/x.tif") == "/vsigs/b/x.tif"
    assert gdal_path("az://c/x.tif") == "/vsiaz/c/x.tif"
    assert gdal_path("https://h/x.tif") == "/vsicurl/https://h/x.tif"
    assert gdal_path(Path("rel/x.tif")) == "rel/x.tif"
    assert gdal_path("file:///tmp/x.tif") == "/tmp/x.tif"
    with pytest.raises(InputError, match="ftp://"):
        gdal_path("ftp://h/x.tif")


def test_gdal_remote_options(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_S3_ENDPOINT",
        "AWS_HTTPS",
        "AWS_VIRTUAL_HOSTING",
    ):
        monkeypatch.delenv(name, raising=False)
    assert gdal_remote_options() == {}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:5000")
    assert gdal_remote_options() == {
        "AWS_S3_ENDPOINT": "127.0.0.1:5000",
        "AWS_HTTPS": "NO",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://minio.example:9000/")
    monkeypatch.setenv("AWS_VIRTUAL_HOSTING", "TRUE")  # the user's own setting wins
    assert gdal_remote_options() == {"AWS_S3_ENDPOINT": "minio.example:9000", "AWS_HTTPS": "YES"}
    monkeypatch.setenv("AWS_S3_ENDPOINT", "elsewhere:1234")
    assert gdal_remote_options() == {}


def test_s3_storage_options(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_S3_ENDPOINT",
        "AWS_HTTPS",
        "AWS_NO_SIGN_REQUEST",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    ):
        monkeypatch.delenv(name, raising=False)
    assert s3_storage_options() == {}
    monkeypatch.setenv("AWS_S3_ENDPOINT", "127.0.0.1:9000")
    monkeypatch.setenv("AWS_HTTPS", "NO")
    monkeypatch.setenv("AWS_NO_SIGN_REQUEST", "YES")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert s3_storage_options() == {
        "endpoint_url": "http://127.0.0.1:9000",
        "anon": True,
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://localhost:5000")
    monkeypatch.setenv("AWS_REGION", "us-west-2")
    opts = s3_storage_options()
    assert opts["endpoint_url"] == "http://localhost:5000"
    assert opts["client_kwargs"] == {"region_name": "us-west-2"}


def test_location_normalised_and_nothing_created(tmp_path: Path) -> None:
    assert Store("s3://bucket/results/job1/").location == "s3://bucket/results/job1"
    assert Store("s3://bucket/results/job1/").url("a/b.tif") == "s3://bucket/results/job1/a/b.tif"
    assert Store("s3://bucket").url() == "s3://bucket"
    local = Store(f"{tmp_path}/never/")
    assert local.location == str(tmp_path / "never") and not local.remote
    assert local.url("a/b.tif") == str(tmp_path / "never" / "a" / "b.tif")
    assert not (tmp_path / "never").exists()
    assert Store(f"file://{tmp_path}").location == str(tmp_path)
    with pytest.raises(InputError, match=r"\.\."):
        local.url("../escape.txt")
    with pytest.raises(InputError, match="no bucket"):
        Store("s3://")


# -- the store contract, local and remote -------------------------------------------------------------


def test_round_trip(store: Store, tmp_path: Path, scratch_tmp: Path) -> None:
    store.prepare()
    assert store.list() == [] and store.read_text("missing.json") is None and not store.exists("missing.json")

    assert store.write_text("meta/info.json", '{"a": 1}') == store.url("meta/info.json")
    assert store.read_text("meta/info.json") == '{"a": 1}'
    store.write_text("meta/info.json", "second")
    assert store.read_text("meta/info.json") == "second"

    src = tmp_path / "built.tif"
    src.write_bytes(b"\x00\x01tiff" * 1000)
    assert store.publish(src, "tiles/a.tif") == store.url("tiles/a.tif")
    assert not src.exists()  # consumed
    assert store.exists("tiles/a.tif") and store.exists("tiles")
    store.write_text("tiles/ab.txt", "neighbour")
    assert store.list() == ["meta", "tiles"]
    assert store.list("tiles") == ["a.tif", "ab.txt"]
    assert store.list("tiles/a.tif") == [] and store.list("nowhere") == []

    got = store.fetch("tiles/a.tif", tmp_path / "back" / "a.tif")
    assert got == tmp_path / "back" / "a.tif" and got.read_bytes() == b"\x00\x01tiff" * 1000
    with pytest.raises(StorageError, match="cannot read"):
        store.fetch("tiles/none.tif", tmp_path / "none.tif")
    assert not (tmp_path / "none.tif").exists()

    store.remove("tiles/a.tif")
    assert store.list("tiles") == ["ab.txt"]
    store.write_text("tiles/a/deep/x.txt", "x")
    store.remove("tiles/a")  # a folder, recursive; the sibling 'ab.txt' stays
    assert store.list("tiles") == ["ab.txt"]
    store.remove("tiles/absent")
    store.remove("meta")
    assert store.list() == ["tiles"]
    assert _leftovers(store, scratch_tmp) == []


def test_staged_file(store: Store, scratch_tmp: Path) -> None:
    with store.staged_file("maps/class.tif") as path:
        assert path.name == "class.tif" and not path.exists()
        assert not is_remote(path) and "s3:" not in str(path)
        if not store.remote:  # built beside the final file, under a hidden name
            assert path.parent.parent == Path(store.url("maps")) and path.parent.name.startswith(
                ".class.tif.tmp-"
            )
        path.write_bytes(b"first")
        path.with_name("class.tif.aux.xml").write_text("sidecar")  # discarded
        assert not store.exists("maps/class.tif")
    assert store.list("maps") == ["class.tif"]
    assert store.fetch("maps/class.tif", scratch_tmp.parent / "f.tif").read_bytes() == b"first"
    assert _leftovers(store, scratch_tmp) == []


def test_staged_file_failure_leaves_nothing(store: Store, scratch_tmp: Path) -> None:
    with pytest.raises(Boom), store.staged_file("maps/new.tif") as path:
        path.write_bytes(b"partial")
        raise Boom
    assert not store.exists("maps/new.tif") and store.list("maps") == []
    assert _leftovers(store, scratch_tmp) == []

    store.write_text("maps/old.txt", "old")
    with pytest.raises(Boom), store.staged_file("maps/old.txt") as path:
        path.write_text("half")
        raise Boom
    assert store.read_text("maps/old.txt") == "old" and store.list("maps") == ["old.txt"]
    assert _leftovers(store, scratch_tmp) == []

    with pytest.raises(StorageError, match="nothing was written"), store.staged_file("maps/empty.tif"):
        pass
    assert not store.exists("maps/empty.tif") and _leftovers(store, scratch_tmp) == []


def test_staged_dir(store: Store, scratch_tmp: Path) -> None:
    store.write_text("bundle/stale.txt", "stale")
    store.write_text("bundle/keep/old.txt", "old")
    store.write_text("bundle2.txt", "neighbour")
    with store.staged_dir("bundle") as folder:
        assert folder.is_dir() and list(folder.iterdir()) == []
        (folder / "model.json").write_text("{}")
        (folder / "weights").mkdir()
        (folder / "weights" / "w.bin").write_bytes(b"w")
    assert store.list("bundle") == ["model.json", "weights"]
    assert store.list("weights") == [] and store.list("bundle/weights") == ["w.bin"]
    assert store.read_text("bundle2.txt") == "neighbour"
    if not store.remote:  # a published folder gets the usual permissions, not mkdtemp's 0700
        assert os.stat(store.url("bundle")).st_mode & 0o077 == 0o777 & ~_umask() & 0o077

    with pytest.raises(Boom), store.staged_dir("bundle") as folder:
        (folder / "model.json").write_text("broken")
        raise Boom
    assert store.read_text("bundle/model.json") == "{}"
    assert store.list() == ["bundle", "bundle2.txt"]
    assert _leftovers(store, scratch_tmp) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_local_workdir(tmp_path: Path, scratch_tmp: Path) -> None:
    local = Store(tmp_path / "out")
    work = local_workdir(local, "predict")
    assert work == tmp_path / "out" / ".geoseg-work-predict" and work.is_dir()
    (work / "x").write_text("x")
    assert local.list() == []  # scratch is not an output
    remote = local_workdir(Store("s3://bucket/a"), "predict")
    assert remote.parent == scratch_tmp and remote.is_dir() and remote.name.startswith("geoseg-work-predict-")
    assert local_workdir(Store("s3://bucket/b"), "predict") != remote


def test_local_publish_across_filesystems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "out")
    src = tmp_path / "elsewhere.bin"
    src.write_bytes(b"payload")
    real_replace = os.replace

    def replace(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> None:
        if Path(a) == src:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    store.publish(src, "x/final.bin")
    assert (tmp_path / "out" / "x" / "final.bin").read_bytes() == b"payload" and not src.exists()
    assert os.listdir(tmp_path / "out" / "x") == ["final.bin"]


def test_store_pickles(store: Store) -> None:
    store.write_text("a.txt", "a")
    again = pickle.loads(pickle.dumps(store))
    assert again == store and again.read_text("a.txt") == "a"


# -- remote specifics -----------------------------------------------------------------------------------


def test_no_local_s3_folder(
    s3_env: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scratch_tmp: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    store = Store(s3_env.url("results/job1/"))
    store.prepare()
    store.write_text("a.txt", "a")
    with store.staged_file("b/c.tif") as path:
        path.write_bytes(b"c")
    with store.staged_dir("d") as folder:
        (folder / "e.txt").write_text("e")
    local_workdir(store, "job1")
    assert store.list() == ["a.txt", "b", "d"]
    assert sorted(os.listdir(tmp_path)) == ["systmp"]
    assert not any("s3:" in str(p) for p in tmp_path.rglob("*"))


def test_listing_sees_other_writers(s3_env: S3Bucket) -> None:
    first, second = Store(s3_env.url("shared")), Store(s3_env.url("shared"))
    assert first.list() == [] and not first.exists("x.txt")
    second.write_text("x.txt", "x")
    assert first.list() == ["x.txt"] and first.exists("x.txt")
    second.remove("x.txt")
    assert first.list() == [] and not first.exists("x.txt")


def test_no_credentials(s3_env: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.write_text("")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    store = Store(s3_env.url("job"))
    src = tmp_path / "f.txt"
    src.write_text("f")
    calls = {
        "list": store.prepare,
        "write": lambda: store.publish(src, "f.txt"),
        "read": lambda: store.read_text("f.txt"),
    }
    for action, call in calls.items():
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{s3_env.url('job')}")
        assert f"cannot {action} (no credentials found)" in message and "AWS_ACCESS_KEY_ID" in message
    assert src.exists()  # a failed upload does not consume the file


def test_missing_bucket(s3_env: S3Bucket) -> None:
    store = Store(f"s3://{s3_env.bucket}-absent/job")
    with pytest.raises(StorageError, match=r"-absent/job: cannot list \(the bucket does not exist\); check"):
        store.prepare()
    with pytest.raises(StorageError, match="cannot write"):
        store.write_text("a.txt", "a")
    with pytest.raises(StorageError, match="bucket does not exist"):
        store.list()


def test_rasterio_reads_through_gdal_path(s3_env: S3Bucket, tmp_path: Path) -> None:
    data = (np.arange(3 * 40 * 50, dtype=np.uint16) % 997).reshape(3, 40, 50)
    local = write_raster(tmp_path / "scene.tif", data)
    with rasterio.open(local) as src:
        expected, crs, transform = src.read(), src.crs, src.transform
    store = Store(s3_env.url("scenes"))
    with store.staged_file("scene.tif") as path:
        path.write_bytes(local.read_bytes())
    with rasterio.Env(**gdal_remote_options()), rasterio.open(gdal_path(store.url("scene.tif"))) as src:
        assert src.crs == crs and src.transform == transform
        np.testing.assert_array_equal(src.read(), expected)
