"""Shared fixtures: tiny georeferenced rasters written to a temporary folder, and the real data folder."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

REAL_DATA = Path(os.environ.get("GEOSEG_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The folder of small real rasters (``GEOSEG_REAL_DATA``, default ``../shared/data``)."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder {REAL_DATA} is absent; set GEOSEG_REAL_DATA to it")
    return REAL_DATA


def write_raster(path: Path, data: np.ndarray, *, crs: str = "EPSG:32633",
                 transform: Any = None, nodata: float | None = None, **profile: Any) -> Path:
    """Write ``data`` ``(bands, rows, cols)`` as a GeoTIFF with a real CRS and a non-identity transform."""
    if data.ndim == 2:
        data = data[None]
    count, height, width = data.shape
    if transform is None:
        transform = from_origin(500_000.0, 5_100_000.0, 2.0, 2.0)
    prof: dict[str, Any] = dict(driver="GTiff", width=width, height=height, count=count, dtype=data.dtype.name,
                                crs=crs, transform=transform, nodata=nodata)
    prof.update(profile)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)
    return path


@pytest.fixture
def make_raster(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_raster(data, name="scene.tif", **profile)`` writes into ``tmp_path``."""

    def make(data: np.ndarray, name: str = "scene.tif", **kwargs: Any) -> Path:
        return write_raster(tmp_path / name, data, **kwargs)

    return make


def make_bundle(path: Path, n_bands: int = 3, n_classes: int | None = None, *, chip: int = 64, overlap: int = 16,
                architecture: str = "conv1x1", identity: bool = True, seed: int = 0, **contract: Any) -> Path:
    """Write a tiny model bundle. ``conv1x1`` with ``identity`` maps input band k to logit k exactly."""
    import torch

    from geoseg.model.bundle import save_bundle
    from geoseg.model.contract import ArchSpec, ClassInfo, Contract, InputSpec
    from geoseg.model.networks import build_network

    n_classes = n_classes or n_bands
    params: dict[str, Any] = {}
    encoder = None
    if architecture != "conv1x1":
        encoder = "resnet18"
        params = {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}
    fields: dict[str, Any] = dict(
        name="tiny", model=ArchSpec(architecture=architecture, encoder=encoder, params=params),
        input=InputSpec(bands=[f"b{i + 1}" for i in range(n_bands)], mean=[0.0] * n_bands, std=[1.0] * n_bands),
        classes=[ClassInfo(id=i + 1, name=f"class {i + 1}", color=(40 * i % 256, 90, 200)) for i in range(n_classes)],
        chip_size=chip, overlap=overlap,
    )
    fields.update(contract)
    c = Contract(**fields)
    torch.manual_seed(seed)
    net = build_network(c)
    if architecture == "conv1x1" and identity:
        with torch.no_grad():
            net.weight.zero_()
            net.bias.zero_()
            for i in range(min(n_bands, n_classes)):
                net.weight[i, i] = 1.0
    net.eval()
    save_bundle(path, c, net, overwrite=True)
    return path


@pytest.fixture
def bundle_factory(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``bundle_factory(name="model", **make_bundle kwargs)`` writes a bundle into ``tmp_path``."""

    def make(name: str = "model", **kwargs: Any) -> Path:
        return make_bundle(tmp_path / name, **kwargs)

    return make


class S3Bucket:
    """A fresh bucket on the loopback S3 server: ``.bucket``, ``.endpoint`` and ``.url(key)``."""

    def __init__(self, bucket: str, endpoint: str) -> None:
        self.bucket = bucket
        self.endpoint = endpoint

    def url(self, key: str = "") -> str:
        """``s3://bucket/key``."""
        return f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3-compatible server (moto's server mode) on 127.0.0.1; yields its ``http://`` endpoint."""
    import logging

    try:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
    except Exception as exc:  # missing extras (flask) or no loopback socket
        pytest.skip(f"moto's S3 server cannot start ({type(exc).__name__}: {exc}); pip install 'moto[server]>=5'")
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """Point the AWS environment at ``s3_server`` with test credentials and create a fresh bucket."""
    import uuid

    import boto3

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_S3_ENDPOINT", "AWS_HTTPS",
                 "AWS_VIRTUAL_HOSTING", "AWS_NO_SIGN_REQUEST", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = f"geoseg-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return S3Bucket(bucket, s3_server)


@pytest.fixture
def http_folder(tmp_path: Path) -> Any:
    """A folder served over HTTP on loopback with range requests (what GDAL's /vsicurl/ needs).

    The server is another process: GDAL may hold the GIL while it waits for the answer. Yields
    ``(folder, base_url)``; the server stops with the test.
    """
    import subprocess
    import sys

    folder = tmp_path / "www"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_http_range.py")), str(folder)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield folder, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
