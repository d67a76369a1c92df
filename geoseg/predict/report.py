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
    from geoseg.predict.api import RunResult


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
    for mod in ("torch", "segmentation_models_pytorch", "onnxruntime"):
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
             "confidence": _str(s.confidence_path),
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
    from geoseg.io.store import parent_and_name

    store, name = parent_and_name(path)
    store.prepare()
    return store.write_text(name, json.dumps(report, indent=2, default=str) + "\n")


def describe_path(path: str) -> dict[str, Any]:
    """Describe a model bundle or a scene, for ``geoseg info``."""
    from geoseg.io.raster import inspect_scene
    from geoseg.model.bundle import read_bundle
    from geoseg.model.contract import CONTRACT_FILE

    p = Path(path)
    if (p.is_dir() and (p / CONTRACT_FILE).exists()) or p.suffix.lower() in (".safetensors", ".onnx"):
        b = read_bundle(p)
        c = b.contract
        extra: dict[str, Any] = {}
        if b.format == "onnx":
            from geoseg.model.onnxrt import onnx_metadata

            extra["onnx_metadata"] = {k: v for k, v in onnx_metadata(b.weights_path).items() if k != "geoseg_contract"}
        return {
            "kind": "model bundle", "path": str(b.path), "name": c.name,
            "architecture": c.model.architecture, "encoder": c.model.encoder,
            "bands": c.input.bands, "band_indexes": c.input.default_indexes,
            "mean": c.input.mean, "std": c.input.std, "pixel_size_m": c.input.pixel_size,
            "classes": [{"id": k.id, "name": k.name, "color": list(k.color)} for k in c.classes],
            "chip_size": c.chip_size, "overlap": c.overlap, "weights": str(b.weights_path),
            "weights_format": b.format,
            "pretrained": c.pretrained.model_dump() if c.pretrained is not None else None,
            "metadata": c.metadata, **extra,
        }
    from geoseg.io.geodesy import areal_scale

    info = inspect_scene(path)
    desc = {"kind": "scene", **info.as_dict(), "crs_areal_scale": areal_scale(info.crs, info.bounds)}
    classes = _map_classes(path)
    if classes:
        desc["classes"] = classes
    return desc


def _map_classes(path: str) -> list[dict[str, Any]] | None:
    """A geoseg class map's classes (its ``CLASSES`` tag) with the pixel counts and areas of its attribute
    table (the ``.aux.xml`` beside it, when there is one); ``None`` for any other raster."""
    import xml.etree.ElementTree as ET

    import rasterio

    with rasterio.open(path) as ds:
        tag = ds.tags().get("CLASSES")
    try:
        classes = [dict(c) for c in json.loads(tag)] if tag else None
    except (ValueError, TypeError):
        return None
    aux = Path(f"{path}.aux.xml")
    if not classes or not aux.is_file():
        return classes
    try:
        table = ET.parse(aux).find(".//GDALRasterAttributeTable")
    except ET.ParseError:
        return classes
    if table is None:
        return classes
    fields = [f.findtext("Name") for f in table.findall("FieldDefn")]
    rows = [dict(zip(fields, (f.text for f in row.findall("F")), strict=False)) for row in table.findall("Row")]
    by_value = {_number(r.get("Value")): r for r in rows}
    for c in classes:
        row = by_value.get(float(c["id"]), {})
        for key, name in (("pixels", "Count"), ("area_m2", "Area_m2")):
            value = _number(row.get(name))
            if value is not None:
                c[key] = value
    return classes


def _number(text: str | None) -> float | None:
    """A table cell as a number; ``None`` when it is empty or not a number."""
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return "-" if v is None else str(v)


