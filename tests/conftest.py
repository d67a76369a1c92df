"""Shared fixtures: tiny georeferenced rasters written to a temporary folder, and the real data folder."""

from __future__ import annotations

import os
from collections.abc import Callable
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
