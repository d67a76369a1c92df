"""Pixel-coordinate pieces to output features: CRS coordinates, areas and perimeters in metres,
``min_area``, ``to_crs``."""

from __future__ import annotations

from collections.abc import Sequence

import geopandas as gpd
import numpy as np
import shapely

from geoseg.vectorize.plan import Plan


def to_crs_coords(plan: Plan, geoms_px: np.ndarray) -> np.ndarray:
    t = plan.transform
    if t.is_identity:
        return geoms_px

    def affine(xy: np.ndarray) -> np.ndarray:
        col, row = xy[:, 0], xy[:, 1]
        # the order of GDAL's own geotransform, so that coordinates match a whole-raster polygonisation
        return np.column_stack((t.c + col * t.a + row * t.b, t.f + col * t.d + row * t.e))

    return shapely.transform(geoms_px, affine)


def measure(plan: Plan, geoms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Area (m2) and perimeter (m) of geometries in the raster's CRS."""
    if plan.area_mode == "planar":
        return shapely.area(geoms) * plan.unit_m**2, shapely.length(geoms) * plan.unit_m
    if plan.area_mode == "geodesic" and plan.geod is not None:
        area = np.empty(len(geoms))
        perim = np.empty(len(geoms))
        for i, g in enumerate(geoms):
            a, p = plan.geod.geometry_area_perimeter(g)
            area[i], perim[i] = abs(a), p
        return area, perim
    nan = np.full(len(geoms), np.nan)
    return nan, nan.copy()


def keep_mask(plan: Plan, geoms_px: np.ndarray, area_m2: np.ndarray) -> np.ndarray:
    q = plan.min_area
    if q is None or q.value <= 0:
        return np.ones(len(geoms_px), dtype=bool)
    if q.unit == "px":
        return np.asarray(shapely.area(geoms_px) >= q.value)
    return np.asarray(area_m2 >= q.value)


def finalize(plan: Plan, geoms_px: np.ndarray, classes: np.ndarray, *, filter_area: bool = True
             ) -> gpd.GeoDataFrame:
    """Turn pixel-coordinate pieces into output features: CRS coordinates, attributes, min_area, to_crs."""
    geoms = to_crs_coords(plan, geoms_px)
    area, perim = measure(plan, geoms)
    if filter_area:
        keep = keep_mask(plan, geoms_px, area)
        if not keep.all():
            geoms, classes, area, perim = geoms[keep], classes[keep], area[keep], perim[keep]
    if plan.connectivity == 8 and len(geoms):
        parts, idx = shapely.get_parts(geoms, return_index=True)
        geoms = shapely.multipolygons(parts, indices=idx)
    gdf = gpd.GeoDataFrame(
        {"class_id": classes.astype(np.int32),
         "class_name": [plan.names.get(int(k)) for k in classes],
         "area_m2": area, "perim_m": perim},
        geometry=gpd.GeoSeries(geoms, crs=plan.crs), crs=plan.crs,
    )
    if plan.out_crs is not None and plan.crs is not None and not plan.out_crs.equals(plan.crs) and len(gdf):
        gdf = gdf.to_crs(plan.out_crs)
        bad = ~gdf.geometry.is_valid.to_numpy()
        if bad.any():
            fixed = shapely.make_valid(gdf.geometry.values[bad], method="structure", keep_collapsed=False)
            gdf.loc[bad, "geometry"] = fixed
    return gdf


def empty(plan: Plan) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        {"class_id": np.zeros(0, np.int32), "class_name": np.zeros(0, object),
         "area_m2": np.zeros(0), "perim_m": np.zeros(0)},
        geometry=gpd.GeoSeries([], crs=plan.out_crs), crs=plan.out_crs,
    )


def concat(batches: Sequence[gpd.GeoDataFrame]) -> gpd.GeoDataFrame:
    import pandas as pd

    return pd.concat(batches, ignore_index=True)  # type: ignore[return-value]

