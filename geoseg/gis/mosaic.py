"""Job-level GIS outputs, so that the whole job opens as one layer.

* :func:`write_mosaic`: one VRT mosaic over the job's class maps;
* :func:`merge_vectors`: one vector layer over the job's per-scene polygon files, streamed batch by batch.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from geoseg.errors import InputError
from geoseg.io.store import Store, gdal_path, is_remote

log = logging.getLogger(__name__)

SCENE_COLUMN = "scene"  # the column naming each polygon's scene (fits the shapefile's 10 characters)
_WKB_POLYGON, _WKB_MULTIPOLYGON = 3, 6  # shapely type ids
_POLYGON_COLUMNS = ("class_id", "class_name", "area_m2", "perim_m")  # as geoseg.gis.vectorize.COLUMNS
_DBF_STRING = 80  # GDAL's default shapefile string width; it grows a field to at most 254 for longer values


def write_mosaic(class_maps: list[str], out: Store, name: str) -> list[str]:
    """Write ``<name>.vrt`` (one per CRS when the maps differ: ``<name>.<crs>.vrt``) into ``out``.

    Args:
        class_maps: the job's class maps (paths or URLs), in job order; later ones are drawn on top.
        out: the output folder holding them.
        name: the job's name.

    Returns:
        The paths or URLs written.
    """
    from geoseg.io.vrt import mosaic_vrts

    docs = mosaic_vrts([gdal_path(m) for m in class_maps], name)
    written = [out.write_text(filename, xml) for filename, xml in docs.items()]
    log.info("mosaic of %d class maps: %s", len(class_maps), ", ".join(written))
    return written


# ------------------------------------------------------------------------------------ merged vectors


@dataclass(frozen=True)
class _Source:
    """One scene's polygon file: where it is, how it is labelled, and its format."""

    location: str  # local path or URL, as given
    scene: str  # the value of the scene column
    fmt: Any  # geoseg.gis.vectorize.VectorFormat


@dataclass
class _Merge:
    """What the batch stream learns as it goes: the target CRS (from the first file) and counts."""

    fmt: Any  # the output VectorFormat
    work: Path  # local folder for fetched remote inputs
    crs: Any = None  # pyproj.CRS of the output, or None
    crs_known: bool = False
    crs_from: str = ""
    layer_type: str = "Polygon"  # decided from the first batch with polygons
    features: int = 0
    reprojected: list[str] = field(default_factory=list)
    shp_bytes: int = 0
    dbf_bytes: int = 0


def merge_vectors(vector_files: list[str], out: Store, name: str, vector_format: str,
                  scenes: list[str] | None = None) -> str:
    """Merge the job's per-scene polygon files into one layer ``<name><ext>`` in ``out``, streaming.

    Every scene's file is read in Arrow batches of :data:`geoseg.gis.vectorize.formats.BATCH_FEATURES`
    features and appended to the output as it is read, so memory holds one batch, never a whole scene or the
    job. The columns are ``class_id``, ``class_name``, ``area_m2``, ``perim_m``, ``scene`` and the geometry.

    The output is in the CRS of the first file (GeoJSON: always EPSG:4326, as RFC 7946 requires); batches
    of scenes in another CRS are reprojected (logged once). The geometry type is that of the first polygons
    read: a layer of MultiPolygons gets every Polygon promoted to a one-part MultiPolygon.

    Inputs given as URLs (``s3://...``) are fetched one at a time with :meth:`Store.fetch` into the staging
    folder (with a shapefile's sidecars) and removed once read: pyogrio has its own GDAL, which
    :func:`geoseg.io.raster.gdal_env` does not configure, so ``/vsis3/`` paths would miss the endpoint that
    fsspec uses. The output is built locally and published whole with :meth:`Store.staged_file`; a
    shapefile's sidecars (``.shx``, ``.dbf``, ``.prj``, ``.cpg``) are published first, the ``.shp`` last.
    When anything fails, nothing is published and the staging folder is removed.

    Args:
        vector_files: the scenes' polygon files (``.gpkg``, ``.shp``, ``.geojson``/``.json``,
            ``.parquet``/``.geoparquet``; local paths or URLs), in job order. A file without polygons is fine.
        out: the store the merged layer is published to.
        name: the job's name: the file is ``<name><ext>``, its layer (GeoPackage) ``name``.
        vector_format: the output format, a name in :data:`geoseg.gis.vectorize.FORMATS`.
        scenes: the value of the ``scene`` column for each file (e.g. the scene's path or URL), in the
            order of ``vector_files``; default the file's stem.

    Returns:
        The path or URL of the merged file (for a shapefile, the ``.shp``).

    Raises:
        InputError: no files, a missing or unreadable file, a file without the polygon columns, a file
            with no CRS among files with one, a merged shapefile past the format's 2 GB limit, or an output
            name that would replace one of the inputs.
        UnknownNameError: unknown ``vector_format``.
        StorageError: a remote input cannot be fetched, or the output cannot be published.
    """
    from geoseg.gis.vectorize import get_format

    fmt = get_format(vector_format)
    sources = _sources(vector_files, scenes)
    layer = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if not layer or not name.strip():
        raise InputError(f"{name!r}: the merged layer needs a job name; give --name")
    key = f"{name}{fmt.extensions[0]}"
    url = out.url(key)
    for src in sources:
        if _same_location(src.location, url):
            raise InputError(f"{url}: the merged layer would replace the polygons of one of its scenes; "
                             "give the job another --name")

    with out.staged_file(key) as path:
        state = _Merge(fmt=fmt, work=path.parent / ".inputs")
        batches = _batches(sources, state)
        first = _first_polygons(batches, state)  # the CRS and geometry type are known from here on
        stream = _typed(itertools.chain(first, batches), state)
        if fmt.driver is None:
            _write_parquet(path, stream, state)
        else:
            _write_ogr(path, stream, state, layer)
        for ext in fmt.sidecars:  # the .shp is published last, when the block ends
            sidecar = path.with_suffix(ext)
            if sidecar.is_file():
                out.publish(sidecar, key[: -len(path.suffix)] + ext)
    log.info("merged %d polygons of %d scenes into %s (%s%s)", state.features, len(sources), url, fmt.name,
             f"; {len(state.reprojected)} of them reprojected" if state.reprojected else "")
    return url


