import numpy as np
import pytest
import rasterio
from hypothesis import given, settings
from hypothesis import strategies as st
from rasterio.features import rasterize
from rasterio.windows import Window

from geoseg.errors import InputError
from geoseg.io.raster import inspect_scene
from geoseg.learn.config import config_from_dict
from geoseg.learn.data import (
    IGNORE_INDEX,
    UNLABELLED,
    BandStats,
    ChipDataset,
    ChipRules,
    ClassMap,
    GridChipSampler,
    RandomChipSampler,
    assign_splits,
    open_labels,
    prepare_data,
)
from tests._training import TRANSFORM, label_array, tiny_config, write_scene
from tests.conftest import write_raster


def test_class_map_makes_contiguous_indexes_and_ignores_the_rest():
    cm = ClassMap([5, 2, 9])
    out = cm.to_index(np.array([[5, 2, 9], [0, UNLABELLED, 300]]))
    assert out.tolist() == [[0, 1, 2], [IGNORE_INDEX] * 3]


def test_raster_labels_on_another_grid_are_warped_onto_the_image(tmp_path):
    image, labels = write_scene(tmp_path)
    info = inspect_scene(image)
    lab = label_array()
    # the same labels on a coarser grid
    coarse = lab[::2, ::2]
    from rasterio.transform import from_origin

    path = write_raster(tmp_path / "coarse.tif", coarse, nodata=0, transform=from_origin(500_000.0, 5_100_000.0, 4.0, 4.0))
    src = open_labels(str(path), info)
    assert not src.same_grid
    got = src.read(Window(0, 0, 128, 128))
    assert got.shape == (128, 128)
    assert (got[::2, ::2] == np.where(coarse == 0, UNLABELLED, coarse)).mean() > 0.97
    same = open_labels(str(labels), info)
    assert same.same_grid
    win = Window(100, 100, 64, 64)  # reaches past the edge: padded as unlabelled
    part = same.read(win)
    assert part.shape == (64, 64) and (part[28:, :] == UNLABELLED).all() and (part[:28, :28] == lab[100:, 100:]).all()


def test_vector_labels_are_reprojected_and_rasterised_on_the_image_grid(tmp_path):
    import geopandas as gpd
    from shapely.geometry import box

    image, _ = write_scene(tmp_path)
    info = inspect_scene(image)
    polys = [box(500_020, 5_099_900, 500_100, 5_099_980), box(500_150, 5_099_800, 500_200, 5_099_850)]
    gdf = gpd.GeoDataFrame({"kind": ["buildings", "water"]}, geometry=polys, crs="EPSG:32633")
    gdf.to_crs("EPSG:4326").to_file(tmp_path / "labels.geojson", driver="GeoJSON")
    src = open_labels(str(tmp_path / "labels.geojson"), info, column="kind", background=2,
                      names={"water": 1, "vegetation": 2, "buildings": 3})
    got = src.read(Window(0, 0, 128, 128))
    want = rasterize(zip(polys, [3, 1], strict=True), out_shape=(128, 128), transform=TRANSFORM, fill=2)
    assert (got == want).mean() > 0.995  # only boundary pixels may differ after the round trip through degrees
    with pytest.raises(InputError, match="columns are"):
        open_labels(str(tmp_path / "labels.geojson"), info, column="nope")
    with pytest.raises(InputError, match="label_column"):
        open_labels(str(tmp_path / "labels.geojson"), info)


def test_real_spacenet_polygons_rasterise_to_the_reference_mask(real_data):
    d = real_data / "spacenet_buildings"
    info = inspect_scene(d / "sample_geotiff.tif")
    src = open_labels(str(d / "geotiff_labels.geojson"), info, value=1, background=0)
    with rasterio.open(d / "sample_fp_mask_from_geojson.tif") as ds:
        ref = ds.read(1) > 0
    got = np.concatenate([np.concatenate([src.read(Window(c, r, 300, 300)) for c in (0, 300, 600)], axis=1)
                          for r in (0, 300, 600)])
    assert ((got == 1) == ref).all()


