"""Tests of geoseg/vectorize/: block-wise polygons equal one whole-raster polygonisation, formats, filters."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import rasterio.features
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from rasterio.transform import from_origin
from scipy import ndimage

from geoseg.errors import InputError, OutputExistsError, UnknownNameError
from geoseg.gis.vectorize import (
    FORMATS,
    Quantity,
    format_for,
    get_format,
    parse_min_area,
    parse_simplify,
    polygonize,
    vectorize_raster,
)
from geoseg.gis.vectorize.stitch import stitch
from geoseg.io.raster import inspect_scene

TRANSFORM = from_origin(500_000.0, 5_100_000.0, 2.0, 2.0)


def blobs(shape: tuple[int, int], classes: int = 5, sigma: float = 4.0, seed: int = 0) -> np.ndarray:
    """A smoothed random field quantised into ``classes`` land-cover-like blobs (uint8)."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    edges = np.quantile(field, np.linspace(0, 1, classes + 1)[1:-1])
    return np.digitize(field, edges).astype(np.uint8)


def whole(data: np.ndarray, *, connectivity: int = 4, mask: np.ndarray | None = None,
          transform: Any = TRANSFORM) -> list[tuple[Any, int]]:
    """The oracle: one rasterio.features.shapes call over the whole raster, made valid."""
    out = []
    for geom, value in rasterio.features.shapes(data, mask=mask, connectivity=connectivity, transform=transform):
        out.append((shapely.make_valid(shapely.geometry.shape(geom)), int(value)))
    return out


def assert_same_polygons(gdf: gpd.GeoDataFrame, ref: list[tuple[Any, int]]) -> None:
    """Same count, same area per class, and every polygon geometrically equal to one of the oracle's."""
    assert len(gdf) == len(ref)
    areas: dict[int, float] = defaultdict(float)
    for g, v in ref:
        areas[v] += g.area
    got = gdf.geometry.area.groupby(gdf["class_id"]).sum().to_dict()
    assert got.keys() == areas.keys()
    for k, a in areas.items():
        assert got[k] == pytest.approx(a, rel=1e-12)
    ref_geoms = np.array([g for g, _ in ref], dtype=object)
    ref_cls = np.array([v for _, v in ref])
    tree = shapely.STRtree(ref_geoms)
    used = set()
    for geom, cls in zip(gdf.geometry.values, gdf["class_id"], strict=True):
        hits = [i for i in tree.query(geom, predicate="intersects")
                if ref_cls[i] == cls and i not in used and shapely.equals(geom, ref_geoms[i])]
        assert hits, f"no oracle polygon equals {geom.wkt[:120]}"
        used.add(hits[0])
    assert shapely.is_valid(gdf.geometry.values).all()


# ------------------------------------------------------------------------------- seam-free blocks


@pytest.mark.parametrize("connectivity", [4, 8])
def test_blocks_equal_whole_raster(make_raster: Callable[..., Path], connectivity: int) -> None:
    data = blobs((300, 300))
    data[:7, :9] = 255  # a nodata corner
    src = make_raster(data, nodata=255)
    gdf = polygonize(src, block_size=64, connectivity=connectivity, workers=2)
    assert gdf.crs == "EPSG:32633"
    assert_same_polygons(gdf, whole(data, connectivity=connectivity, mask=data != 255))
    assert 255 not in set(gdf["class_id"])
    if connectivity == 8:
        assert set(gdf.geom_type) == {"MultiPolygon"}
    else:
        assert set(gdf.geom_type) == {"Polygon"}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40)), elements=st.integers(0, 3)),
    block=st.sampled_from([4, 5, 8, 16]),
    connectivity=st.sampled_from([4, 8]),
    smooth=st.booleans(),
)
def test_random_rasters_equal_whole(make_raster: Callable[..., Path], data: np.ndarray, block: int,
                                    connectivity: int, smooth: bool) -> None:
    if smooth:  # bigger regions that cross several seams
        data = (ndimage.uniform_filter(data.astype(float), 3) > 1.5).astype(np.uint8) + (data == 3)
    src = make_raster(data, nodata=3)
    gdf = polygonize(src, block_size=block, connectivity=connectivity, workers=2)
    assert_same_polygons(gdf, whole(data, connectivity=connectivity, mask=data != 3))