def _sources(vector_files: list[str], scenes: list[str] | None) -> list[_Source]:
    """The inputs with their formats and scene labels; local files are checked to exist."""
    from geoseg.gis.vectorize import format_for

    files = [os.fspath(f) for f in vector_files]
    if not files:
        raise InputError("no per-scene vector files to merge; vectorise the scenes first (give --vector-format)")
    if scenes is not None and len(scenes) != len(files):
        raise InputError(f"{len(scenes)} scene names for {len(files)} vector files; give one per file")
    sources = []
    for i, location in enumerate(files):
        basename = PurePosixPath(location.replace("\\", "/")).name
        fmt = format_for(basename)[1]
        if not is_remote(location) and not os.path.isfile(gdal_path(location)):
            raise InputError(f"{location}: no such vector file to merge; check the path, or vectorise the "
                             "scene again")
        scene = scenes[i] if scenes is not None else PurePosixPath(basename).stem
        sources.append(_Source(location, str(scene), fmt))
    return sources


def _same_location(a: str, b: str) -> bool:
    if is_remote(a) or is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(gdal_path(a)) == os.path.abspath(gdal_path(b))


# ------------------------------------------------------------------------------------------- reading


def _output_schema() -> Any:
    import pyarrow as pa

    geom = pa.field("geometry", pa.binary(), metadata={b"ARROW:extension:name": b"geoarrow.wkb"})
    return pa.schema([("class_id", pa.int32()), ("class_name", pa.string()), ("area_m2", pa.float64()),
                      ("perim_m", pa.float64()), (SCENE_COLUMN, pa.string()), geom])


@contextlib.contextmanager
def _local_copy(src: _Source, work: Path) -> Iterator[str]:
    """A local path of ``src``: the file itself, or a fetched copy (with sidecars) removed afterwards."""
    if not is_remote(src.location):
        yield gdal_path(src.location)
        return
    parent, _, basename = src.location.rstrip("/").rpartition("/")
    store = Store(parent)
    stem = PurePosixPath(basename).stem
    copies: list[Path] = []
    try:  # one scene at a time, so names never clash
        copies.append(store.fetch(basename, work / basename))
        for ext in src.fmt.sidecars:  # a shapefile reads its .shx/.dbf/.prj/.cpg beside it
            if store.exists(stem + ext):
                copies.append(store.fetch(stem + ext, work / (stem + ext)))
        yield str(copies[0])
    finally:
        for copy in copies:
            copy.unlink(missing_ok=True)


