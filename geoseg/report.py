"""Run reports and descriptions: what ran, with which settings, how fast, and with how much memory."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoseg import __version__

if TYPE_CHECKING:
    from geoseg.predict import RunResult


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far, in MB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 1024 / 1024


def versions() -> dict[str, str]:
    """Versions of geoseg and the libraries that shape its results."""
    import numpy
    import rasterio

    out = {"geoseg": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
           "rasterio": rasterio.__version__, "gdal": rasterio.__gdal_version__}
    for mod in ("torch", "segmentation_models_pytorch"):
        m = sys.modules.get(mod)
        if m is not None:
            out[mod] = getattr(m, "__version__", "?")
    return out


def run_report(run: RunResult) -> dict[str, Any]:
    """A JSON-ready report of a predict job: every scene's status, the settings used, speed and files."""
    done = [s for s in run.scenes if s.status == "done"]
    mpix = run.pixels / 1e6
    area = sum(s.area_km2 or 0.0 for s in done)
    hours = run.seconds / 3600
    opts = dataclasses.asdict(run.options)
    if callable(opts.get("blend")):
        opts["blend"] = getattr(opts["blend"], "__name__", "custom")
    files = [f for s in run.scenes if s.status == "done" for f in s.files] + list(run.files)
    return {
        "geoseg_report": 2,
        "status": "failed" if len(run.failed) == len(run.scenes) else "partial" if run.failed else "done",
        "inputs": [s.scene for s in run.scenes],
        "outputs": [
            {"scene": s.scene, "status": s.status, "error": s.error,
             "classes": _str(s.classes_path), "probabilities": _str(s.probabilities_path),
             "vector": _str(s.vector_path), "files": s.files,
             "width": s.width, "height": s.height, "chips": s.chips, "chips_computed": s.chips_computed,
             "chips_skipped": s.chips_skipped, "rows_resumed": s.rows_resumed, "bands": s.band_indexes,
             "seconds": round(s.seconds, 3), "warnings": s.warnings}
            for s in run.scenes
        ],
        "files": files,
        "model": {"path": run.model_path, "name": run.model.name, "architecture": run.model.model.architecture,
                  "encoder": run.model.model.encoder, "classes": [c.name for c in run.model.classes]},
        "settings": {**opts, "tile_size": done[0].tile_size if done else None,
                     "overlap": done[0].overlap if done else None,
                     "device": run.device, "amp": run.amp, "scheduler": run.scheduler,
                     "output_dir": run.output_dir},
        "workers": run.workers,
        "seconds": round(run.seconds, 3),
        "stage_seconds": {k: round(v, 3) for k, v in run.stage_seconds.items()},
        "stage_seconds_note": "busy seconds summed over threads and workers; stages overlap, so they can add "
                              "up to more than the wall time",
        "megapixels": round(mpix, 3),
        "mpix_per_s": round(mpix / run.seconds, 4) if run.seconds else None,
        "km2_per_hour": round(area / hours, 2) if hours and area else None,
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "peak_memory_note": "of the process that drove the job (with a cluster, workers are not included)",
        "versions": versions(),
    }


def _str(p: Any) -> str | None:
    return None if p is None else str(p)


def write_report(path: str | os.PathLike[str], report: dict[str, Any]) -> str:
    """Write a JSON report whole (a local path or a URL); returns where it went."""
    from geoseg.store import parent_and_name

    store, name = parent_and_name(path)
    store.prepare()
    return store.write_text(name, json.dumps(report, indent=2, default=str) + "\n")


def describe_path(path: str) -> dict[str, Any]:
    """Describe a model bundle or a scene, for ``geoseg info``."""
    from geoseg.bundle import CONTRACT_FILE, read_bundle
    from geoseg.raster import inspect_scene

    p = Path(path)
    if (p.is_dir() and (p / CONTRACT_FILE).exists()) or p.suffix.lower() in (".safetensors", ".onnx"):
        b = read_bundle(p)
        c = b.contract
        extra: dict[str, Any] = {}
        if b.format == "onnx":
            from geoseg.weights import onnx_metadata

            extra["onnx_metadata"] = {k: v for k, v in onnx_metadata(b.weights_path).items() if k != "geoseg_contract"}
        return {
            "kind": "model bundle", "path": str(b.path), "name": c.name,
            "architecture": c.model.architecture, "encoder": c.model.encoder,
            "bands": c.input.bands, "band_indexes": c.input.default_indexes,
            "mean": c.input.mean, "std": c.input.std, "pixel_size_m": c.input.pixel_size,
            "classes": [{"id": k.id, "name": k.name, "color": list(k.color)} for k in c.classes],
            "chip_size": c.chip_size, "overlap": c.overlap, "weights": str(b.weights_path),
            "weights_format": b.format, "metadata": c.metadata, **extra,
        }
    return {"kind": "scene", **inspect_scene(path).as_dict()}