def test_holes_kept_across_seams(make_raster: Callable[..., Path]) -> None:
    data = np.zeros((100, 100), np.uint8)
    data[20:80, 20:80] = 1
    data[40:60, 40:60] = 2  # the island straddles the seams at 50
    gdf = polygonize(make_raster(data), block_size=50)
    ring = gdf[gdf.class_id == 1].geometry.iloc[0]
    assert len(ring.interiors) == 1
    assert ring.area == pytest.approx((60 * 60 - 20 * 20) * 4.0)
    outer = gdf[gdf.class_id == 0].geometry.iloc[0]
    assert len(outer.interiors) == 1 and len(gdf) == 3


def test_diagonal_join_across_block_corner(make_raster: Callable[..., Path]) -> None:
    data = np.zeros((8, 8), np.uint8)
    data[3, 3] = data[4, 4] = 1  # touch only at the corner shared by four 4x4 blocks
    data[3, 4] = data[4, 3] = 2
    g8 = polygonize(make_raster(data), block_size=4, connectivity=8, skip_classes=[0])
    g4 = polygonize(make_raster(data, name="b.tif"), block_size=4, connectivity=4, skip_classes=[0])
    assert sorted(g8.class_id) == [1, 2] and len(g4) == 4


def test_skip_classes_and_nodata(make_raster: Callable[..., Path]) -> None:
    data = blobs((64, 64), classes=3)
    data[:10] = 9
    gdf = polygonize(make_raster(data, nodata=9), block_size=16, skip_classes=[0])
    assert set(gdf.class_id) == {1, 2}
    expected = np.isin(data, [1, 2]).sum() * 4.0
    assert gdf.area_m2.sum() == pytest.approx(expected)


def test_class_names_from_tags_and_argument(make_raster: Callable[..., Path]) -> None:
    data = np.array([[1, 1, 2], [1, 2, 2]], np.uint8)
    src = make_raster(data)
    with rasterio.open(src, "r+") as ds:
        ds.update_tags(CLASS_1="forest", CLASSES=json.dumps([{"id": 2, "name": "water", "color": [0, 0, 255]}]))
    gdf = polygonize(src)
    assert dict(zip(gdf.class_id, gdf.class_name, strict=True)) == {1: "forest", 2: "water"}
    gdf = polygonize(src, class_names={1: "wald"})
    assert set(gdf[gdf.class_id == 1].class_name) == {"wald"}
    assert gdf[gdf.class_id == 2].class_name.isna().all()  # no name: null


def test_progress_reports_every_block(make_raster: Callable[..., Path]) -> None:
    calls: list[tuple[int, int]] = []
    polygonize(make_raster(blobs((70, 50))), block_size=32, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 6) for i in range(1, 7)]



# ----------------------------------------------------------------------------------- seam stitching


