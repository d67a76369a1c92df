"""Class maps for the assessment tests: small georeferenced rasters of class ids with their class names."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from tests.conftest import write_raster


def write_class_map(path: Path, data: np.ndarray, names: Mapping[int, str] | None = None, *, nodata: int | None = 255,
                    **profile: Any) -> Path:
    """A one-band class map with geoseg's ``CLASSES`` tag (when ``names`` is given)."""
    write_raster(path, data, nodata=nodata, **profile)
    if names is not None:
        with rasterio.open(path, "r+") as ds:
            ds.update_tags(CLASSES=json.dumps([{"id": i, "name": n, "color": [0, 0, 0]} for i, n in names.items()]))
    return path


@pytest.fixture
def class_map(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``class_map(data, names, name="map.tif", **profile)`` writes into ``tmp_path``."""

    def make(data: np.ndarray, names: Mapping[int, str] | None = None, name: str = "map.tif", **kwargs: Any) -> Path:
        return write_class_map(tmp_path / name, data, names, **kwargs)

    return make


def random_map(shape: tuple[int, int] = (157, 211), classes: int = 4, seed: int = 0, nodata_corner: int = 30
               ) -> np.ndarray:
    """Patchy classes (uneven shares) with a nodata (255) corner."""
    rng = np.random.default_rng(seed)
    coarse = rng.choice(classes, size=(shape[0] // 8 + 1, shape[1] // 8 + 1), p=np.linspace(1, 3, classes) / np.linspace(1, 3, classes).sum())
    data = np.kron(coarse, np.ones((8, 8), dtype=np.int64))[: shape[0], : shape[1]].astype(np.uint8) + 1
    data[:nodata_corner, :nodata_corner] = 255
    return data
