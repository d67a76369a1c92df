import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin
from rasterio.windows import Window

from geoseg.errors import InputError
from geoseg.io.profiles import OutputSpec, classes_spec, cog_options, probabilities_spec
from geoseg.io.raster import BLOCK, gdal_env, inspect_scene
from geoseg.io.vrt import mosaic_vrts, strips_vrt
from geoseg.model.contract import ClassInfo
from tests.conftest import write_raster

CLASSES = [ClassInfo(id=1, name="water", color=(0, 0, 255)), ClassInfo(id=2, name="forest & <scrub>", color=(0, 128, 0)),
           ClassInfo(id=4, name="urban", color=(200, 0, 0))]
WIDTH, HEIGHT = 1500, 1100
PANELS = [(0, 1024), (1024, WIDTH)]  # column ranges of the strips
MISSING = Window(1024, 512, 476, 512)  # the strip no source covers: all nodata in the reference


def _cog(src: Path, dst: Path, spec: OutputSpec) -> Path:
    """The COG conversion of ``geoseg.predict.finish``."""
    with gdal_env():
        rasterio.shutil.copy(src, dst, **cog_options(spec, "deflate"))
    return dst


def _staged_gtiff(path: Path, data: np.ndarray, spec: OutputSpec, scene: Any) -> Path:
    """One tiled GTiff of the whole scene with ``spec``, as the staging path before strips wrote it.

    PHOTOMETRIC=MINISBLACK, as the VRT declares: left to itself GTiff makes 3 or 4 Byte bands RGB(A).
    """
    profile: dict[str, Any] = dict(
        driver="GTiff", width=scene.width, height=scene.height, count=spec.count, dtype=spec.dtype,
        crs=scene.crs, transform=scene.transform, nodata=spec.nodata, tiled=True,
        blockxsize=BLOCK, blockysize=BLOCK, compress="zstd", zstd_level=1, bigtiff="if_safer",
    )
    if not spec.colormap:
        profile["photometric"] = "MINISBLACK"
    if spec.nbits:
        profile["nbits"] = spec.nbits
    with rasterio.open(path, "w", **profile) as ds:
        for i, d in enumerate(spec.descriptions, start=1):
            ds.set_band_description(i, d)
        if spec.colormap:
            ds.write_colormap(1, spec.colormap)
        if spec.scales:
            ds.scales = tuple(spec.scales)
            ds.offsets = tuple([0.0] * spec.count)
        if spec.tags:
            ds.update_tags(**spec.tags)
        ds.write(data)
    return path


def _pixels(spec: OutputSpec, rng: np.random.Generator) -> np.ndarray:
    if spec.colormap:
        data = rng.choice(np.array(list(spec.colormap), spec.dtype), size=(1, HEIGHT, WIDTH))
    elif spec.dtype == "uint8":
        data = rng.integers(0, 255, size=(spec.count, HEIGHT, WIDTH), dtype=np.uint8)
    else:
        data = rng.random((spec.count, HEIGHT, WIDTH), dtype=np.float32)
    nodata = np.asarray(spec.nodata).astype(data.dtype)
    data[:, 30:90, 700:1300] = nodata  # a hole across a panel boundary
    data[:, MISSING.row_off:MISSING.row_off + MISSING.height, MISSING.col_off:] = nodata
    return data


def _write_strips(folder: Path, data: np.ndarray, spec: OutputSpec, scene: Any) -> list[tuple[str, Window]]:
    """Strips of BLOCK rows split in PANELS, as GTiffs; paths relative to ``folder``; MISSING left out."""
    (folder / "strips").mkdir()
    sources = []
    for row in range(0, HEIGHT, BLOCK):
        for c0, c1 in PANELS:
            window = Window(c0, row, c1 - c0, min(BLOCK, HEIGHT - row))
            if window == MISSING:
                continue
            name = f"strips/r{row}_c{c0}.tif"
            part = data[:, row:row + int(window.height), c0:c1]
            extra = {"nbits": spec.nbits} if spec.nbits else {}
            write_raster(folder / name, part, crs=scene.crs, nodata=spec.nodata,
                         transform=rasterio.windows.transform(window, scene.transform),
                         tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="zstd", **extra)
            sources.append((name, window))
    return sources


