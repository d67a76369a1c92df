"""A finished scene as a STAC Item (``<stem>.stac.json``), so maps drop into a STAC catalogue.

The Item (STAC 1.1) has the scene's footprint in WGS 84 (its bounds, densified, through PROJ), the
projection extension (code, shape, transform, bbox in the map's own CRS), and its outputs as assets with
relative links: the class map (with the classification extension: class values, names and colours), its
style, attribute table, quicklook (role ``overview``), probabilities, confidence and polygons when written. Its
properties say which model made it (name, digest) and with which settings. ``datetime`` is the scene's
acquisition time when its GeoTIFF says it (``TIFFTAG_DATETIME``), else the time the map was made; both are
named (``geoseg:datetime_source``). A scene stacked from a STAC Item (:mod:`geoseg.io.stac_scenes`) links that
Item (``derived_from``) and carries its datetime.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import re
from typing import Any

log = logging.getLogger(__name__)

PROJECTION = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
CLASSIFICATION = "https://stac-extensions.github.io/classification/v2.0.0/schema.json"
STAC_VERSION = "1.1.0"
MEDIA = {
    "classes": "image/tiff; application=geotiff; profile=cloud-optimized",
    "probabilities": "image/tiff; application=geotiff; profile=cloud-optimized",
    "confidence": "image/tiff; application=geotiff; profile=cloud-optimized",
    "confidence_style": "text/xml",
    "quicklook": "image/png",
    "style": "text/xml",
    "attributes": "application/xml",
    "vector": {".gpkg": "application/geopackage+sqlite3", ".shp": "application/x-shapefile",
               ".geojson": "application/geo+json", ".parquet": "application/vnd.apache.parquet"},
}
ROLES = {"classes": ["data"], "probabilities": ["data"], "confidence": ["data"],
         "confidence_style": ["metadata", "style"], "quicklook": ["overview", "visual"],
         "style": ["metadata", "style"], "attributes": ["metadata"], "vector": ["data"]}
SETTINGS = ("tile_size", "overlap", "batch_size", "precision", "backend", "blend", "tta", "bands", "min_area",
            "simplify", "connectivity", "mmu", "vector_format", "compress")


def _datetime(tags: dict[str, str]) -> tuple[str, str]:
    raw = tags.get("TIFFTAG_DATETIME", "")
    m = re.match(r"^(\d{4}):(\d{2}):(\d{2}) (\d{2}):(\d{2}):(\d{2})$", raw.strip())
    if m:
        y, mo, d, h, mi, s = (int(v) for v in m.groups())
        try:
            return dt.datetime(y, mo, d, h, mi, s, tzinfo=dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), \
                "TIFFTAG_DATETIME"
        except ValueError:
            pass
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "processing"


def _footprint(info: Any) -> tuple[dict[str, Any] | None, list[float] | None]:
    """The scene's footprint in WGS 84 and its bbox; ``(None, None)`` (with a warning) when none can be made.

    The outline, densified, goes through PROJ. Where part of the scene lies off the Earth (a full-disk
    geostationary scene, whose corners are in space), the outline cannot be transformed: the footprint is
    then the union of the cells of a grid over the scene whose corners all transform (:func:`_valid_outline`).
    An optional output never fails a scene.
    """
    if info.crs is None:
        return None, None
    try:
        geom: dict[str, Any] | None = _outline(info)
    except Exception as exc:  # PROJ refuses points outside the projection's domain
        log.debug("%s: the scene's outline does not transform to WGS 84 (%s)", info.path, exc)
        geom = None
    if geom is None:
        try:
            geom = _valid_outline(info)
        except Exception as exc:
            log.debug("%s: no footprint from the transformable cells (%s)", info.path, exc)
            geom = None
    if geom is None:
        log.warning("%s: the scene's footprint cannot be expressed in WGS 84 (its corners do not transform); "
                    "its STAC Item has no geometry", info.path)
        return None, None
    coords = [c for poly in ([geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"])
              for ring_ in poly for c in ring_]
    xs, ys = [c[0] for c in coords], [c[1] for c in coords]
    return geom, [min(xs), min(ys), max(xs), max(ys)]


def _finite(geom: dict[str, Any]) -> bool:
    def flat(value: Any) -> list[float]:
        return [float(value)] if isinstance(value, int | float) else [v for item in value for v in flat(item)]

    return all(math.isfinite(v) for v in flat(geom["coordinates"]))


def _outline(info: Any) -> dict[str, Any] | None:
    """The scene's bounds, 50 points a side, through PROJ; ``None`` when a point comes back infinite."""
    from rasterio.warp import transform_geom

    left, bottom, right, top = info.bounds
    t = [i / 50 for i in range(50)]  # 50 points a side: a projected edge is a curve in WGS 84
    ring = ([(left + (right - left) * f, bottom) for f in t] + [(right, bottom + (top - bottom) * f) for f in t]
            + [(right - (right - left) * f, top) for f in t] + [(left, top - (top - bottom) * f) for f in t])
    ring.append(ring[0])
    geom = dict(transform_geom(info.crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]},
                               antimeridian_cutting=True, precision=7))
    return geom if _finite(geom) else None