def assert_gdal_vertices(gdf: gpd.GeoDataFrame, ref: list[tuple[Any, int]]) -> None:
    """4-connectivity: stitched rings have exactly GDAL's vertices (no collinear ones left on seams)."""
    assert shapely.get_num_coordinates(gdf.geometry.values).sum() == sum(
        shapely.get_num_coordinates(g) for g, _ in ref)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_pinches_on_seams_and_block_corners(make_raster: Callable[..., Path], connectivity: int) -> None:
    data = np.zeros((16, 16), np.uint8)
    # a ring of class 1 closed only by a diagonal touch at the corner shared by four 4x4 blocks (4, 4):
    # with 4-connectivity a polygon whose hole touches its shell there, with 8 the same, joined
    data[4:11, 4] = data[10, 4:11] = data[4:11, 10] = data[4, 5:11] = 1
    data[4, 4] = 0
    data[3, 3] = 1  # diagonal neighbour of (4, 5)? no: of (4, 4)'s neighbours; a lone pinch partner
    data[3, 5:8] = 1  # touches the ring's top edge across the seam at row 4
    # a checkerboard patch straddling the seams at 8 and 12: pinches everywhere
    yy, xx = np.mgrid[6:14, 11:16]
    data[6:14, 11:16] = 2 + (yy + xx) % 2
    # an annulus of class 4 pinched at a seam vertex (12, 4): a hole that touches the shell at a point
    data[12:16, 0:4] = 4
    data[13:15, 1:3] = 0
    data[12, 3] = 0
    data[11, 4] = 4
    src = make_raster(data)
    ref = whole(data, connectivity=connectivity)
    for block in (4, 5, 8):
        gdf = polygonize(src, block_size=block, connectivity=connectivity)
        assert_same_polygons(gdf, ref)
        if connectivity == 4:
            assert_gdal_vertices(gdf, ref)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_region_spanning_many_blocks(make_raster: Callable[..., Path], connectivity: int) -> None:
    # a comb of class 1 with teeth crossing every seam, holes of class 2 astride seams and corners
    data = np.zeros((64, 64), np.uint8)
    data[:, ::3] = 1
    data[::7, :] = 1
    data[20:26, 2:40] = 2
    data[22:24, 30:34] = 1  # an island inside the hole, not touching the comb
    data[40:50, 40:50] = 1
    data[44:46, 44:46] = 3
    src = make_raster(data)
    ref = whole(data, connectivity=connectivity)
    gdf = polygonize(src, block_size=4, connectivity=connectivity)
    assert_same_polygons(gdf, ref)
    comb = gdf[gdf.class_id == 1].geometry.area.max()
    assert comb == max(g.area for g, v in ref if v == 1)
    if connectivity == 4:
        assert_gdal_vertices(gdf, ref)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=arrays(np.uint8, st.tuples(st.integers(2, 36), st.integers(2, 36)), elements=st.integers(0, 1)),
    block=st.sampled_from([4, 5, 7]),
    connectivity=st.sampled_from([4, 8]),
)
def test_random_two_class_rasters_pinches(make_raster: Callable[..., Path], data: np.ndarray, block: int,
                                          connectivity: int) -> None:
    """Two classes of noise: diagonal touches (pinches) on every seam, regions spanning many blocks."""
    src = make_raster(data)
    ref = whole(data, connectivity=connectivity)
    gdf = polygonize(src, block_size=block, connectivity=connectivity, workers=1)
    assert_same_polygons(gdf, ref)
    if connectivity == 4:
        assert_gdal_vertices(gdf, ref)


@settings(max_examples=60, deadline=None)
@given(mask=arrays(bool, st.tuples(st.integers(1, 14), st.integers(1, 14)), elements=st.booleans()),
       connectivity=st.sampled_from([4, 8]))
def test_stitch_unit_pixels_equals_union(mask: np.ndarray, connectivity: int) -> None:
    """Stitching every pixel of a region as its own piece (block size 1: every edge on a seam)."""
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    lab, n = ndimage.label(mask, structure=structure)
    groups = []
    for i in range(1, n + 1):
        rows, cols = np.nonzero(lab == i)
        groups.append(list(shapely.box(cols, rows, cols + 1, rows + 1)))
    h, w = mask.shape
    got = stitch(groups, connectivity, 1, w, h)
    for geom, pieces in zip(got, groups, strict=True):
        assert shapely.is_valid(geom)
        assert shapely.equals(geom, shapely.union_all(pieces))
        assert geom.area == len(pieces)
        if connectivity == 4:
            assert geom.geom_type == "Polygon"



@pytest.mark.parametrize("dtype", ["uint32", "int8"])
def test_class_dtypes_gdal_cannot_polygonise(make_raster: Callable[..., Path], dtype: str) -> None:
    """uint32 / int8 class ids are polygonised through dense codes and come back as the original ids."""
    data = blobs((40, 40), classes=3)
    ids = np.array([70_000, 7, 9]) if dtype == "uint32" else np.array([-5, 0, 100])
    gdf = polygonize(make_raster(ids[data].astype(dtype)), block_size=16)
    ref = whole(data)
    assert len(gdf) == len(ref)
    assert set(gdf.class_id) == set(ids.tolist())
    for k, cid in enumerate(ids.tolist()):
        expected = sum(g.area for g, v in ref if v == k)
        assert gdf[gdf.class_id == cid].geometry.area.sum() == pytest.approx(expected)

# ------------------------------------------------------------------------------------- real oracles