SPECS = {
    "classes": classes_spec(CLASSES, {"MODEL": "tiny", "NOTE": 'quotes " & <tags>'}),
    "classes_uint16": classes_spec([*CLASSES, ClassInfo(id=300, name="many", color=(9, 9, 9))]),
    "probs_uint8": probabilities_spec(CLASSES, "uint8"),
    "probs4_uint8": probabilities_spec(CLASSES + [ClassInfo(id=5, name="e")], "uint8"),
    "probs_float32": probabilities_spec(CLASSES, "float32"),
    "probs_float16": probabilities_spec(CLASSES, "float16"),
}


def _describe(path: Path) -> dict[str, Any]:
    """Everything a reader sees of a COG: metadata, and the pixels (raw bits) of every overview level."""
    with rasterio.open(path) as ds:
        meta = {"profile": {k: v for k, v in ds.profile.items() if k != "nodata"}, "nodata": repr(ds.nodata),
                "tags": ds.tags(), "band_tags": [ds.tags(i, ns="IMAGE_STRUCTURE") for i in ds.indexes],
                "descriptions": ds.descriptions, "colorinterp": ds.colorinterp, "scales": ds.scales,
                "offsets": ds.offsets, "overviews": ds.overviews(1)}
        levels = len(ds.overviews(1))
    pixels = []
    for level in range(-1, levels):
        with rasterio.open(path, **({} if level < 0 else {"overview_level": level})) as ds:
            pixels.append(ds.read().tobytes())
    return {**meta, "pixels": pixels}


@pytest.mark.parametrize("kind", list(SPECS))
def test_strips_vrt_cog_is_byte_identical_to_staged_cog(tmp_path, kind):
    spec = SPECS[kind]
    scene = inspect_scene(write_raster(tmp_path / "scene.tif", np.zeros((1, HEIGHT, WIDTH), np.uint8),
                                       transform=from_origin(500_000.5, 5_100_000.25, 2.5, 2.5)))
    data = _pixels(spec, np.random.default_rng(0))
    reference = _cog(_staged_gtiff(tmp_path / "staged.tif", data, spec, scene), tmp_path / "staged_cog.tif", spec)

    sources = _write_strips(tmp_path, data, spec, scene)
    vrt = tmp_path / "scene.vrt"
    vrt.write_text(strips_vrt(WIDTH, HEIGHT, scene.crs, scene.transform, spec, sources))
    cog = _cog(vrt, tmp_path / "from_vrt.tif", spec)

    if spec.nbits:
        # GDAL's NBITS=16 writer leaves the padding of edge tiles uninitialised: two COGs of the same GTiff
        # differ in bytes. What a reader sees (metadata, every pixel of every level) must be the same.
        assert _describe(cog) == _describe(reference)
    else:
        assert cog.read_bytes() == reference.read_bytes()
    with rasterio.open(cog) as ds:
        assert ds.crs == scene.crs and ds.transform == scene.transform
        assert ds.descriptions == tuple(spec.descriptions)
        assert ds.nodata == spec.nodata or (np.isnan(ds.nodata) and np.isnan(spec.nodata))
        assert {k: ds.tags()[k] for k in spec.tags} == spec.tags
        assert ds.scales == tuple(spec.scales or [1.0] * spec.count) and set(ds.offsets) == {0.0}
        assert ColorInterp.alpha not in ds.colorinterp and ds.colorinterp[0] != ColorInterp.red
        if spec.colormap:
            cmap = ds.colormap(1)
            assert all(cmap[i] == rgba for i, rgba in spec.colormap.items())
            assert cmap[3] == (0, 0, 0, 255)  # unlisted id (TIFF colour maps carry no alpha)
        assert ds.overviews(1)
        if spec.nbits:  # half floats, as GDAL rounds them
            np.testing.assert_allclose(ds.read(), data, rtol=2**-10)
        else:
            np.testing.assert_array_equal(ds.read(), data)