@contextlib.contextmanager
def _open_batches(path: str, src: _Source) -> Iterator[tuple[Any, str, Iterator[Any]]]:
    """``(crs, geometry column, record batches)`` of one polygon file; ``crs`` is a pyproj CRS or None."""
    import pyproj

    from geoseg.gis.vectorize import formats

    if src.fmt.driver is None:
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as pf:
            raw = (pf.schema_arrow.metadata or {}).get(b"geo")
            if raw is None:
                raise InputError(f"{src.location}: a Parquet file without GeoParquet metadata; give the "
                                 "file geoseg vectorize wrote")
            geo = json.loads(raw)
            column = geo.get("primary_column", "geometry")
            spec = geo.get("columns", {}).get(column, {})
            if str(spec.get("encoding", "WKB")).upper() != "WKB":
                raise InputError(f"{src.location}: geometry encoded as {spec.get('encoding')!r}; only WKB "
                                 "GeoParquet can be merged (rewrite it with geometry_encoding='WKB')")
            # GeoParquet: a missing "crs" means OGC:CRS84, an explicit null means unknown
            crs_spec = spec.get("crs", "OGC:CRS84")
            crs = None if crs_spec is None else pyproj.CRS.from_user_input(crs_spec)
            yield crs, column, pf.iter_batches(batch_size=formats.BATCH_FEATURES)
        return
    from pyogrio.raw import open_arrow

    with open_arrow(path, batch_size=formats.BATCH_FEATURES, use_pyarrow=True) as (meta, reader):
        crs = pyproj.CRS.from_user_input(meta["crs"]) if meta.get("crs") else None
        yield crs, meta.get("geometry_name") or "wkb_geometry", iter(reader)


