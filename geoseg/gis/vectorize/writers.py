"""Write polygons: :class:`~geoseg.gis.vectorize.features.Features` as Arrow record batches, streamed into an OGR
file or GeoParquet.

:func:`write_arrow_ogr` and :func:`write_geoparquet` take any Arrow record batches with a WKB ``geometry``
column; :mod:`geoseg.gis.mosaic` writes its merged layer with them too.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from geoseg.errors import InputError
from geoseg.gis.vectorize import formats
from geoseg.gis.vectorize.features import Features
from geoseg.gis.vectorize.formats import VectorFormat
from geoseg.gis.vectorize.plan import Plan
from geoseg.io.raster import gdal_env


def rebatch(batches: Iterator[Features], count: Callable[[Features], None]) -> Iterator[Features]:
    """Coalesce small batches into about :data:`~geoseg.gis.vectorize.formats.BATCH_FEATURES` features, each
    passed to ``count`` before it is yielded."""
    pending: list[Features] = []
    size = 0
    for b in batches:
        pending.append(b)
        size += len(b)
        if size >= formats.BATCH_FEATURES:  # read at call time, so that tests can lower it
            out = Features.concat(pending)
            pending, size = [], 0
            count(out)
            yield out
            del out
    if pending:
        out = Features.concat(pending)
        count(out)
        yield out


def arrow_schema(confidence: str | None = None) -> Any:
    """The Arrow schema of the polygon columns (:data:`~geoseg.gis.vectorize.formats.COLUMNS`), the column
    named ``confidence`` when given (``confidence_mean``; ``conf_mean`` in a shapefile, whose field names have
    at most 10 characters) and a WKB ``geometry``."""
    import pyarrow as pa

    geom = pa.field("geometry", pa.binary(), metadata={b"ARROW:extension:name": b"geoarrow.wkb"})
    extra = [(confidence, pa.float64())] if confidence else []
    return pa.schema([("class_id", pa.int32()), ("class_name", pa.string()), ("area_m2", pa.float64()),
                      ("perim_m", pa.float64()), *extra, geom])


def record_batch(plan: Plan, features: Features, schema: Any) -> Any:
    import pyarrow as pa

    extra = []
    if len(schema) == 6:  # with the confidence column
        assert features.confidence_mean is not None
        extra.append(pa.array(features.confidence_mean.astype(np.float64, copy=False)))
    return pa.record_batch([
        pa.array(features.class_id.astype(np.int32, copy=False)),
        pa.array(features.names(plan), type=pa.string()),
        pa.array(features.area_m2.astype(np.float64, copy=False)),
        pa.array(features.perim_m.astype(np.float64, copy=False)),
        *extra,
        pa.array(features.wkb, type=pa.binary()),
    ], schema=schema)


def _confidence_column(plan: Plan, fmt: VectorFormat | None) -> str | None:
    if plan.confidence is None:
        return None
    return "conf_mean" if fmt is not None and fmt.name == "shp" else "confidence_mean"


def _geometry_type(plan: Plan) -> str:
    return "MultiPolygon" if plan.connectivity == 8 else "Polygon"


def _shp_bytes(features: Features) -> int:
    """Bytes a batch adds to the larger of .shp (headers, part indexes, 16 bytes a point) and .dbf."""
    geoms = shapely.from_wkb(features.wkb)
    points = int(shapely.get_num_coordinates(geoms).sum())
    parts = shapely.get_parts(geoms)
    rings = shapely.get_num_interior_rings(parts).sum() + len(parts)
    shp = 52 * len(features) + 4 * int(rings) + 16 * points
    dbf = len(features) * (1 + 11 + 80 + 24 + 24)
    return max(shp, dbf)


# ------------------------------------------------------------------------------------ shared writers


def write_arrow_ogr(path: Path, schema: Any, batches: Iterable[Any], fmt: VectorFormat, *, layer: str,
                    geometry_type: str, crs: Any) -> None:
    """Stream Arrow record batches into the OGR file ``path`` (one layer), in bounded memory.

    Args:
        path: the file to write.
        schema: the batches' ``pyarrow.Schema``, with a WKB column ``geometry``.
        batches: the record batches; a generator may check them as they pass (e.g. a size limit).
        fmt: an OGR format (``fmt.driver`` is not ``None``).
        layer: the layer name.
        geometry_type: the layer's geometry type (``"Polygon"``, ``"MultiPolygon"``...).
        crs: the layer's ``pyproj.CRS``, or ``None``.

    Raises:
        Whatever ``batches`` raises, as itself: pyogrio reports a failing stream as a bare RuntimeError.
    """
    import pyarrow as pa
    import pyogrio

    failure: list[BaseException] = []

    def record_batches() -> Iterator[Any]:
        try:
            yield from batches
        except BaseException as exc:  # pyogrio reports a failing stream as a bare RuntimeError
            failure.append(exc)
            raise

    reader = pa.RecordBatchReader.from_batches(schema, record_batches())
    options = dict(fmt.layer_options)
    stamp = _source_date()
    if stamp is not None and fmt.name == "shp":
        options["DBF_DATE_LAST_UPDATE"] = stamp.strftime("%Y-%m-%d")
    try:
        with _ogr_current_date(stamp):
            pyogrio.write_arrow(reader, os.fspath(path), driver=fmt.driver, layer=layer, geometry_name="geometry",
                                geometry_type=geometry_type, crs=crs.to_wkt() if crs is not None else None,
                                encoding="UTF-8" if fmt.name == "shp" else None, layer_options=options or None,
                                dataset_options=dict(fmt.dataset_options) or None)
    except Exception:
        if failure:
            raise failure[0] from None
        raise


def _source_date() -> datetime.datetime | None:
    """``SOURCE_DATE_EPOCH`` (the reproducible-builds convention) as a UTC time, or ``None`` when unset.

    With it set, the dates a GeoPackage (``gpkg_contents.last_change``) or a shapefile (``.dbf`` header) records
    are that time, so the same polygons give the same bytes in any run.
    """
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return None
    try:
        return datetime.datetime.fromtimestamp(int(value), tz=datetime.timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise InputError(f"SOURCE_DATE_EPOCH={value!r}: give seconds since 1970-01-01 UTC, e.g. 1764028800") from None


@contextlib.contextmanager
def _ogr_current_date(stamp: datetime.datetime | None) -> Iterator[None]:
    """GDAL's ``OGR_CURRENT_DATE`` for pyogrio's own GDAL (rasterio.Env does not reach it), during a write."""
    if stamp is None:
        yield
        return
    import pyogrio

    # the option is process-wide: writes in several threads (scenes finishing together) share it, and the
    # last one out clears it, never one still writing
    global _date_users
    with _date_lock:
        pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": stamp.strftime("%Y-%m-%dT%H:%M:%S.000Z")})
        _date_users += 1
    try:
        yield
    finally:
        with _date_lock:
            _date_users -= 1
            if _date_users == 0:
                pyogrio.set_gdal_config_options({"OGR_CURRENT_DATE": None})


_date_lock = threading.Lock()
_date_users = 0


def write_geoparquet(path: Path, schema: Any, batches: Iterable[Any], *, geometry_types: list[str],
                     crs: Any) -> None:
    """Write Arrow record batches as GeoParquet 1.1 (WKB ``geometry`` column, zstd), one row group each.

    Args:
        path: the file to write.
        schema: the batches' ``pyarrow.Schema``, with a WKB column ``geometry``.
        batches: the record batches.
        geometry_types: the geometry types the file declares (GeoParquet's ``geometry_types``).
        crs: the geometries' ``pyproj.CRS``, or ``None`` (written as an explicit null: unknown).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    column: dict[str, Any] = {"encoding": "WKB", "geometry_types": geometry_types}
    column["crs"] = crs.to_json_dict() if crs is not None else None
    geo = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}
    schema = schema.with_metadata({b"geo": json.dumps(geo).encode()})
    geometry = schema.get_field_index("geometry")
    schema = schema.set(geometry, schema.field(geometry).remove_metadata())  # "geo" marks the WKB column
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for batch in batches:
            writer.write_batch(pa.record_batch(batch.columns, schema=schema))