def test_strips_vrt_fills_uncovered_pixels_with_nodata_and_escapes(tmp_path):
    spec = classes_spec(CLASSES, {"NOTE": "a & b < c"})
    t = from_origin(10.0, 20.0, 1.0, 1.0)
    write_raster(tmp_path / "a b.tif", np.full((1, 4, 6), 2, np.uint8), transform=t, nodata=255)
    xml = strips_vrt(6, 8, "EPSG:32633", t, spec, [("a b.tif", Window(0, 4, 6, 4))])
    assert "a &amp; b &lt; c" in xml and 'relativeToVRT="1"' in xml
    (tmp_path / "x.vrt").write_text(xml)
    with rasterio.open(tmp_path / "x.vrt") as ds:
        band = ds.read(1)
        assert (band[:4] == 255).all() and (band[4:] == 2).all()
        assert ds.tags()["NOTE"] == "a & b < c" and ds.tags()["CLASS_2"] == "forest & <scrub>"
        assert ds.colormap(1)[3] == (0, 0, 0, 0) and ds.colormap(1)[4] == (200, 0, 0, 255)
    absolute = strips_vrt(6, 8, None, t, spec, [(str(tmp_path / "a b.tif"), Window(0, 4, 6, 4)),
                                                ("/vsis3/bucket/p.tif", Window(0, 0, 6, 4))])
    assert absolute.count('relativeToVRT="0"') == 2 and "<SRS" not in absolute
    url = strips_vrt(6, 8, None, t, spec, [("s3://bucket/key/p.tif", Window(0, 0, 6, 4))])
    assert '<SourceFilename relativeToVRT="0">/vsis3/bucket/key/p.tif<' in url


@pytest.mark.parametrize("window", [Window(0, 0, 7, 4), Window(-1, 0, 2, 2), Window(0.5, 0, 2, 2), Window(0, 0, 0, 2)])
def test_strips_vrt_rejects_windows_outside_the_scene(window):
    with pytest.raises(InputError, match="s.tif"):
        strips_vrt(6, 8, None, from_origin(0, 0, 1, 1), classes_spec(CLASSES), [("s.tif", window)])


# ---------------------------------------------------------------------------------------------- mosaic


def _class_map(path: Path, data: np.ndarray, transform: Any, crs: str = "EPSG:32633", **kw: Any) -> str:
    spec = classes_spec(CLASSES)
    write_raster(path, data.astype(spec.dtype), crs=crs, transform=transform, nodata=spec.nodata, **kw)
    with rasterio.open(path, "r+") as ds:
        ds.write_colormap(1, spec.colormap)
        ds.update_tags(**spec.tags, OTHER="not a class tag")
        ds.set_band_description(1, "class")
    return str(path)


def test_mosaic_vrts_lays_maps_on_one_grid_per_crs(tmp_path, caplog):
    a = np.tile(np.array([1, 2], np.uint8), (10, 5))  # 10 x 10 at 2 m
    b = np.full((4, 6), 4, np.uint8)  # 4 x 6 at 4 m, right of a and hanging 2 m above it
    b[0, 0] = 255
    paths = [
        _class_map(tmp_path / "a.classes.tif", a, from_origin(500_000, 5_100_000, 2, 2)),
        _class_map(tmp_path / "b.classes.tif", b, from_origin(500_020, 5_100_002, 4, 4)),
        _class_map(tmp_path / "c.classes.tif", np.ones((3, 3)), from_origin(600_000, 5_000_000, 2, 2), crs="EPSG:32634"),
        _class_map(tmp_path / "r.classes.tif", np.ones((3, 3)), from_origin(500_000, 5_100_000, 2, 2) * rasterio.Affine.rotation(10)),
    ]
    with caplog.at_level(logging.WARNING, logger="geoseg.io.vrt"):
        docs = mosaic_vrts(paths, "job")
    assert "r.classes.tif" in caplog.text and "north-up" in caplog.text
    assert sorted(docs) == ["job.epsg32633.vrt", "job.epsg32634.vrt"]
    for filename, xml in docs.items():
        assert 'relativeToVRT="1"' in xml and str(tmp_path) not in xml
        (tmp_path / filename).write_text(xml)

    with rasterio.open(tmp_path / "job.epsg32633.vrt") as ds:
        assert ds.crs.to_epsg() == 32633 and ds.res == (2.0, 2.0)
        assert tuple(ds.bounds) == (500_000, 5_099_980, 500_044, 5_100_002)
        assert ds.nodata == 255 and ds.colormap(1)[4] == (200, 0, 0, 255) and ds.descriptions == ("class",)
        assert ds.tags()["CLASS_2"] == "forest & <scrub>" and "OTHER" not in ds.tags()
        band = ds.read(1)
    expected = np.full((11, 22), 255, np.uint8)
    expected[1:, :10] = a  # a starts one 2 m row below the top of b
    expected[:8, 10:] = np.kron(b, np.ones((2, 2), np.uint8))  # b at 4 m, drawn at 2 m
    np.testing.assert_array_equal(band, expected)
    with rasterio.open(tmp_path / "job.epsg32634.vrt") as ds:
        assert ds.crs.to_epsg() == 32634 and ds.bounds.left == 600_000 and (ds.read(1) == 1).all()


