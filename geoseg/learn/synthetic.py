"""Synthetic land-cover scenes with exact labels, for the demo, tests and benchmarks.

A scene is a georeferenced 3-band (R, G, B) uint8 GeoTIFF in EPSG:32633 at 1 m, with water, vegetation,
bare soil, buildings and roads drawn as shapes with distinct spectra, illumination drift and noise, and a
nodata (0) triangle in the top-left corner. Its label raster has the same grid, class ids 1..5, nodata 0.
Scenes are generated in strips, so a large one never sits in memory whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
import shapely
from affine import Affine
from rasterio.features import rasterize
from rasterio.transform import from_origin
from rasterio.windows import Window

from geoseg.model.contract import ClassInfo

CLASSES = [
    ClassInfo(id=1, name="water", color=(31, 120, 180)),
    ClassInfo(id=2, name="vegetation", color=(51, 160, 44)),
    ClassInfo(id=3, name="bare soil", color=(214, 170, 110)),
    ClassInfo(id=4, name="buildings", color=(227, 26, 28)),
    ClassInfo(id=5, name="roads", color=(90, 90, 90)),
]
# mean RGB of each class (index = class id - 1)
SPECTRA = np.array([[35, 70, 115], [60, 125, 50], [150, 122, 85], [205, 190, 180], [120, 118, 122]], np.float32)
CRS = "EPSG:32633"
PIXEL = 1.0


@dataclass(frozen=True)
class SyntheticScene:
    image: Path
    labels: Path


def _smooth_field(rng: np.random.Generator, height: int, width: int, cell: int, y0: int, gh: np.ndarray) -> np.ndarray:
    """Rows ``[y0, y0 + height)`` of a smooth random field defined on a coarse grid ``gh`` (cell px)."""
    ys = (np.arange(y0, y0 + height) + 0.5) / cell
    xs = (np.arange(width) + 0.5) / cell
    iy = np.clip(ys.astype(int), 0, gh.shape[0] - 2)
    ix = np.clip(xs.astype(int), 0, gh.shape[1] - 2)
    fy = np.clip(ys - iy, 0, 1)[:, None]
    fx = np.clip(xs - ix, 0, 1)[None, :]
    fy = fy * fy * (3 - 2 * fy)  # smoothstep: no visible grid lines
    fx = fx * fx * (3 - 2 * fx)
    a = gh[iy][:, ix]
    b = gh[iy][:, ix + 1]
    c = gh[iy + 1][:, ix]
    d = gh[iy + 1][:, ix + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def make_scene(path_image: str | os.PathLike[str], path_labels: str | os.PathLike[str], size: int | tuple[int, int],
               seed: int = 0, strip: int = 512) -> SyntheticScene:
    """Write a synthetic scene and its labels (see the module docstring); ``size`` is (width, height) or one int."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    cell_land, cell_water, cell_light = 160, 300, 700
    g_land = rng.random((height // cell_land + 3, width // cell_land + 3))
    g_water = rng.random((height // cell_water + 3, width // cell_water + 3))
    g_light = rng.random((height // cell_light + 3, width // cell_light + 3))
    # roads: straight lines across the scene, 5-8 px wide; buildings: 8-30 px rectangles.
    # Both are drawn with rasterio.features.rasterize in pixel coordinates, strip by strip.
    n_roads = max(2, (width + height) // 600)
    roads = []
    diag = float(np.hypot(width, height))
    for _ in range(n_roads):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        ang = rng.uniform(0, np.pi)
        dx, dy = np.cos(ang) * diag, np.sin(ang) * diag
        roads.append(shapely.LineString([(x0 - dx, y0 - dy), (x0 + dx, y0 + dy)]).buffer(rng.uniform(2.5, 4.0),
                                                                                         cap_style="flat"))
    n_build = max(10, width * height // 9000)
    bx, by = rng.uniform(0, width, n_build), rng.uniform(0, height, n_build)
    bw, bh = rng.uniform(8, 30, n_build), rng.uniform(8, 30, n_build)
    buildings = shapely.box(bx, by, bx + bw, by + bh)
    road_tree, build_tree = shapely.STRtree(roads), shapely.STRtree(buildings)
    profile = dict(driver="GTiff", width=width, height=height, crs=CRS, tiled=True, blockxsize=256,
                   blockysize=256, compress="deflate", transform=from_origin(400_000.0, 5_000_000.0, PIXEL, PIXEL))
    img_p, lab_p = Path(path_image), Path(path_labels)
    img_p.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(img_p, "w", count=3, dtype="uint8", nodata=0, **profile) as img, \
            rasterio.open(lab_p, "w", count=1, dtype="uint8", nodata=0, **profile) as lab:
        img.colorinterp = [rasterio.enums.ColorInterp.red, rasterio.enums.ColorInterp.green,
                           rasterio.enums.ColorInterp.blue]
        for band, name in enumerate(("red", "green", "blue"), start=1):  # the model's input names come from here
            img.set_band_description(band, name)
        lab.write_colormap(1, {c.id: (*c.color, 255) for c in CLASSES})
        for y0 in range(0, height, strip):
            h = min(strip, height - y0)
            land = _smooth_field(rng, h, width, cell_land, y0, g_land)
            water = _smooth_field(rng, h, width, cell_water, y0, g_water)
            cls = np.where(land > 0.5, 2, 3).astype(np.uint8)
            cls[water > 0.72] = 1
            strip_box = shapely.box(0, y0, width, y0 + h)
            to_strip = Affine.translation(0, y0)
            hits = build_tree.query(strip_box)
            if len(hits):
                houses = rasterize(buildings[hits], out_shape=(h, width), transform=to_strip, dtype="uint8")
                cls[(houses > 0) & (cls != 1)] = 4
            hits = road_tree.query(strip_box)
            if len(hits):
                lanes = rasterize([roads[i] for i in hits], out_shape=(h, width), transform=to_strip, dtype="uint8")
                cls[lanes > 0] = 5
            light = 0.8 + 0.4 * _smooth_field(rng, h, width, cell_light, y0, g_light)
            rgb = SPECTRA[cls - 1].transpose(2, 0, 1) * light[None]
            rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * 14
            data = np.clip(np.rint(rgb), 1, 255).astype(np.uint8)
            corner = (np.arange(width)[None, :] + np.arange(y0, y0 + h)[:, None]) < min(width, height) * 0.18
            data[:, corner] = 0
            cls[corner] = 0
            win = Window(0, y0, width, h)
            img.write(data, window=win)
            lab.write(cls[None], window=win)
    return SyntheticScene(img_p, lab_p)