def _bundle_text(d: dict[str, Any]) -> list[str]:
    arch = d["architecture"] + (f" ({d['encoder']} encoder)" if d.get("encoder") else "")
    lines = [f"model bundle {d['name']!r}: {d['path']}",
             f"  network:  {arch}; weights {d['weights_format']} ({Path(d['weights']).name})",
             f"  chips:    {d['chip_size']} px, {d['overlap']} px overlap"
             + (f"; trained at {_fmt(d['pixel_size_m'])} m per pixel" if d.get("pixel_size_m") else "")]
    lines.append("  bands:    scene band -> input (raw-unit mean / std)")
    for name, idx, m, sd in zip(d["bands"], d["band_indexes"], d["mean"], d["std"], strict=True):
        lines.append(f"            {idx:>3} -> {name:<16} {_fmt(m, 6)} / {_fmt(sd, 6)}")
    pre = d.get("pretrained")
    if pre:
        digest = f", sha256 {pre['sha256'][:12]}" if pre.get("sha256") else ""
        lines.append(f"  encoder:  started from {pre['file']}{digest}"
                     + (f"; pretrained on {pre['pretrained_on']}" if pre.get("pretrained_on") else ""))
        if pre.get("matched"):
            lines.append("            bands: " + ", ".join(f"{b} <- {m or 'initialised'}"
                                                         for b, m in zip(d["bands"], pre["matched"], strict=False)))
    lines.append("  classes:  id  name                 colour")
    for c in d["classes"]:
        lines.append(f"            {c['id']:>3}  {c['name']:<20} #{''.join(f'{v:02x}' for v in c['color'])}")
    meta = d.get("metadata") or {}
    tr, val, exp = meta.get("training") or {}, meta.get("validation") or {}, meta.get("export") or {}
    if tr:
        lines.append(f"  training: {tr.get('epochs_run', '-')} epoch(s), {tr.get('chips_seen', '-')} chips in "
                     f"{_fmt(tr.get('seconds'), 3)} s, kept epoch {tr.get('best_epoch', '-')} ({tr.get('kept', 'best')}), stopped by "
                     f"{str(tr.get('stopped_by', 'epochs')).replace('_', ' ')}")
    if val.get("classes"):
        per = ", ".join(f"{c['name']} {_fmt(c.get('iou'), 3)}" for c in val["classes"])
        lines.append(f"  validation: mean IoU {_fmt(val.get('miou'), 3)}, accuracy {_fmt(val.get('accuracy'), 3)}; "
                     f"IoU {per}")
    if exp:
        lines.append(f"  exported: {exp.get('format')} from {exp.get('source_bundle')} (output {exp.get('output')}, "
                     f"max |diff| vs PyTorch {_fmt(exp.get('max_abs_diff'), 2)})")
    if d.get("onnx_metadata"):
        lines.append(f"  ONNX metadata keys: {', '.join(sorted(d['onnx_metadata']))}")
    lines.append("  (geoseg info --json prints the whole record, with the training config)")
    return lines


def _scene_text(d: dict[str, Any]) -> list[str]:
    lines = [f"scene: {d['path']} ({d.get('driver')})",
             f"  size:     {d['width']} x {d['height']} pixels, {d['count']} band(s) of {d['dtype']}",
             f"  grid:     {d.get('crs') or 'no CRS'}; pixel {_fmt(d.get('pixel_size_m'))} m; "
             f"area {_fmt(d.get('area_km2'), 6)} km2",
             f"  bounds:   {', '.join(_fmt(v, 10) for v in d.get('bounds') or [])}",
             f"  nodata:   {_fmt(d.get('nodata'))} (mask: {d.get('mask')}"
             + (f", alpha band {d['alpha_band']}" if d.get("alpha_band") else "") + ")",
             f"  storage:  blocks {d.get('block_shapes', [[None]])[0]}, compression {d.get('compression') or 'none'}, "
             f"overviews {d.get('overviews') or 'none'}"]
    scale = d.get("crs_areal_scale")
    if scale is not None and abs(scale - 1) > 1e-3:
        lines.append(f"  scale:    this CRS distorts sizes here: a square CRS unit is {1 / scale:.3g} ground square "
                     f"metres (areal scale {scale:.3g}); geoseg reports ground sizes (pixel, areas)")
    names = [n for n in d.get("descriptions") or [] if n]
    if names:
        lines.append(f"  bands:    {', '.join(f'{i}: {n}' for i, n in enumerate(d['descriptions'], 1) if n)}")
    classes = d.get("classes") or []
    total = sum(c.get("pixels", 0) for c in classes)
    unit, per = _area_unit(max((c.get("area_m2") or 0 for c in classes), default=0))
    if classes:
        lines.append("  classes:  id  name                 colour  " + (f"   share  {'area (' + unit + ')':>15}" if total else ""))
    for c in classes:
        colour = "#" + "".join(f"{v:02x}" for v in c.get("color", ())) if c.get("color") else "-"
        line = f"            {c['id']:>3}  {c['name']:<20} {colour:<8}"
        if total:
            line += f" {100 * c.get('pixels', 0) / total:5.1f} %"
            line += f"  {c['area_m2'] / per:15.4f}" if c.get("area_m2") is not None else ""
        lines.append(line)
    return lines


def _area_unit(largest_m2: float) -> tuple[str, float]:
    """One unit for a column of areas, by its largest: km2, ha or m2."""
    return ("km2", 1e6) if largest_m2 >= 1e6 else ("ha", 1e4) if largest_m2 >= 1e4 else ("m2", 1.0)


def describe_text(desc: dict[str, Any]) -> str:
    """:func:`describe_path`'s record as a few readable lines (``geoseg info`` without ``--json``)."""
    lines = _bundle_text(desc) if desc.get("kind") == "model bundle" else _scene_text(desc)
    return "\n".join(lines)

