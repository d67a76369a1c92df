"""Units of work: plain, picklable data that says which part of which scene to predict, and how.

The flow is ``scene -> units -> staged strips -> finished outputs``:

- a :class:`ScenePlan` is one scene checked against the model (its header, the bands that feed the model,
  the chip grid, where its outputs and its staging folder are);
- a :class:`Unit` is a rectangle of that scene's output, rows ``[r0, r1)`` x columns ``[c0, c1)`` aligned
  with the 512-pixel output tiles, with everything a process needs to compute it: the scene plan, the
  model's path and digest, and the options. No closures, no threads, no open files: a unit can be pickled,
  sent to another process or machine and run there with nothing but the bundle and the scene URL;
- each unit writes its output in *strips* of 512 rows, each a small GeoTIFF staged under the scene's
  staging folder; the finishing step assembles the strips of every unit into the final COG.

Chips come from one global grid per scene, so the same pixels come out whatever the split.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from geoseg.errors import InputError
from geoseg.io.raster import BLOCK, SceneInfo
from geoseg.io.workers import default_workers
from geoseg.predict.tiling import ChipGrid

STAGING = ".geoseg-staging"  # hidden folder in the output folder, one sub-folder per scene being made
SETTINGS_FILE = "settings.json"  # in a scene's staging folder: the fingerprint its strips were made with


@dataclass
class PredictOptions:
    """Settings of a predict run. ``None`` means: take it from the model bundle (or a default)."""

    tile_size: int | None = None
    overlap: int | None = None
    batch_size: int | str = "auto"  # chips per model call; auto: chosen per device (geoseg.predict.hardware)
    device: str = "auto"
    precision: str = "auto"
    # what runs the network: eager PyTorch or onnxruntime (CPU), geoseg.predict.backends; openvino (ONNX bundles);
    # auto: the fastest by a probe, made concrete once per job (geoseg.predict.runtime.choose_backend)
    backend: str = "eager"
    workers: int | None = None
    bands: list[int] | None = None
    blend: Any = "cosine"
    probabilities: bool = False
    probabilities_dtype: str = "uint8"
    confidence: bool = False  # <stem>.confidence.tif: the blended top-class probability (uint8, 254 = 1)
    compress: str = "deflate"
    overwrite: bool = False
    tta: bool = False
    panel_width: int = 8192
    unit_rows: int | None = None  # rows per unit (a multiple of 512); None: whole panels, top to bottom
    vector_format: str | None = "gpkg"  # "gpkg", "shp", "geojson", "parquet"; None: no polygons
    min_area: float | str | None = None
    simplify: float | str | None = None
    connectivity: int = 4
    mmu: float | str | None = None  # minimum mapping unit: the class map is sieved (GDAL's sieve) before all else
    quicklook: bool = True  # <stem>.quicklook.png beside the class map
    resolution: float | None = None  # pixel size of stacked scenes (STAC Items, band files); None: finest band
    resampling: str = "nearest"  # of stacked bands onto that grid (geoseg.io.vrt.RESAMPLING)

    def resolved_workers(self) -> int:
        return self.workers if self.workers and self.workers > 0 else default_workers()


@dataclass(frozen=True)
class ModelRef:
    """A model bundle by path and content digest: what a worker needs to load (and check) the model."""

    path: str
    digest: str

    def read(self) -> Any:
        """The :class:`~geoseg.model.bundle.Bundle` named here; a URL is fetched (a cached copy of this digest is reused)."""
        from geoseg.io.remote import is_remote
        from geoseg.model.bundle import fetch_bundle, read_bundle

        return read_bundle(fetch_bundle(self.path, self.digest) if is_remote(self.path) else self.path)


@dataclass(frozen=True)
class ScenePlan:
    """One scene, checked against the model: everything its units and its finishing step share."""

    info: SceneInfo
    stem: str
    band_indexes: tuple[int, ...]
    tile: int
    overlap: int
    output_dir: str  # local folder or URL
    fingerprint: str
    warnings: tuple[str, ...] = field(default=())

    @property
    def scene(self) -> str:
        return self.info.path

    @property
    def grid(self) -> ChipGrid:
        return ChipGrid(self.info.width, self.info.height, self.tile, self.overlap)

    @property
    def staging(self) -> str:
        """The scene's staging folder (local path or URL), beside its outputs."""
        from geoseg.io.store import Store

        return Store(self.output_dir).url(f"{STAGING}/{self.stem}")