def test_splits_are_deterministic_and_keep_train_and_val(tmp_path):
    image, labels = write_scene(tmp_path, size=256)
    cfg = config_from_dict(tiny_config(image, labels))
    data = prepare_data(cfg)
    blocks = data.coverages[0].blocks
    names = [n for _, n in blocks]
    assert len(blocks) == 16 and names.count("val") == 4 and names.count("train") == 12
    again = prepare_data(cfg)
    assert [n for _, n in again.coverages[0].blocks] == names
    assert data.split_summary()["scenes"][0]["pixels"]["val"] == 4 * 64 * 64
    written = data.write_split(tmp_path / "split")
    assert any(p.name.endswith("_val.geojson") for p in written)


def test_assign_splits_scene_level(tmp_path):
    image, labels = write_scene(tmp_path)
    cfg = config_from_dict(tiny_config(image, labels, data={"scenes": [
        {"image": str(image), "labels": str(labels)}, {"image": str(image), "labels": str(labels), "split": "val"}],
        "val_fraction": 0.0}))
    data = prepare_data(cfg)
    assert {n for _, n in data.coverages[1].blocks} == {"val"}
    assert {n for _, n in data.coverages[0].blocks} == {"train"}  # the val scene covers validation
    out = assign_splits(data.scenes, 64, 0.5, 0.25, seed=1)
    assert [n for _, n in out[0]].count("test") == 1


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), epoch=st.integers(0, 5))
def test_train_chips_never_touch_val_blocks(seed, epoch, tmp_path_factory):
    data, rules = _prepared(tmp_path_factory)
    blocks = assign_splits(data.scenes, 64, 0.25, 0.0, seed)
    from geoseg.learn.data import scan_scene

    cov = scan_scene(data.scenes[0], data.class_map, blocks[0], data.cell, None, None)
    sampler = RandomChipSampler([cov], rules, "train", 20, seed)
    locs = sampler.locations(epoch)
    assert locs == sampler.locations(epoch)
    val = [w for w, n in blocks[0] if n == "val"]
    for loc in locs:
        w = loc.window
        for v in val:
            overlap_r = min(w.row_off + w.height, v.row_off + v.height) - max(w.row_off, v.row_off)
            overlap_c = min(w.col_off + w.width, v.col_off + v.width) - max(w.col_off, v.col_off)
            assert overlap_r <= 0 or overlap_c <= 0
    for loc in GridChipSampler(data.scenes, [cov], rules, "val"):
        assert any(v.col_off <= loc.window.col_off and loc.window.col_off + 32 <= v.col_off + v.width
                   and v.row_off <= loc.window.row_off and loc.window.row_off + 32 <= v.row_off + v.height for v in val)


_CACHE: dict = {}


def _prepared(factory):
    if "data" not in _CACHE:
        folder = factory.mktemp("scene")
        image, labels = write_scene(folder)
        data = prepare_data(config_from_dict(tiny_config(image, labels)))
        _CACHE["data"] = (data, ChipRules(32, 0.5, 0.01))
    return _CACHE["data"]


def test_chips_that_are_mostly_nodata_are_skipped(tmp_path):
    image, labels = write_scene(tmp_path)
    data = prepare_data(config_from_dict(tiny_config(image, labels, data={"val_fraction": 0.0})))
    cov = data.coverages[0]
    strict = ChipRules(32, 0.99, 0.0)
    locs = GridChipSampler(data.scenes, [cov], strict, "train").locations()
    assert len(locs) == 15  # the top-left chip is half nodata
    assert all((loc.window.col_off, loc.window.row_off) != (0, 0) for loc in locs)
    assert len(GridChipSampler(data.scenes, [cov], ChipRules(32, 0.2, 0.0), "train")) == 16


