"""Output formats of polygon files: the registry and its aliases, and the constants of the files written."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from geoseg.errors import InputError, unknown_name

BATCH_FEATURES = 20_000  # features per write batch (one Arrow record batch / Parquet row group)
SHAPEFILE_LIMIT_BYTES = 2**31 - 1  # the .shp and .dbf formats address at most 2 GB
COLUMNS = ("class_id", "class_name", "area_m2", "perim_m")  # all fit the shapefile's 10 characters


@dataclass(frozen=True)
class VectorFormat:
    """A named output format: the OGR driver (or ``None`` for GeoParquet) and its file extensions."""

    name: str
    driver: str | None
    extensions: tuple[str, ...]
    sidecars: tuple[str, ...] = ()  # files written beside the main one, moved into place with it
    epsg4326: bool = False  # the standard fixes the CRS (RFC 7946)
    size_limit: int | None = None
    layer_options: dict[str, str] = field(default_factory=dict)
    dataset_options: dict[str, str] = field(default_factory=dict)


FORMATS: dict[str, VectorFormat] = {
    # GeoPackage 1.2: GDAL < 3.7 (Debian 12's QGIS 3.22) warns that the 1.4 files newer GDAL writes by default
    # "may only be partially supported"; nothing geoseg writes needs more than 1.2
    "gpkg": VectorFormat("gpkg", "GPKG", (".gpkg",), dataset_options={"VERSION": "1.2"}),
    # the size guess (writers.write_ogr) stops early with the advice to use GeoPackage; GDAL's own
    # 2GB_LIMIT is the backstop should the guess ever fall short
    "shp": VectorFormat("shp", "ESRI Shapefile", (".shp",), (".shx", ".dbf", ".prj", ".cpg"),
                        size_limit=SHAPEFILE_LIMIT_BYTES, layer_options={"2GB_LIMIT": "YES"}),
    "geojson": VectorFormat("geojson", "GeoJSON", (".geojson", ".json"), epsg4326=True,
                            layer_options={"RFC7946": "YES"}),
    "parquet": VectorFormat("parquet", None, (".parquet", ".geoparquet")),
}
_ALIASES = {"geopackage": "gpkg", "shapefile": "shp", "esri shapefile": "shp", "geoparquet": "parquet",
            "json": "geojson"}


def get_format(name: str) -> VectorFormat:
    """The output format called ``name`` (case-insensitive; ``shapefile``, ``geoparquet``... also accepted).

    Raises:
        UnknownNameError: ``name`` is not a known format; the message lists the valid names.
    """
    key = name.strip().lower().lstrip(".")
    key = _ALIASES.get(key, key)
    if key not in FORMATS:
        raise unknown_name("vector format", name, list(FORMATS))
    return FORMATS[key]


def format_for(dst: str | os.PathLike[str], vector_format: str | None = None) -> tuple[Path, VectorFormat]:
    """The output path and format: ``vector_format`` if given, else from the extension (default GeoPackage).

    A path without extension gets the format's extension.

    Raises:
        InputError: the extension does not match ``vector_format``, or is unknown.
        UnknownNameError: ``vector_format`` is not a known format.
    """
    path = Path(dst)
    suffix = path.suffix.lower()
    if vector_format is not None:
        fmt = get_format(vector_format)
        if not suffix:
            return path.with_suffix(fmt.extensions[0]), fmt
        if suffix not in fmt.extensions:
            raise InputError(f"{path}: extension {suffix!r} does not match vector format {fmt.name!r}; "
                             f"use {fmt.extensions[0]} or drop --vector-format")
        return path, fmt
    if not suffix:
        return path.with_suffix(".gpkg"), FORMATS["gpkg"]
    for fmt in FORMATS.values():
        if suffix in fmt.extensions:
            return path, fmt
    valid = ", ".join(e for f in FORMATS.values() for e in f.extensions)
    raise InputError(f"{path}: unknown vector extension {suffix!r}; use one of {valid} or give --vector-format")