def _batches(sources: list[_Source], state: _Merge) -> Iterator[Any]:
    """The record batches of every scene in turn, with the output's columns, in the output's CRS."""
    import pyarrow as pa

    schema = _output_schema()
    for src in sources:
        with _local_copy(src, state.work) as path:
            try:
                with _open_batches(path, src) as (crs, geom_column, batches):
                    transformer = _transformer(crs, src, state)
                    for batch in batches:
                        if batch.num_rows:
                            yield _conform(batch, geom_column, src, transformer, schema)
            except (RuntimeError, OSError, pa.ArrowException, json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InputError(f"{src.location}: cannot read its polygons ({_reason(exc)}); check that it is "
                                 "a vector file geoseg wrote, or vectorise the scene again") from exc
        log.debug("merged the polygons of %s", src.location)


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _transformer(crs: Any, src: _Source, state: _Merge) -> Any:
    """The transformer from ``crs`` to the output CRS (``None``: same CRS); the first file sets it."""
    import pyproj

    if not state.crs_known:
        state.crs_known, state.crs_from = True, src.location
        state.crs = pyproj.CRS.from_epsg(4326) if state.fmt.epsg4326 else crs
    if crs is None and state.crs is None:
        return None
    if crs is None and state.fmt.epsg4326:
        raise InputError(f"{src.location}: its polygons have no CRS, so they cannot be reprojected to EPSG:4326 "
                         "as GeoJSON requires; vectorise scenes with a CRS, or merge to gpkg, shp or parquet")
    if crs is None or state.crs is None:
        has, lacks = (src.location, state.crs_from) if crs is not None else (state.crs_from, src.location)
        raise InputError(f"{lacks}: its polygons have no CRS but those of {has} have one, so they cannot be "
                         "merged; vectorise scenes with a CRS (assign one to the scene)")
    if crs.equals(state.crs, ignore_axis_order=True):
        return None
    if not state.reprojected:
        target = ("EPSG:4326, as GeoJSON requires" if state.fmt.epsg4326
                  else f"{state.crs.to_string()}, the CRS of the first file {state.crs_from}")
        log.info("reprojecting the polygons of %s (%s), and of any other scene in another CRS, to %s",
                 src.location, crs.to_string(), target)
    state.reprojected.append(src.location)
    return pyproj.Transformer.from_crs(crs, state.crs, always_xy=True)


def _conform(batch: Any, geom_column: str, src: _Source, transformer: Any, schema: Any) -> Any:
    """``batch`` with the output's columns and types, the scene column, and reprojected geometries."""
    import pyarrow as pa
    import shapely

    names = set(batch.schema.names)
    missing = [c for c in (*_POLYGON_COLUMNS, geom_column) if c not in names]
    if missing:
        raise InputError(f"{src.location}: has no column {', '.join(missing)}; merge only the polygon files "
                         "geoseg vectorize wrote")
    geom = batch.column(geom_column)
    if isinstance(geom.type, pa.ExtensionType):
        geom = geom.storage
    geom = geom.cast(pa.binary())
    if transformer is not None:
        geoms = shapely.transform(shapely.from_wkb(geom.to_numpy(zero_copy_only=False)),
                                  transformer.transform, interleaved=False)
        geom = pa.array(shapely.to_wkb(geoms), type=pa.binary())
    columns = [batch.column(f.name).cast(f.type) for f in schema if f.name in _POLYGON_COLUMNS]
    scene = pa.array([src.scene] * batch.num_rows, type=pa.string())
    return pa.record_batch([*columns, scene, geom], schema=schema)


def _first_polygons(batches: Iterator[Any], state: _Merge) -> list[Any]:
    """The batches up to the first one with a geometry, which fixes the layer's geometry type."""
    import shapely

    held = []
    for batch in batches:
        held.append(batch)
        types = set(shapely.get_type_id(shapely.from_wkb(batch.column("geometry").to_numpy(zero_copy_only=False))))
        types.discard(-1)  # missing geometries
        if types:
            state.layer_type = ("MultiPolygon" if _WKB_MULTIPOLYGON in types
                                else "Polygon" if types == {_WKB_POLYGON} else "Unknown")
            break
    return held


def _typed(batches: Iterator[Any], state: _Merge) -> Iterator[Any]:
    """``batches`` with Polygons promoted to MultiPolygons in a MultiPolygon layer; counts the features."""
    import numpy as np
    import pyarrow as pa
    import shapely

    for batch in batches:
        if state.layer_type == "MultiPolygon":
            geoms = shapely.from_wkb(batch.column("geometry").to_numpy(zero_copy_only=False))
            single = np.flatnonzero(shapely.get_type_id(geoms) == _WKB_POLYGON)
            if len(single):
                geoms[single] = shapely.multipolygons(geoms[single], indices=np.arange(len(single)))
                batch = batch.set_column(batch.num_columns - 1, batch.schema.field(batch.num_columns - 1),
                                         pa.array(shapely.to_wkb(geoms), type=pa.binary()))
        state.features += batch.num_rows
        yield batch


# ------------------------------------------------------------------------------------------- writing


def _check_shapefile_size(batch: Any, path: Path, state: _Merge) -> None:
    """Stop before a merged shapefile passes the format's 2 GB limit (estimated from the WKB sizes)."""
    import pyarrow.compute as pc

    from geoseg.gis.vectorize.formats import SHAPEFILE_LIMIT_BYTES

    n = batch.num_rows
    # a .shp record is at most its polygon's WKB plus 52 bytes of headers and bounding box
    state.shp_bytes += int(pc.sum(pc.binary_length(batch.column("geometry"))).as_py() or 0) + 52 * n
    scene_width = min(254, max(_DBF_STRING, int(pc.max(pc.utf8_length(batch.column(SCENE_COLUMN))).as_py() or 0)))
    state.dbf_bytes += n * (1 + 11 + _DBF_STRING + 24 + 24 + scene_width)
    if max(state.shp_bytes, state.dbf_bytes) > SHAPEFILE_LIMIT_BYTES:
        raise InputError(f"{path.name}: the merged shapefile would pass the format's 2 GB limit; merge to "
                         "GeoPackage instead (.gpkg, --vector-format gpkg)")


def _write_ogr(path: Path, batches: Iterator[Any], state: _Merge, layer: str) -> None:
    from geoseg.gis.vectorize.writers import write_arrow_ogr

    fmt = state.fmt

    def checked() -> Iterator[Any]:
        for batch in batches:
            if fmt.size_limit is not None:
                _check_shapefile_size(batch, path, state)
            yield batch

    write_arrow_ogr(path, _output_schema(), checked(), fmt, layer=layer, geometry_type=state.layer_type,
                    crs=state.crs)


def _write_parquet(path: Path, batches: Iterator[Any], state: _Merge) -> None:
    from geoseg.gis.vectorize.writers import write_geoparquet

    # a Polygon layer may still hold a MultiPolygon from a scene vectorised with 8-connectivity
    types = {"MultiPolygon": ["MultiPolygon"], "Polygon": ["Polygon", "MultiPolygon"]}
    write_geoparquet(path, _output_schema(), batches, geometry_types=types.get(state.layer_type, []),
                     crs=state.crs)