def test_mosaic_vrts_later_maps_on_top_and_nodata_transparent(tmp_path):
    t = from_origin(500_000, 5_100_000, 2, 2)
    (tmp_path / "x").mkdir()
    under = _class_map(tmp_path / "x" / "under.tif", np.full((4, 4), 1), t)
    top = np.full((4, 4), 2, np.uint8)
    top[:, :2] = 255
    over = _class_map(tmp_path / "y.tif", top, t)
    docs = mosaic_vrts([under, over], "job")
    assert list(docs) == ["job.vrt"] and docs["job.vrt"].count('relativeToVRT="0"') == 2
    (tmp_path / "elsewhere.vrt").write_text(docs["job.vrt"])
    with rasterio.open(tmp_path / "elsewhere.vrt") as ds:
        np.testing.assert_array_equal(ds.read(1), np.where(top == 255, 1, 2))


def test_mosaic_vrts_names_groups_and_rejects_multiband(tmp_path):
    assert mosaic_vrts([], "job") == {}
    t = from_origin(500_000, 5_100_000, 2, 2)
    laea = "+proj=laea +lat_0=52 +lon_0=10 +x_0=4321000 +y_0=3210000 +ellps=GRS80 +units=m +no_defs"
    maps = [_class_map(tmp_path / "n.tif", np.ones((3, 3)), t, crs=None),
            _class_map(tmp_path / "l.tif", np.ones((3, 3)), t, crs=laea)]
    names = sorted(mosaic_vrts(maps, "job"))
    assert names[1] == "job.nocrs.vrt" and names[0].startswith("job.crs") and len(names[0]) == len("job.crs.vrt") + 8
    bad = write_raster(tmp_path / "p.tif", np.zeros((2, 3, 3), np.uint8))
    with pytest.raises(InputError, match="p.tif"):
        mosaic_vrts([str(bad)], "job")


def test_mosaic_vrts_takes_gdal_paths(tmp_path):
    t = from_origin(500_000, 5_100_000, 2, 2)
    try:
        one = [_class_map(Path(f"/vsimem/out/{n}.tif"), np.full((3, 3), 2), t) for n in ("a", "b")]
        xml = mosaic_vrts(one, "job")["job.vrt"]
        assert xml.count('<SourceFilename relativeToVRT="1">') == 2 and "/vsimem" not in xml
        two = [one[0], _class_map(Path("/vsimem/other/c.tif"), np.full((3, 3), 4), t * rasterio.Affine.translation(3, 0))]
        xml = mosaic_vrts(two, "job")["job.vrt"]
        assert '<SourceFilename relativeToVRT="0">/vsimem/out/a.tif<' in xml
        (tmp_path / "job.vrt").write_text(xml)
        with rasterio.open(tmp_path / "job.vrt") as ds:
            np.testing.assert_array_equal(ds.read(1), np.repeat([[2, 2, 2, 4, 4, 4]], 3, axis=0))
    finally:
        for name in ("out/a", "out/b", "other/c"):
            rasterio.shutil.delete(f"/vsimem/{name}.tif")