# --------------------------------------------------------------------------------- vectorize's files


def write_ogr(tmp: Path, batches: Iterator[Features], plan: Plan, fmt: VectorFormat) -> None:
    """Write ``batches`` into the OGR file ``tmp`` (layer ``tmp.stem``), stopping before a shapefile's limit.

    Raises:
        InputError: a shapefile would pass the format's 2 GB limit.
    """
    schema = arrow_schema(_confidence_column(plan, fmt))

    def record_batches() -> Iterator[Any]:
        written = 0
        for features in batches:
            if fmt.size_limit is not None:
                written += _shp_bytes(features)
                if written > fmt.size_limit:
                    raise InputError(f"{tmp.name}: a shapefile past the format's 2 GB limit would be "
                                     "written; write GeoPackage instead (.gpkg, --vector-format gpkg)")
            yield record_batch(plan, features, schema)

    with gdal_env():
        write_arrow_ogr(tmp, schema, record_batches(), fmt, layer=tmp.stem,
                        geometry_type=_geometry_type(plan), crs=plan.out_crs)


def write_parquet(tmp: Path, batches: Iterator[Features], plan: Plan) -> None:
    """Write ``batches`` as the GeoParquet file ``tmp``."""
    schema = arrow_schema(_confidence_column(plan, None))
    write_geoparquet(tmp, schema, (record_batch(plan, f, schema) for f in batches),
                     geometry_types=[_geometry_type(plan)], crs=plan.out_crs)