@dataclass(frozen=True)
class Unit:
    """Rows ``[r0, r1)`` x columns ``[c0, c1)`` of one scene's outputs (see the module docstring)."""

    scene: ScenePlan
    model: ModelRef
    options: PredictOptions
    c0: int
    c1: int
    r0: int
    r1: int

    @property
    def pixels(self) -> int:
        return (self.c1 - self.c0) * (self.r1 - self.r0)

    @property
    def strip_rows(self) -> list[int]:
        """First row of each strip of this unit."""
        return list(range(self.r0, self.r1, BLOCK))

    def chips(self) -> int:
        """Chips this unit computes when it starts at its first row."""
        g = self.scene.grid
        return len(g.rows_touching(self.r0, self.r1)) * len(g.cols_touching(self.c0, self.c1))


STAGED_KINDS = ("classes", "probabilities", "confidence")  # outputs staged in strips, one folder each


def staged_outputs(options: PredictOptions) -> list[str]:
    """The outputs a run stages in strips: ``classes``, and ``probabilities`` and ``confidence`` when asked for."""
    return ["classes"] + [k for k in STAGED_KINDS[1:] if getattr(options, k)]


def strip_key(output: str, row: int, c0: int, c1: int) -> str:
    """Staging key of the strip of ``output`` (``classes``, ``probabilities`` or ``confidence``) at ``row``, columns ``[c0, c1)``."""
    return f"{output}/r{row:07d}_c{c0:07d}-{c1:07d}.tif"


_STRIP = re.compile(r"^r(\d{7})_c(\d{7})-(\d{7})\.tif$")


def parse_strip(name: str) -> tuple[int, int, int] | None:
    """``(row, c0, c1)`` of a strip file name, or ``None`` for anything else (temporary files)."""
    m = _STRIP.match(name)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def plan_units(scene: ScenePlan, model: ModelRef, options: PredictOptions) -> list[Unit]:
    """Split a scene into units: panels of at most ``panel_width`` columns, cut into ``unit_rows`` bands.

    Both are multiples of the 512-pixel output tile. Without ``unit_rows`` a unit is a whole panel,
    processed top to bottom without recomputing any chip; each extra row band recomputes about one chip
    row at its top edge (its halo).
    """
    from geoseg.predict.tiling import panels

    width, height = scene.info.width, scene.info.height
    rows = options.unit_rows or height
    if options.unit_rows is not None and (rows < BLOCK or rows % BLOCK):
        raise InputError(f"unit rows {rows}: must be a positive multiple of {BLOCK}")
    bands = [(r, min(r + rows, height)) for r in range(0, height, rows)]
    return [Unit(scene, model, options, c0, c1, r0, r1)
            for c0, c1 in panels(width, options.panel_width, BLOCK) for r0, r1 in bands]


# options added after fingerprints were first recorded, with the value that gives the outputs of before
_NEWER_OPTIONS: dict[str, Any] = {"resolution": None, "resampling": "nearest", "mmu": None, "confidence": False}


def fingerprint(info: SceneInfo, band_indexes: list[int], tile: int, overlap: int, model: ModelRef,
                options: PredictOptions) -> str:
    """A digest of everything that shapes a scene's outputs (not where they go, nor how fast they come).

    Staged strips and finished scenes are reused only under the same fingerprint.
    """
    opts = asdict(options)
    for k in ("device", "workers", "overwrite"):
        opts.pop(k)
    for k, default in _NEWER_OPTIONS.items():  # at their defaults, scenes finished before they existed stay done
        if opts[k] == default:
            opts.pop(k)
    if callable(opts["blend"]):
        opts["blend"] = f"{opts['blend'].__module__}.{opts['blend'].__qualname__}"
    data = {
        "scene": [info.path, info.width, info.height, info.count, info.dtype, list(info.transform)[:6],
                  info.crs.to_wkt() if info.crs else None, info.nodata],
        "bands": band_indexes, "tile": tile, "overlap": overlap, "model": model.digest, "options": opts,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:32]