def test_dataset_ignores_nodata_and_normalises(tmp_path):
    image, labels = write_scene(tmp_path)
    data = prepare_data(config_from_dict(tiny_config(image, labels, data={"val_fraction": 0.0})))
    from geoseg.learn.data import ChipLocation

    ds = ChipDataset(data.scenes, [ChipLocation(0, Window(0, 0, 32, 32))], data.class_map, data.mean, data.std, 32)
    img, target = ds[0]
    assert img.shape == (3, 32, 32) and target.shape == (32, 32)
    assert (target[:16, :16] == IGNORE_INDEX).all() and (target[16:, 16:] == 0).all()
    assert (img[:, :16, :16] == 0).all()
    # normalisation statistics are those of the valid training pixels
    with rasterio.open(image) as src:
        raw = src.read().astype(float)
    valid = raw.any(axis=0)
    np.testing.assert_allclose(data.mean, [raw[b][valid].mean() for b in range(3)], rtol=1e-9)
    np.testing.assert_allclose(data.std, [raw[b][valid].std(ddof=1) for b in range(3)], rtol=1e-9)
    assert data.class_counts.sum() == (label_array() > 0).sum()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 200), min_size=1, max_size=6), st.integers(0, 2**16))
def test_streamed_band_statistics_match_numpy(sizes, seed):
    rng = np.random.default_rng(seed)
    chunks = [rng.normal(1000, 50, size=(2, 1, n)) for n in sizes]
    stats = BandStats.empty(2)
    for c in chunks:
        stats.update(c, np.ones(c.shape, dtype=bool))
    allv = np.concatenate(chunks, axis=2)
    np.testing.assert_allclose(stats.mean, allv.mean(axis=(1, 2)), rtol=1e-10)
    if allv.shape[2] > 1:
        np.testing.assert_allclose(stats.std, allv.std(axis=(1, 2), ddof=1), rtol=1e-7)


def test_missing_or_bad_inputs_raise_input_errors(tmp_path):
    image, labels = write_scene(tmp_path)
    with pytest.raises(InputError, match="no such label file"):
        prepare_data(config_from_dict(tiny_config(image, tmp_path / "nope.tif")))
    with pytest.raises(InputError, match="bands"):
        prepare_data(config_from_dict(tiny_config(image, labels, data={"bands": [1, 4]})))


def test_samplers_know_how_many_labelled_pixels_a_chip_holds(tmp_path):
    # what sizes a run by passes over the labelled pixels (config passes): checked against the labels themselves
    image, labels = write_scene(tmp_path)
    data = prepare_data(config_from_dict(tiny_config(image, labels, data={"val_fraction": 0.0})))
    labelled = label_array() != 0  # the image is nodata exactly where the labels are
    rules = ChipRules(32, 0.5, 0.01)
    cell = data.coverages[0].cell
    rnd = RandomChipSampler(data.coverages, rules, "train", 10, seed=0)
    want = np.mean([labelled[r * cell: r * cell + 32, c * cell: c * cell + 32].sum() for r, c in rnd._origins[0]])
    assert rnd.labelled_per_chip == pytest.approx(want)
    grid = GridChipSampler(data.scenes, data.coverages, rules, "train")
    want = np.mean([labelled[int(loc.window.row_off): int(loc.window.row_off) + 32,
                             int(loc.window.col_off): int(loc.window.col_off) + 32].sum() for loc in grid])
    assert grid.labelled_per_chip == pytest.approx(want) and 32 * 32 * 0.5 < want < 32 * 32
    assert int(data.class_counts.sum()) == labelled.sum()


def test_sparse_labels_hold_few_labelled_pixels_per_chip(tmp_path):
    image, _ = write_scene(tmp_path)
    lab = np.zeros((128, 128), dtype=np.uint8)
    lab[40:50, 40:50] = 3  # one small polygon
    lab[90:96, 100:110] = 1
    labels = write_raster(tmp_path / "sparse.tif", lab, nodata=0, transform=TRANSFORM)
    data = prepare_data(config_from_dict(tiny_config(image, labels, data={"val_fraction": 0.0})))
    rnd = RandomChipSampler(data.coverages, ChipRules(32, 0.5, 0.01), "train", 10, seed=0)
    cell = data.coverages[0].cell
    want = np.mean([(lab[r * cell: r * cell + 32, c * cell: c * cell + 32] != 0).sum() for r, c in rnd._origins[0]])
    assert rnd.labelled_per_chip == pytest.approx(want) and 10 < want < 100  # a chip sees part of the 160
    assert int(data.class_counts.sum()) == 160