def test_spacenet_mask_reproduces_gdf_from_mask(real_data: Path) -> None:
    folder = real_data / "spacenet_buildings"
    oracle = gpd.read_file(folder / "gdf_from_mask_1.geojson")
    # the mask has no georeferencing: its coordinates are pixel coordinates, like the oracle's
    gdf = polygonize(folder / "sample_fp_mask_from_geojson.tif", block_size=64, skip_classes=[0],
                     min_area="40px")
    assert len(gdf) == len(oracle) == 43
    ref = [(shapely.make_valid(g.buffer(0)), 255) for g in oracle.geometry]
    assert_same_polygons(gdf, ref)


def test_slovenia_lulc_areas(real_data: Path) -> None:
    folder = real_data / "slovenia_lulc"
    src = folder / "LULC_from_npy.tif"
    with rasterio.open(src) as ds:
        data = ds.read(1)
        px = abs(ds.transform.determinant)
        shape, transform = ds.shape, ds.transform
    gdf = polygonize(src, block_size=32)
    assert gdf.crs == "EPSG:32633"
    got = gdf.groupby("class_id").area_m2.sum()
    ids, counts = np.unique(data[data != 0], return_counts=True)
    assert dict(got) == pytest.approx({int(i): c * px for i, c in zip(ids, counts, strict=True)}, rel=1e-9)
    # the 88 reference polygons rasterise to this raster, so our polygons rasterise back to it too
    ref = gpd.read_file(folder / "LULC.gpkg")
    burnt = rasterio.features.rasterize(zip(ref.geometry, ref.LULC_ID, strict=True), out_shape=shape,
                                        transform=transform)
    ours = rasterio.features.rasterize(zip(gdf.geometry, gdf.class_id, strict=True), out_shape=shape,
                                       transform=transform)
    assert np.array_equal(burnt[data != 0], ours[data != 0])
    assert np.array_equal(ours, data)


def test_epsg4326_min_area_in_square_metres(real_data: Path) -> None:
    src = real_data / "spacenet_roads" / "sample_road_raster_mask.tif"
    everything = polygonize(src, skip_classes=[0], block_size=256)
    big = polygonize(src, skip_classes=[0], block_size=256, min_area="200m2")
    assert everything.crs == "EPSG:4326" and big.crs == "EPSG:4326"
    assert 0 < len(big) < len(everything)
    assert (big.area_m2 >= 200).all()
    # geodesic areas agree with pixel counts times the local pixel area (~0.24 m x 0.30 m at 36 N)
    with rasterio.open(src) as ds:
        pixels = (ds.read(1) > 0).sum()
    pixel_m = inspect_scene(src).pixel_size_m
    assert pixel_m is not None
    assert everything.area_m2.sum() == pytest.approx(pixels * pixel_m**2, rel=1e-2)  # raster.py: a spherical estimate


# --------------------------------------------------------------------------------------- simplify


def test_simplify_leaves_no_gaps_or_overlaps(make_raster: Callable[..., Path]) -> None:
    data = blobs((120, 120), classes=4, sigma=3)
    src = make_raster(data)
    gdf = polygonize(src, block_size=32, simplify="4m")
    exact = polygonize(src, block_size=32)
    assert len(gdf) == len(exact)
    assert shapely.get_num_coordinates(gdf.geometry.values).sum() < 0.7 * shapely.get_num_coordinates(
        exact.geometry.values).sum()
    geoms = gdf.geometry.values
    assert shapely.is_valid(geoms).all()
    assert shapely.coverage_is_valid(geoms)  # no overlaps, edges shared exactly
    total = 120 * 120 * 4.0
    assert shapely.union_all(geoms).area == pytest.approx(total, rel=1e-9)  # no gaps
    assert gdf.area_m2.sum() == pytest.approx(total, rel=1e-9)