def _valid_outline(info: Any, cells: int = 64) -> dict[str, Any] | None:
    """The union of the cells of a ``cells`` x ``cells`` grid over the scene whose four corners transform to
    WGS 84, as a (Multi)Polygon in WGS 84; ``None`` when no cell does, or the result crosses the antimeridian."""
    import numpy as np
    import pyproj
    import shapely
    from affine import Affine
    from rasterio.features import shapes
    from shapely.geometry import mapping, shape

    left, bottom, right, top = info.bounds
    xs, ys = np.meshgrid(np.linspace(left, right, cells + 1), np.linspace(top, bottom, cells + 1))
    to_wgs84 = pyproj.Transformer.from_crs(pyproj.CRS.from_user_input(info.crs), "EPSG:4326", always_xy=True)
    lon, lat = to_wgs84.transform(xs, ys, errcheck=False)
    ok = np.isfinite(lon) & np.isfinite(lat)
    cell_ok = ok[:-1, :-1] & ok[1:, :-1] & ok[:-1, 1:] & ok[1:, 1:]
    if not cell_ok.any():
        return None
    grid = Affine((right - left) / cells, 0, left, 0, -(top - bottom) / cells, top)
    parts = [shape(g) for g, v in shapes(cell_ok.astype(np.uint8), mask=cell_ok, transform=grid) if v]
    outline = shapely.segmentize(shapely.union_all(parts), max(grid.a, -grid.e))  # a vertex per cell side
    coords = shapely.get_coordinates(outline)
    x, y = to_wgs84.transform(coords[:, 0], coords[:, 1], errcheck=False)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return None
    geo = shapely.make_valid(shapely.set_coordinates(outline, np.column_stack((x, y))))
    geo = shapely.union_all([g for g in shapely.get_parts(geo) if g.geom_type == "Polygon"])
    lons = np.asarray(x)
    if geo.is_empty or (lons.max() - lons.min() > 180 and info.crs and not info.crs.is_geographic):
        return None  # across the antimeridian: a cut outline would need the cells' own order
    return dict(mapping(shapely.set_precision(geo, 1e-7)))


def scene_item(plan: Any, contract: Any, model_digest: str, options: Any, names: dict[str, str],
               written: set[str]) -> dict[str, Any]:
    """The STAC Item of a finished scene; ``names`` maps output kinds to file names, ``written`` holds the
    kinds written (assets link to them relative to the Item, which sits beside them)."""
    info = plan.info
    when, source = _datetime({"TIFFTAG_DATETIME": info.acquired} if info.acquired else {})
    if info.source_datetime:  # a scene stacked from a STAC Item carries the Item's own datetime
        when, source = info.source_datetime, "source item"
    geometry, bbox = _footprint(info)
    props: dict[str, Any] = {
        "datetime": when,
        "geoseg:datetime_source": source,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "title": f"{plan.stem}: land cover by {contract.name}",
        "geoseg:scene": plan.scene,
        "geoseg:model": {"name": contract.name, "digest": model_digest,
                         "architecture": contract.model.architecture, "encoder": contract.model.encoder},
        "geoseg:settings": {k: v for k, v in dataclasses.asdict(options).items() if k in SETTINGS}
                           | {"tile_size": plan.tile, "overlap": plan.overlap, "bands": list(plan.band_indexes)},
        "proj:shape": [info.height, info.width],
        "proj:transform": list(info.transform)[:6],
    }
    if info.crs is not None:
        epsg = info.crs.to_epsg() if hasattr(info.crs, "to_epsg") else None
        if epsg:
            props["proj:code"] = f"EPSG:{epsg}"
        else:
            props["proj:wkt2"] = info.crs.to_wkt()
        props["proj:bbox"] = list(info.bounds)
    if info.pixel_size_m:
        props["gsd"] = info.pixel_size_m
    classes = [{"value": c.id, "name": re.sub(r"[^-a-zA-Z0-9_]+", "_", c.name) or f"class_{c.id}",
                "title": c.name, "color_hint": "{:02X}{:02X}{:02X}".format(*c.color)}
               for c in contract.classes]
    assets: dict[str, Any] = {}
    for kind in ("classes", "style", "attributes", "quicklook", "probabilities", "confidence", "confidence_style",
                 "vector"):
        if kind not in written:
            continue
        name = names[kind]
        media = MEDIA[kind]
        if isinstance(media, dict):
            media = next((v for k, v in media.items() if name.endswith(k)), "application/octet-stream")
        asset: dict[str, Any] = {"href": f"./{name}", "type": media, "roles": ROLES[kind]}
        if kind == "classes":
            asset |= {"title": "class map", "classification:classes": classes, "nodata": 255 if max(
                c.id for c in contract.classes) < 255 else 65535}
        elif kind == "confidence":
            asset |= {"title": "confidence: the blended probability of the mapped class, value / 254",
                      "nodata": 255}
        assets[kind] = asset
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [PROJECTION, CLASSIFICATION],
        "id": plan.stem,
        "geometry": geometry,
        **({"bbox": bbox} if bbox is not None else {}),
        "properties": props,
        "links": [{"rel": "derived_from", "href": info.source_item, "type": "application/geo+json",
                   "title": "the STAC Item of the scene"}] if info.source_item else [],
        "assets": assets,
    }


__all__ = ["scene_item"]
