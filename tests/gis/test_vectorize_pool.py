"""Tests of geoseg/vectorize/pool.py: worker processes give the very polygons of one process, and go away."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import shapely

from geoseg.errors import InputError, WorkerError
from geoseg.gis.vectorize import FORMATS, polygonize, pool, vectorize_raster
from geoseg.gis.vectorize.plan import make_plan
from tests.gis.test_vectorize import blobs


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Worker processes even for these small rasters; lists the size of each process pool started."""
    monkeypatch.setattr(pool, "PROCESS_MIN_PIXELS", 0)
    sizes: list[int] = []
    start = pool._process_pool

    def spy(workers: int) -> object:
        sizes.append(workers)
        return start(workers)

    monkeypatch.setattr(pool, "_process_pool", spy)
    return sizes


def workers_alive() -> list[int]:
    """This process's ``spawn`` children (multiprocessing's resource tracker is not one)."""
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def assert_identical(a: gpd.GeoDataFrame, b: gpd.GeoDataFrame) -> None:
    """Same rows in the same order, same attribute values and the same geometries, vertex for vertex."""
    assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
    for col in ("class_id", "class_name", "area_m2", "perim_m"):
        assert a[col].tolist() == b[col].tolist(), col
    assert (shapely.to_wkb(a.geometry.values) == shapely.to_wkb(b.geometry.values)).all()
    assert a.crs == b.crs


@pytest.mark.parametrize(("connectivity", "options"), [
    (4, {}),
    (8, {"to_crs": "EPSG:3035", "min_area": "3px"}),
    (4, {"simplify": "2m"}),  # pieces come back from the workers as geometries, held for the coverage
])
def test_worker_processes_give_the_same_polygons(make_raster: Callable[..., Path], started: list[int],
                                                 connectivity: int, options: dict[str, str]) -> None:
    data = blobs((300, 260), classes=4)
    data[:7, :9] = 255  # a nodata corner
    src = make_raster(data, nodata=255)
    serial = polygonize(src, block_size=64, connectivity=connectivity, workers=1, **options)
    assert started == []
    parallel = polygonize(src, block_size=64, connectivity=connectivity, workers=2, **options)
    assert started == [2]
    assert_identical(parallel, serial)
    assert workers_alive() == []


def test_worker_processes_write_the_same_file(make_raster: Callable[..., Path], tmp_path: Path,
                                              started: list[int]) -> None:
    src = make_raster(blobs((200, 230), classes=5))
    one = vectorize_raster(src, tmp_path / "one.parquet", block_size=50, workers=1)
    two = vectorize_raster(src, tmp_path / "two.parquet", block_size=50, workers=2)
    assert started == [2]
    assert pq.read_table(two.path).equals(pq.read_table(one.path))
    assert (two.features, two.class_counts, two.class_areas_m2) == (one.features, one.class_counts,
                                                                     one.class_areas_m2)


def test_failing_write_stops_the_workers(make_raster: Callable[..., Path], tmp_path: Path,
                                         started: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FORMATS, "shp", FORMATS["shp"].__class__(
        **{**FORMATS["shp"].__dict__, "size_limit": 1000}))
    with pytest.raises(InputError, match="2 GB"):
        vectorize_raster(make_raster(blobs((200, 200))), tmp_path / "big.shp", block_size=20, workers=2)
    assert started == [2]
    assert workers_alive() == []  # gone as the error leaves vectorize_raster, not when it is collected


def test_dead_worker_is_a_clear_error(make_raster: Callable[..., Path], started: list[int]) -> None:
    src = make_raster(blobs((40, 40)))
    plan = make_plan(src, connectivity=4, min_area=None, simplify=None, skip_classes=(), class_names=None,
                     to_crs=None, block_size=16)
    with pytest.raises(WorkerError, match=r"scene\.tif: a vectorisation worker process died.*workers=1"), \
            pool.block_executor(plan, 2) as ex:
        ex.result(ex.submit(os._exit, 3))
    assert workers_alive() == []


def test_threads_where_processes_do_not_pay(make_raster: Callable[..., Path], started: list[int],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_raster(blobs((64, 64)))
    polygonize(src, block_size=16, workers=1)  # one worker
    polygonize(src, block_size=64, workers=2)  # one block
    with monkeypatch.context() as m:  # a daemonic process may not have children: e.g. a dask worker
        m.setattr(multiprocessing.current_process(), "daemon", True)
        polygonize(src, block_size=16, workers=2)
    assert not multiprocessing.current_process().daemon
    monkeypatch.setattr(pool, "PROCESS_MIN_PIXELS", 65 * 64)  # a small raster
    polygonize(src, block_size=16, workers=2)
    assert started == []
    monkeypatch.setattr(pool, "PROCESS_MIN_PIXELS", 64 * 64)  # the control: big enough
    polygonize(src, block_size=16, workers=2)
    assert started == [2]


def test_calls_at_once_share_the_worker_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool, "_free", 5)
    with pool._reserve(3) as first, pool._reserve(3) as second, pool._reserve(3) as third:
        assert (first, second, third) == (3, 2, 0)  # none left: threads
    with pool._reserve(4) as first, pool._reserve(4) as second:
        assert (first, second) == (4, 0)  # one process would not pay: threads
    assert pool._free == 5


def test_block_pickles_compactly(make_raster: Callable[..., Path]) -> None:
    import pickle

    from geoseg.gis.vectorize.blocks import process_block

    for simplify in (None, "2m"):
        plan = make_plan(make_raster(blobs((64, 64))), connectivity=4, min_area=None, simplify=simplify,
                         skip_classes=(), class_names=None, to_crs=None, block_size=32)
        blk = process_block(plan, 0, 0)
        back = pickle.loads(pickle.dumps(blk))
        assert len(blk.open_geoms) and shapely.equals(back.open_geoms, blk.open_geoms).all()
        if simplify is None:
            assert np.array_equal(back.closed.wkb, blk.closed.wkb)
        else:
            assert shapely.equals(back.closed[0], blk.closed[0]).all()