def _rotated_buildings(size: int = 160, seed: int = 0) -> np.ndarray:
    """Rotated rectangles burnt into a 0/1 raster: the pixel staircases of a building mask."""
    import shapely.affinity

    rng = np.random.default_rng(seed)
    shapes = []
    for k in range(9):
        cx, cy = 25 + (k % 3) * 55, 25 + (k // 3) * 55
        box = shapely.box(cx - rng.uniform(8, 18), cy - rng.uniform(6, 14), cx + rng.uniform(8, 18),
                          cy + rng.uniform(6, 14))
        shapes.append((shapely.affinity.rotate(box, rng.uniform(5, 40)), 1))
    return rasterio.features.rasterize(shapes, out_shape=(size, size), dtype="uint8")


@pytest.mark.parametrize("tol", [1.0, 2.0])
def test_simplify_is_douglas_peucker_on_isolated_shapes(make_raster: Callable[..., Path], tol: float) -> None:
    """Buildings alone in the background: in pixel coordinates each comes out as shapely's Douglas-Peucker
    of the raw polygon GDAL traced (the very same vertices); written, within the tolerance of the raw edge."""
    from geoseg.gis.vectorize.simplify import simplify_coverage

    data = _rotated_buildings()
    shapes = list(rasterio.features.shapes(data))
    traced = np.array([shapely.geometry.shape(g) for g, _ in shapes])
    ours = simplify_coverage(traced, tol)
    for (_, value), a, b in zip(shapes, traced, ours, strict=True):
        if value == 1:  # the buildings (the background's holes are the same rings, started elsewhere)
            assert shapely.equals(b, shapely.simplify(a, tol, preserve_topology=False))
    src = make_raster(data, transform=from_origin(0, 160, 1, 1))
    raw = polygonize(src, block_size=64, skip_classes=[0])
    simple = polygonize(src, block_size=64, skip_classes=[0], simplify=f"{tol}px")
    assert len(raw) == len(simple) == 9
    for a, b in zip(raw.geometry, simple.geometry, strict=True):  # the same polygons, in the same order
        assert shapely.hausdorff_distance(a.exterior, b.exterior) <= tol + 1e-9
    # as few vertices as the pixel-space DP (the written rings start where the block stitch puts them)
    assert shapely.get_num_coordinates(simple.geometry.values).sum() == shapely.get_num_coordinates(
        ours[[v == 1 for _, v in shapes]]).sum()


def test_one_pixel_staircases_vanish_at_one_pixel(make_raster: Callable[..., Path]) -> None:
    diamond = shapely.Polygon([(40, 10), (70, 40), (40, 70), (10, 40)])  # edges at 45 degrees: 1-px steps
    data = rasterio.features.rasterize([(diamond, 1)], out_shape=(80, 80), dtype="uint8")
    src = make_raster(data, transform=from_origin(0, 80, 1, 1))
    (raw,) = polygonize(src, skip_classes=[0]).geometry
    (simple,) = polygonize(src, skip_classes=[0], simplify="1px").geometry
    assert shapely.get_num_coordinates(raw) > 100 and shapely.get_num_coordinates(simple) <= 9
    assert shapely.hausdorff_distance(raw.exterior, simple.exterior) <= 1.0 + 1e-9


@pytest.mark.parametrize("seed", [0, 1])
def test_simplify_keeps_a_multi_class_coverage_without_gaps(make_raster: Callable[..., Path], seed: int) -> None:
    data = blobs((160, 160), classes=5, sigma=3, seed=seed)
    src = make_raster(data, transform=from_origin(0, 160, 1, 1))
    raw = polygonize(src, block_size=48)
    simple = polygonize(src, block_size=48, simplify="1.5px")
    assert len(simple) == len(raw)
    geoms = simple.geometry.values
    assert shapely.is_valid(geoms).all() and shapely.coverage_is_valid(geoms)  # no overlaps
    assert shapely.union_all(geoms).area == pytest.approx(160 * 160, abs=1e-6)  # no gaps, corners kept
    assert list(raw.class_id) == list(simple.class_id)  # the same polygons, in the same order
    for a, b in zip(raw.geometry, geoms, strict=True):  # every boundary within the tolerance of the raw one
        assert shapely.hausdorff_distance(a.boundary, b.boundary) <= 1.5 + 1e-9
    assert shapely.get_num_coordinates(geoms).sum() < 0.8 * shapely.get_num_coordinates(raw.geometry.values).sum()


def test_min_area_applies_to_the_simplified_polygons(make_raster: Callable[..., Path]) -> None:
    """--min-area filters what is written: with --simplify, every written polygon has at least that area,
    and every polygon the simplification left at least that large is written."""
    data = blobs((120, 120), classes=4, sigma=2, seed=3)
    src = make_raster(data)  # 2 m pixels: 4 m2 each
    everything = polygonize(src, block_size=32, simplify="3m")
    kept = polygonize(src, block_size=32, simplify="3m", min_area="60m2")
    assert (kept.area_m2 >= 60).all() and len(kept) < len(everything)
    assert len(kept) == int((everything.area_m2 >= 60).sum())


# ---------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("ext", [".gpkg", ".shp", ".geojson", ".parquet"])
def test_formats_read_back(make_raster: Callable[..., Path], tmp_path: Path, ext: str) -> None:
    data = blobs((90, 90), classes=3)
    src = make_raster(data)
    dst = tmp_path / f"out{ext}"
    result = vectorize_raster(src, dst, block_size=32, class_names={0: "wåter", 1: "forest", 2: "urban"})
    assert result.path == dst and dst.exists()
    assert not list(tmp_path.glob(".out*"))  # the temporary folder is gone
    gdf = gpd.read_parquet(dst) if ext == ".parquet" else pyogrio.read_dataframe(dst)
    assert list(gdf.columns) == ["class_id", "class_name", "area_m2", "perim_m", "geometry"]
    assert len(gdf) == result.features == sum(result.class_counts.values())
    assert set(gdf.class_name) == {"wåter", "forest", "urban"}
    assert gdf.area_m2.sum() == pytest.approx(90 * 90 * 4.0)
    assert sum(result.class_areas_m2.values()) == pytest.approx(90 * 90 * 4.0)
    if ext == ".geojson":
        assert gdf.crs.equals("EPSG:4326")
        assert result.crs == "EPSG:4326"
    else:
        assert gdf.crs.equals("EPSG:32633")
        assert gdf.geometry.area.sum() == pytest.approx(90 * 90 * 4.0)
    if ext == ".shp":
        assert all(len(c) <= 10 for c in gdf.columns)
        assert dst.with_suffix(".prj").exists()
        assert dst.with_suffix(".cpg").read_text().strip().upper() in ("UTF-8", "UTF8")


def test_to_crs_and_8_connectivity_file(make_raster: Callable[..., Path], tmp_path: Path) -> None:
    src = make_raster(blobs((40, 40), classes=3))
    result = vectorize_raster(src, tmp_path / "o.gpkg", to_crs="EPSG:3035", connectivity=8, block_size=16)
    info = pyogrio.read_info(result.path)
    assert info["crs"] == "EPSG:3035" and info["geometry_type"] == "MultiPolygon"


def test_format_registry() -> None:
    assert set(FORMATS) == {"gpkg", "shp", "geojson", "parquet"}
    assert get_format("Shapefile").name == "shp"
    with pytest.raises(UnknownNameError, match="valid names: geojson, gpkg, parquet, shp"):
        get_format("kml")
    assert format_for("a/out")[0] == Path("a/out.gpkg")
    assert format_for("a/out", "parquet")[0] == Path("a/out.parquet")
    with pytest.raises(InputError, match="does not match"):
        format_for("out.gpkg", "geojson")
    with pytest.raises(InputError, match="unknown vector extension"):
        format_for("out.kml")


def test_overwrite_refused_then_allowed(make_raster: Callable[..., Path], tmp_path: Path) -> None:
    src = make_raster(blobs((20, 20), classes=2))
    dst = tmp_path / "o.gpkg"
    vectorize_raster(src, dst)
    with pytest.raises(OutputExistsError, match="already exists"):
        vectorize_raster(src, dst)
    assert vectorize_raster(src, dst, overwrite=True).features > 0


def test_shapefile_size_limit(make_raster: Callable[..., Path], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FORMATS, "shp", FORMATS["shp"].__class__(
        **{**FORMATS["shp"].__dict__, "size_limit": 1000}))
    src = make_raster(blobs((60, 60)))
    with pytest.raises(InputError, match="2 GB.*GeoPackage"):
        vectorize_raster(src, tmp_path / "big.shp")
    assert not list(tmp_path.glob("big*")) and not list(tmp_path.glob(".big*"))


# --------------------------------------------------------------------------------- bad input, units


def test_min_area_units() -> None:
    assert parse_min_area(40) == Quantity(40.0, "px")
    assert parse_min_area("40px") == Quantity(40.0, "px")
    assert parse_min_area("200 m2") == Quantity(200.0, "m2")
    assert parse_min_area("0.5ha") == Quantity(5000.0, "m2")
    assert parse_simplify(1.5) == Quantity(1.5, "crs")
    assert parse_simplify("1m") == Quantity(1.0, "m")
    assert parse_simplify("2px") == Quantity(2.0, "px")
    for bad in ("40 furlongs", "-3px", "px", True):
        with pytest.raises(InputError, match="--min-area"):
            parse_min_area(bad)


def test_min_area_pixels_and_metres_agree(make_raster: Callable[..., Path]) -> None:
    src = make_raster(blobs((80, 80)))
    by_px = polygonize(src, min_area="10px", block_size=32)
    by_m2 = polygonize(src, min_area="40m2", block_size=32)  # 2 m pixels
    assert len(by_px) == len(by_m2) < len(polygonize(src, block_size=32))
    assert (by_px.area_m2 >= 40).all()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"connectivity": 6}, "must be 4 or 8"),
    ({"block_size": 2}, "--block-size"),
    ({"workers": 0}, "workers"),
    ({"to_crs": "EPSG:999999"}, "not a CRS"),
    ({"skip_classes": ["x"]}, "--skip-class"),
])
def test_bad_options(make_raster: Callable[..., Path], kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match):
        polygonize(make_raster(np.zeros((4, 4), np.uint8)), **kwargs)


