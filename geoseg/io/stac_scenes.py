"""Scenes as mapping teams get them: STAC Items with one raster per band, and lists of band files.

A model reads one multi-band raster. An Item (or each Item of an ItemCollection) becomes one: its assets are
chosen by the model's band names (:func:`choose_assets`), their headers read, and the chosen bands stacked
virtually onto one grid by a VRT (:func:`geoseg.io.vrt.stack_vrt`): the finest grid among them or
``resolution``, resampled on read (nearest by default, as ``gdalbuildvrt``). Nothing is copied: GDAL reads
the assets by range requests (``/vsicurl/``, ``/vsis3/``). The VRT is written into the job's output folder,
``.geoseg-scenes/<item id>.vrt``, so that the scene is a plain location any worker opens, its outputs are
named after the Item's id, and a job run again finds the same scene (resume, manifest). The VRT's metadata
carries the Item's location and datetime (:data:`geoseg.io.raster.SOURCE_ITEM_TAG`), which the output STAC Item
links (``derived_from``) and keeps.

A list of band files is stacked the same way, in the order given, all bands of each file.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from geoseg.errors import GeoSegError, InputError
from geoseg.io.raster import SOURCE_DATETIME_TAG, SOURCE_ITEM_TAG, gdal_env, open_scene
from geoseg.io.remote import is_remote, local_path
from geoseg.io.store import Store, parent_and_name
from geoseg.io.vrt import StackBand, stack_vrt

log = logging.getLogger(__name__)

__all__ = ["SCENES_FOLDER", "AssetBand", "StackedScene", "choose_assets", "is_stac", "read_items", "stack_scenes"]

SCENES_FOLDER = ".geoseg-scenes"  # in the output folder: the VRT of every stacked scene
# roles of assets that are not the scene's bands, and media types and file endings of rasters
_NOT_BANDS = {"thumbnail", "overview", "metadata"}
_RASTER_TYPES = ("tiff", "jp2", "x-vrt", "x-hdf", "netcdf")
_RASTER_ENDINGS = (".tif", ".tiff", ".jp2", ".vrt", ".img")
_STAC_ENDINGS = (".json", ".geojson")
_API_ITEM = re.compile(r"^https?://.+/collections/[^/]+/items/[^/]+/?$")


@dataclass(frozen=True)
class StackedScene:
    """A scene of a job as geoseg reads it.

    Attributes:
        source: what was given: a raster, an Item's location (``ITEM.json#id`` for an ItemCollection's
            Item), or the band files joined by ``+``.
        scene: the location geoseg reads: the stack's VRT, or ``source`` itself for a raster.
        band_indexes: the scene bands feeding the model's inputs when the stacking fixed them (an Item's
            stack holds exactly the model's bands, in order), else ``None``.
        error: why the scene could not be stacked (the job goes on with the others).
    """

    source: str
    scene: str
    band_indexes: tuple[int, ...] | None = None
    error: GeoSegError | None = None


@dataclass(frozen=True)
class AssetBand:
    """The band of an asset that feeds one model input."""

    input: str  # the model's band name
    asset: str  # the asset's key
    href: str  # absolute location of the asset
    band: int  # 1-based band of the asset's raster
    matched_by: str  # "common name", "band name" or "asset key"


def is_stac(location: str) -> bool:
    """Whether ``location`` names a STAC document: a ``.json`` or ``.geojson`` file (an Item or ItemCollection),
    or an Item of a STAC API (``.../collections/<id>/items/<id>``)."""
    name = location.split("?", 1)[0].split("#", 1)[0]
    lower = name.lower()
    return lower.endswith(_STAC_ENDINGS) or (bool(_API_ITEM.search(name)) and not lower.endswith(_RASTER_ENDINGS))


def stack_scenes(scenes: Sequence[str | Sequence[str]], bands: Sequence[str], output_dir: str, *,
                 resolution: float | None = None, resampling: str = "nearest") -> list[StackedScene]:
    """The scenes of a job, with STAC Items and lists of band files stacked into VRTs in ``output_dir``.

    Rasters pass through unchanged. An ItemCollection gives one scene per Item. A scene that cannot be
    stacked (an unreadable Item, a band no asset gives) comes back with its ``error``; the others go on.

    Args:
        scenes: rasters, STAC Items or ItemCollections (paths or URLs: ``https://``, ``s3://``), and lists
            of band files.
        bands: the model's band names, in input order.
        output_dir: the job's output folder (local or URL); the VRTs go to ``.geoseg-scenes/`` in it.
        resolution: pixel size of the stacks, in their CRS's units; default the finest of their bands.
        resampling: how bands coarser or finer than the grid are resampled (:data:`geoseg.io.vrt.RESAMPLING`).

    Returns:
        One :class:`StackedScene` per scene, in order.
    """
    out: list[StackedScene] = []
    folder = Store(Store(output_dir).url(SCENES_FOLDER))
    for entry in scenes:
        if not isinstance(entry, str):
            files = [os.fspath(f) for f in entry]
            source = "+".join(files)
            try:
                out.append(_files_scene(files, bands, folder, resolution, resampling))
            except GeoSegError as exc:
                out.append(StackedScene(source, source, error=exc))
            continue
        if not is_stac(entry):
            out.append(StackedScene(entry, entry))
            continue
        try:
            items = read_items(entry)
        except GeoSegError as exc:
            out.append(StackedScene(entry, entry, error=exc))
            continue
        for where, item in items:
            try:
                out.append(_item_scene(where, item, bands, folder, resolution, resampling))
            except GeoSegError as exc:
                out.append(StackedScene(where, where, error=exc))
    return out


# ------------------------------------------------------------------------------------------ STAC documents


def read_items(location: str) -> list[tuple[str, dict[str, Any]]]:
    """The Items of a STAC Item or ItemCollection file, each with where it comes from.

    Args:
        location: a local path, ``https://`` or ``s3://`` URL (``file://`` too).

    Returns:
        ``(where, item)`` pairs: ``where`` is ``location`` for an Item, ``location#id`` for an Item of a
        collection.

    Raises:
        InputError: the document cannot be read, is not JSON, or is neither an Item nor an ItemCollection.
        StorageError: object storage refuses the read.
    """
    doc = _read_json(location)
    kind = doc.get("type") if isinstance(doc, dict) else None
    if kind == "Feature":
        return [(location, _checked_item(location, doc))]
    if kind == "FeatureCollection":
        features = doc.get("features") or []
        if not features:
            raise InputError(f"{location}: an ItemCollection with no Items; give one with Items, or an Item")
        return [(f"{location}#{item.get('id')}", _checked_item(location, item)) for item in features]
    what = f"a STAC {kind}" if kind in ("Collection", "Catalog") else "not a STAC Item"
    raise InputError(f"{location}: is {what}; give a STAC Item or ItemCollection (type Feature or "
                     "FeatureCollection), or its rasters")


def _checked_item(location: str, item: Any) -> dict[str, Any]:
    if not isinstance(item, dict) or not isinstance(item.get("assets"), dict) or not item.get("id"):
        raise InputError(f"{location}: an Item without an id or assets; give STAC Items whose assets are the "
                         "scene's rasters")
    return item


def _read_json(location: str) -> Any:
    if location.lower().startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(location, timeout=60) as response:  # noqa: S310 (http(s) only)
                text = response.read().decode("utf-8")
        except urllib.error.HTTPError as exc:
            raise InputError(f"{location}: cannot read (HTTP {exc.code} {exc.reason}); check the URL") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise InputError(f"{location}: cannot read ({reason}); check the URL and the network") from None
    elif is_remote(location):
        store, name = parent_and_name(location)
        read = store.read_text(name)
        if read is None:
            raise InputError(f"{location}: no such object; check the key and the bucket name")
        text = read
    else:
        path = local_path(location)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise InputError(f"{location}: no such file; check the path") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{location}: cannot be read ({exc}); give a STAC Item (JSON)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{location}: is not JSON ({exc.msg}, line {exc.lineno}); give a STAC Item") from None


def _href(href: str, base: str) -> str:
    """An asset's href made absolute against the Item's location (a path or a URL)."""
    if "://" in href or href.startswith("/"):
        return local_path(href)
    base = base.split("#", 1)[0].split("?", 1)[0]
    if "://" in base:
        scheme, rest = base.split("://", 1)
        host, _, path = rest.partition("/")
        joined = posixpath.normpath(posixpath.join(posixpath.dirname("/" + path), href))
        return f"{scheme}://{host}{joined}"
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(local_path(base))), href))


# ------------------------------------------------------------------------------------------ choosing assets


def _is_band_asset(asset: dict[str, Any]) -> bool:
    """A raster asset of the scene's bands (not a thumbnail, overview picture or metadata file)."""
    roles = {str(r).lower() for r in asset.get("roles") or []}
    if roles & _NOT_BANDS and "data" not in roles:
        return False
    media = str(asset.get("type") or "").lower()
    if media:
        return any(t in media for t in _RASTER_TYPES)
    return str(asset.get("href", "")).split("?", 1)[0].lower().endswith(_RASTER_ENDINGS)


def _asset_bands(asset: dict[str, Any]) -> list[tuple[str | None, str | None]]:
    """``(common name, name)`` of each band of an asset (``eo:bands``, or STAC 1.1 ``bands``); one unnamed
    band when it lists none."""
    listed = asset.get("eo:bands") or asset.get("bands") or []
    out: list[tuple[str | None, str | None]] = []
    for b in listed if isinstance(listed, list) else []:
        b = b if isinstance(b, dict) else {}
        common, name = b.get("common_name") or b.get("eo:common_name"), b.get("name")
        out.append((str(common) if common else None, str(name) if name else None))
    return out or [(None, None)]


def choose_assets(item: dict[str, Any], bands: Sequence[str], where: str = "item") -> list[AssetBand]:
    """The asset band feeding each model input, matched by name (any case).

    An input is matched by an asset band's ``eo:bands`` common name, else by its ``eo:bands`` name, else by
    the asset's key. Only raster assets of the scene's bands count (thumbnails, overviews and metadata are
    ignored). Among equal matches a single-band ``data`` asset wins over a multi-band one (a ``visual``
    RGB picture), then the first in the Item.

    Args:
        item: the Item as a dict.
        bands: the model's band names, in input order.
        where: the Item's location, for messages and relative hrefs.

    Returns:
        One :class:`AssetBand` per input, in input order.

    Raises:
        InputError: an input no asset gives; the message names the bands the model needs and the assets.
    """
    assets = {k: a for k, a in item.get("assets", {}).items() if isinstance(a, dict) and _is_band_asset(a)}
    candidates: list[tuple[tuple[int, int, int], str, int, str | None, str | None]] = []
    for order, (key, asset) in enumerate(assets.items()):
        listed = _asset_bands(asset)
        roles = {str(r).lower() for r in asset.get("roles") or []}
        rank = (int(len(listed) > 1), int("data" not in roles and bool(roles)), order)
        for i, (common, name) in enumerate(listed, start=1):
            candidates.append((rank, key, i, common, name))
    candidates.sort(key=lambda c: c[0])
    chosen: list[AssetBand] = []
    missing: list[str] = []
    for want in bands:
        w = want.strip().casefold()
        match = None
        for how, pick in (("common name", 3), ("band name", 4), ("asset key", 1)):
            found = [c for c in candidates if c[pick] is not None and str(c[pick]).strip().casefold() == w]
            if pick == 1:  # a key names a whole asset: it says which band only when the asset has one
                found = [c for c in found if len(_asset_bands(assets[c[1]])) == 1]
            if found:
                match = (how, found[0])
                break
        if match is None:
            missing.append(want)
            continue
        how, (_, key, band, _, _) = match
        chosen.append(AssetBand(want, key, _href(str(assets[key]["href"]), where), band, how))
    if missing:
        def describe(key: str) -> str:
            names = [str(c or n) for c, n in _asset_bands(assets[key]) if c or n]
            return f"{key} ({', '.join(names)})" if names else key

        have = ", ".join(describe(k) for k in assets) or "none"
        raise InputError(f"{where}: no asset gives the model's band(s) {', '.join(missing)} (the model needs "
                         f"{', '.join(bands)}); its raster assets: {have}; give an Item with those bands, named by "
                         "eo:bands common_name or name, or by asset key")
    return chosen


# ------------------------------------------------------------------------------------------ stacking


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "scene"


def _item_location(item: dict[str, Any], where: str) -> str:
    """Where the Item lives: its ``self`` link, else the location it was read from (absolute)."""
    for link in item.get("links") or []:
        if isinstance(link, dict) and link.get("rel") == "self" and link.get("href"):
            return str(link["href"])
    return where if "://" in where else os.path.abspath(local_path(where))


def _item_datetime(item: dict[str, Any]) -> str | None:
    props = item.get("properties") or {}
    value = props.get("datetime") or props.get("start_datetime")
    return str(value) if value else None


def _tiff_datetime(iso: str | None) -> str | None:
    """An ISO 8601 datetime as ``TIFFTAG_DATETIME`` writes it (``YYYY:MM:DD HH:MM:SS``, UTC)."""
    if not iso:
        return None
    try:
        when = dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is not None:
        when = when.astimezone(dt.timezone.utc)
    return when.strftime("%Y:%m:%d %H:%M:%S")


def _headers(hrefs: Sequence[str], where: str) -> dict[str, Any]:
    """The header of each distinct raster: ``{href: (width, height, transform, crs, dtypes, nodatas, blocks,
    descriptions, tags)}``."""
    out: dict[str, Any] = {}
    with gdal_env():
        for href in dict.fromkeys(hrefs):
            try:
                with open_scene(href) as ds:
                    out[href] = (ds.width, ds.height, ds.transform, ds.crs, ds.dtypes, ds.nodatavals,
                                 ds.block_shapes, ds.descriptions, ds.tags())
            except InputError as exc:
                raise InputError(f"{where}: {exc}") from None
    return out


def _stack(where: str, parts: Sequence[tuple[str, int, str]], headers: dict[str, Any], resolution: float | None,
           resampling: str, tags: dict[str, str]) -> str:
    """The VRT of ``parts`` (``(href, band, description)``), checked to share one CRS."""
    crs = {href: headers[href][3] for href, _, _ in parts}
    first = next(iter(crs.values()))
    other = [h for h, c in crs.items() if c != first]
    if other:
        raise InputError(f"{where}: its bands are on different CRSs ({first} and {crs[other[0]]} of {other[0]}); "
                         "a stack needs one CRS: warp the bands onto one (gdalwarp -t_srs) first")
    stack = []
    for href, band, description in parts:
        width, height, transform, _, dtypes, nodatas, blocks, _, _ = headers[href]
        if not 1 <= band <= len(dtypes):
            raise InputError(f"{where}: {href} has {len(dtypes)} band(s), not band {band} its Item lists; fix the "
                             "Item's eo:bands")
        stack.append(StackBand(href, band, width, height, transform, dtypes[band - 1], nodatas[band - 1],
                               tuple(blocks[band - 1]), description))
    return stack_vrt(stack, first, resolution, resampling, tags)


def _item_scene(where: str, item: dict[str, Any], bands: Sequence[str], folder: Store, resolution: float | None,
                resampling: str) -> StackedScene:
    chosen = choose_assets(item, bands, where)
    for a in chosen:
        log.info("%s: model input %s <- asset %s band %d (by %s): %s", where, a.input, a.asset, a.band,
                 a.matched_by, a.href)
    headers = _headers([a.href for a in chosen], where)
    when = _item_datetime(item)
    tags = {SOURCE_ITEM_TAG: _item_location(item, where)}
    if when:
        tags[SOURCE_DATETIME_TAG] = when
        tiff = _tiff_datetime(when)
        if tiff:
            tags["TIFFTAG_DATETIME"] = tiff
    xml = _stack(where, [(a.href, a.band, a.input) for a in chosen], headers, resolution, resampling, tags)
    vrt = folder.write_text(f"{_safe_name(str(item['id']))}.vrt", xml)
    log.info("%s: stacked as %s", where, vrt)
    return StackedScene(where, vrt, tuple(range(1, len(chosen) + 1)))


def _files_scene(files: Sequence[str], bands: Sequence[str], folder: Store, resolution: float | None,
                 resampling: str) -> StackedScene:
    source = "+".join(files)
    if not files:
        raise InputError("an empty list of band files; give the scene's band rasters in the model's band order")
    headers = _headers(files, source)
    parts: list[tuple[str, int, str]] = []
    for f in files:
        descriptions = headers[f][7]
        stem = _stem(f)
        parts += [(f, i, d or (stem if len(descriptions) == 1 else f"{stem}:{i}"))
                  for i, d in enumerate(descriptions, start=1)]
    first_tags = headers[files[0]][8]
    tags = {"TIFFTAG_DATETIME": first_tags["TIFFTAG_DATETIME"]} if first_tags.get("TIFFTAG_DATETIME") else {}
    xml = _stack(source, parts, headers, resolution, resampling, tags)
    vrt = folder.write_text(f"{_safe_name(_common_stem(files))}.vrt", xml)
    log.info("%s: stacked as %s", source, vrt)
    # as many bands as the model takes: the files are its inputs in order, whatever indexes it recorded
    return StackedScene(source, vrt, tuple(range(1, len(bands) + 1)) if len(parts) == len(bands) else None)


def _stem(location: str) -> str:
    name = re.split(r"[/\\]", location.split("?", 1)[0].rstrip("/"))[-1]
    return name.rsplit(".", 1)[0] if "." in name else name


def _common_stem(files: Sequence[str]) -> str:
    """The name the band files share (``T33_B02.tif``, ``T33_B03.tif`` -> ``T33``), else the first's."""
    stems = [_stem(f) for f in files]
    prefix = os.path.commonprefix(stems).rstrip("_-. ")
    return prefix if len(prefix) >= 3 else stems[0]
