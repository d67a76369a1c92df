"""Finish a scene: its staged strips -> one COG per output (colours, names, QGIS style) -> polygons -> published.

Runs once per scene, after all of its units, wherever the scheduler puts it. The strips of every unit are
assembled by a VRT (no pixel is copied twice), GDAL's COG driver writes the final file in a local scratch
folder, the polygons are made from that file, and every output is then published whole under its final
name (``os.replace`` locally, a whole upload to object storage): the class map last, so a class map under
its final name means the scene's other outputs are there too.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rasterio.shutil

from geoseg.errors import GeoSegError
from geoseg.gis.stac_item import scene_item
from geoseg.io.profiles import (
    OutputSpec,
    classes_spec,
    cog_options,
    confidence_qml,
    confidence_spec,
    probabilities_spec,
    qml_style,
)
from geoseg.io.raster import BLOCK, gdal_env
from geoseg.io.staging import full_disk_as_error
from geoseg.io.store import Store, local_workdir
from geoseg.predict.units import ModelRef, PredictOptions, ScenePlan, Unit, parse_strip, strip_key

log = logging.getLogger(__name__)


@dataclass
class FinishResult:
    """A finished scene: its outputs (kind -> path or URL), the names of every file it published in the output
    folder, and the seconds it took."""

    stem: str
    outputs: dict[str, str]
    files: list[str]
    seconds: dict[str, float] = field(default_factory=lambda: {"cog": 0.0, "vectorize": 0.0})


def output_names(stem: str, vector_format: str | None) -> dict[str, str]:
    """File names of a scene's outputs: ``classes``, ``style``, ``probabilities``, ``confidence`` (with its
    ``confidence_style``) and, with polygons, ``vector``."""
    names = {"classes": f"{stem}.classes.tif", "style": f"{stem}.classes.qml", "probabilities": f"{stem}.probs.tif",
             "confidence": f"{stem}.confidence.tif", "confidence_style": f"{stem}.confidence.qml",
             "attributes": f"{stem}.classes.tif.aux.xml", "quicklook": f"{stem}.quicklook.png",
             "stac": f"{stem}.stac.json"}
    if vector_format is not None:
        from geoseg.gis.vectorize import get_format

        names["vector"] = f"{stem}{get_format(vector_format).extensions[0]}"
    return names


def finish_scene(plan: ScenePlan, units: list[Unit], model: ModelRef, options: PredictOptions) -> FinishResult:
    """Assemble, convert, vectorise and publish one scene whose units have all run.

    Raises:
        GeoSegError: a strip is missing from the staging folder (run the job again to make it).
    """
    contract = model.read().contract
    tags = {"GEOSEG_MODEL": contract.name, "GEOSEG_TILE_SIZE": str(plan.tile), "GEOSEG_OVERLAP": str(plan.overlap)}
    specs = {"classes": classes_spec(contract.classes, tags)}
    if options.probabilities:
        specs["probabilities"] = probabilities_spec(contract.classes, options.probabilities_dtype, tags)
    if options.confidence:
        specs["confidence"] = confidence_spec(tags)
    names = output_names(plan.stem, options.vector_format)
    out, stage = Store(plan.output_dir), Store(plan.staging)
    result = FinishResult(plan.stem, {}, [])
    work = Path(stage.url()) if not stage.remote else local_workdir(out, plan.stem)
    scratch = Path(tempfile.mkdtemp(prefix=".finish-", dir=work))
    try:
        with full_disk_as_error(plan.output_dir, scratch):  # measured before the partial files go
            t0 = time.perf_counter()
            cogs = {kind: _cog(plan, units, kind, spec, stage, work, scratch, options.compress,
                               options if kind == "classes" else None)
                    for kind, spec in specs.items()}
            result.seconds["cog"] = time.perf_counter() - t0
            if options.vector_format is not None:
                t0 = time.perf_counter()
                vector_dir = scratch / "vector"
                _vectorize(cogs["classes"], vector_dir / names["vector"], contract, options, cogs.get("confidence"))
                for f in sorted(vector_dir.iterdir(), key=lambda f: f.name == names["vector"]):  # main file last
                    out.publish(f, f.name)
                    result.files.append(f.name)
                result.outputs["vector"] = out.url(names["vector"])
                result.seconds["vectorize"] = time.perf_counter() - t0
            if "probabilities" in cogs:
                result.outputs["probabilities"] = out.publish(cogs["probabilities"], names["probabilities"])
            result.outputs["style"] = out.write_text(names["style"], qml_style(contract.classes))
            t0 = time.perf_counter()
            for kind, path in _sidecars(plan, cogs["classes"], contract, names, scratch, options,
                                        cogs.get("confidence")).items():
                result.outputs[kind] = out.publish(path, names[kind])
            if "confidence" in cogs:  # after the quicklook, which reads it
                result.outputs["confidence"] = out.publish(cogs["confidence"], names["confidence"])
                result.outputs["confidence_style"] = out.write_text(names["confidence_style"], confidence_qml())
            item = scene_item(plan, contract, model.digest, options, names, {*result.outputs, "classes"})
            result.outputs["stac"] = out.write_text(names["stac"], json.dumps(item, indent=1) + "\n")
            result.seconds["cog"] += time.perf_counter() - t0
            if options.overwrite:  # the outputs of one stem come from one run: drop what this run does not write
                _remove_stale(out, plan.stem, set(result.files) | {names[k] for k in result.outputs})
            result.outputs["classes"] = out.publish(cogs["classes"], names["classes"])
            result.files += [names[k] for k in ("probabilities", "confidence", "confidence_style", "style",
                                                "attributes", "quicklook", "stac", "classes") if k in result.outputs]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if stage.remote:
            shutil.rmtree(work, ignore_errors=True)
    return result


def _remove_stale(out: Store, stem: str, written: set[str]) -> None:
    """Remove the outputs of ``stem`` an earlier run wrote and this one does not (probabilities, polygons of
    any format with their sidecars)."""
    from geoseg.gis.vectorize import FORMATS

    stale = [f"{stem}.probs.tif", f"{stem}.confidence.tif", f"{stem}.confidence.qml", f"{stem}.quicklook.png"]
    for fmt in FORMATS.values():
        stale += [f"{stem}{ext}" for ext in (fmt.extensions[0], *fmt.sidecars)]
    for name in stale:
        if name not in written and out.exists(name):
            log.info("%s: removed, an output of an earlier run that this one does not write", out.url(name))
            out.remove(name)


def _sidecars(plan: ScenePlan, classes: Path, contract: Any, names: dict[str, str], scratch: Path,
              options: PredictOptions, confidence: Path | None = None) -> dict[str, Path]:
    """The class map's attribute table (``.aux.xml``: exact pixel counts and areas) and, unless turned off,
    its quicklook picture (with the confidence map as a second panel when there is one), written into
    ``scratch``."""
    from geoseg.gis.quicklook import class_counts, rat_aux_xml, write_quicklook

    counts = class_counts(classes, contract.class_ids)
    px_m = plan.info.pixel_size_m
    out = {"attributes": scratch / names["attributes"]}
    out["attributes"].write_text(rat_aux_xml(contract.classes, counts, px_m * px_m if px_m else None))
    if options.quicklook:
        out["quicklook"] = write_quicklook(classes, scratch / names["quicklook"], contract.classes, counts, px_m,
                                           title=f"{plan.stem}: {contract.name}", confidence_path=confidence)
    return out


def _cog(plan: ScenePlan, units: list[Unit], kind: str, spec: OutputSpec, stage: Store, work: Path,
         scratch: Path, compress: str, sieve: PredictOptions | None = None) -> Path:
    """The COG of output ``kind`` built from its strips; strips of a remote stage are fetched first.

    With ``sieve`` and its ``mmu``, the assembled map is first sieved whole (:func:`geoseg.gis.sieve.sieve_raster`,
    streamed) and the COG is made from the sieved pixels under the same VRT metadata: the published map (and
    the polygons, attribute table, quicklook and STAC item made from it) is GDAL's sieve of the whole
    predicted map, whatever the units, strips, scheduler or resume point that made it.
    """
    from geoseg.io.vrt import strips_vrt

    staged = {parse_strip(n) for n in stage.list(kind)}
    sources = []
    for u in units:
        for row in u.strip_rows:
            if (row, u.c0, u.c1) not in staged:
                raise GeoSegError(f"{plan.scene}: strip {strip_key(kind, row, u.c0, u.c1)} is missing from "
                                  f"{stage.url()}; run the same command again to make it")
            key = strip_key(kind, row, u.c0, u.c1)
            if stage.remote:
                stage.fetch(key, work / key)
            sources.append((key, rasterio.windows.Window(u.c0, row, u.c1 - u.c0, min(BLOCK, u.r1 - row))))
    info = plan.info
    vrt = work / f"{kind}.vrt"
    vrt.write_text(strips_vrt(info.width, info.height, info.crs, info.transform, spec, sources))
    sieved = None
    if sieve is not None and sieve.mmu is not None:
        from geoseg.gis.sieve import sieve_raster

        sieved = work / f"{kind}.sieved.tif"
        sieve_raster(vrt, sieved, sieve.mmu, sieve.connectivity, compress=None, overwrite=True,
                     workers=sieve.resolved_workers())
        whole = rasterio.windows.Window(0, 0, info.width, info.height)
        vrt.write_text(strips_vrt(info.width, info.height, info.crs, info.transform, spec, [(sieved.name, whole)]))
    cog = scratch / f"{kind}.tif"
    with gdal_env():
        rasterio.shutil.copy(vrt, cog, **cog_options(spec, compress))
    vrt.unlink()
    if sieved is not None:
        sieved.unlink()
    return cog


def _vectorize(classes: Path, dst: Path, contract: Any, options: PredictOptions, confidence: Path | None) -> None:
    from geoseg.gis.vectorize import vectorize_raster

    dst.parent.mkdir(parents=True, exist_ok=True)
    bg = [contract.background_class] if contract.background_class is not None else []
    vectorize_raster(classes, dst, vector_format=options.vector_format, connectivity=options.connectivity,
                     min_area=options.min_area, simplify=options.simplify, skip_classes=bg,
                     class_names={k.id: k.name for k in contract.classes}, workers=options.resolved_workers(),
                     confidence=confidence)