def test_bad_inputs(make_raster: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        polygonize(tmp_path / "missing.tif")
    (tmp_path / "text.tif").write_text("not a raster")
    with pytest.raises(InputError, match="cannot be read as a raster"):
        polygonize(tmp_path / "text.tif")
    with pytest.raises(InputError, match=r"float32.*integer class ids"):
        polygonize(make_raster(np.zeros((4, 4), np.float32), name="f.tif"))
    with pytest.raises(InputError, match="has 3 bands"):
        polygonize(make_raster(np.zeros((3, 4, 4), np.uint8), name="rgb.tif"))
    nocrs = make_raster(np.zeros((4, 4), np.uint8), name="nocrs.tif", crs=None)
    with pytest.raises(InputError, match="no CRS.*pixels"):
        polygonize(nocrs, min_area="10m2")
    assert polygonize(nocrs).area_m2.isna().all()


def test_output_stays_in_source_crs(make_raster: Callable[..., Path]) -> None:
    src = make_raster(blobs((30, 30), classes=2), crs="EPSG:3857",
                      transform=from_origin(1_000_000.0, 6_000_000.0, 0.5, 0.5))
    gdf = polygonize(src, block_size=8)
    assert gdf.crs == "EPSG:3857"
    assert gdf.total_bounds == pytest.approx([1_000_000.0, 5_999_985.0, 1_000_015.0, 6_000_000.0])


def test_source_date_epoch_makes_vector_files_reproducible(tmp_path, monkeypatch):
    """GeoPackage and shapefile record a date; with SOURCE_DATE_EPOCH it is fixed, so the bytes are too."""
    import time

    from geoseg.gis.vectorize import vectorize_raster
    from tests.conftest import write_raster

    data = np.random.default_rng(0).integers(1, 4, size=(60, 70)).astype(np.uint8)
    src = write_raster(tmp_path / "c.tif", data)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1764028800")
    for ext in ("gpkg", "shp"):
        vectorize_raster(src, tmp_path / "a" / f"v.{ext}")
        time.sleep(0.01)
        vectorize_raster(src, tmp_path / "b" / f"v.{ext}")
        assert (tmp_path / "a" / f"v.{ext}").read_bytes() == (tmp_path / "b" / f"v.{ext}").read_bytes()
    assert (tmp_path / "a" / "v.dbf").read_bytes() == (tmp_path / "b" / "v.dbf").read_bytes()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(InputError, match="SOURCE_DATE_EPOCH"):
        vectorize_raster(src, tmp_path / "c.gpkg")
