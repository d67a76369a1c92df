"""Assess a class map against interpreted reference points: accuracy and area with confidence intervals.

:func:`assess` reads the points (any vector file; reprojected to the map's CRS), reads the map class under
each point from the map itself (the stratum), matches each point's reference class (a class id, or a class
name of the map), builds the error matrix in sample counts and applies the stratified estimators of
:mod:`geoseg.assess.estimate` with the map's exact pixel counts as strata sizes
(:func:`geoseg.assess.strata.read_strata`). Points outside the map, on nodata, without a reference class, or
with a reference class the map does not know are left out, each named in one warning and listed in the
report, never dropped silently.

It writes four files into the output folder, each whole (built aside and moved into place; the JSON last):

* ``<stem>.assessment.json``: ``overall_accuracy`` and ``overall_accuracy_ci95``; ``classes``, one record per
  class with ``id``, ``name``, ``map_pixels``, ``map_area_m2``, ``area_m2``, ``area_m2_ci95``, ``area_ha``,
  ``area_ha_ci95``, ``users_accuracy(_ci95)``, ``producers_accuracy(_ci95)``, the sample points mapped as
  it and labelled as it; the ``error_matrix`` in ``counts`` and in estimated area ``proportions`` (rows:
  map, columns: reference); the points left out and why. ``_ci95`` is the half-width of the 95 % confidence
  interval, 1.96 standard errors; undefined values are ``null``.
* ``<stem>.assessment.md``: the same as tables.
* ``<stem>.assessment.csv``: the per-class table.
* ``<stem>.assessment.png``: per class, the map's area beside the estimated area with its interval.

``<stem>`` is the map's file name without ``.tif`` and without geoseg's ``.classes``.

The strata weights are the map's pixel shares, as sampling draws pixels with equal chances within a stratum,
and the estimated areas are those shares of the map's ground area. On a geographic CRS the pixels of one map
differ in ground area with latitude (by ``cos(latitude)``: 0.5 % across one degree at 45 degrees), so there the
areas treat every pixel of the map as of the map's mean pixel area.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import shapely

from geoseg.assess.estimate import Z95, Estimate, stratified_estimate
from geoseg.assess.strata import MapStrata, read_strata, values_at
from geoseg.errors import InputError
from geoseg.io.raster import check_writable, scene_stem
from geoseg.io.store import Store

log = logging.getLogger(__name__)

METHOD = ("stratified estimators of Olofsson et al. 2014 (Remote Sensing of Environment 148, 42-57), strata = "
          "map classes weighted by their exact pixel counts; 95 % intervals = 1.96 standard errors")


@dataclass
class SkippedPoint:
    """A reference point left out of the assessment, and why."""

    point: str
    x: float | None
    y: float | None
    reason: str


@dataclass
class AssessmentResult:
    """The assessment's record (the JSON's content) and the files written."""

    record: dict[str, Any]
    estimate: Estimate
    json_path: Path
    markdown_path: Path
    csv_path: Path
    png_path: Path
    skipped: list[SkippedPoint] = field(default_factory=list)
    seconds: float = 0.0


def output_stem(classmap: str) -> str:
    """``scene`` for ``scene.classes.tif`` (geoseg's class map) and for ``scene.tif``."""
    stem = scene_stem(classmap)
    return stem[: -len(".classes")] if stem.endswith(".classes") and len(stem) > len(".classes") else stem


def _read_points(reference: str, column: str, strata: MapStrata) -> Any:
    """The reference points as a GeoDataFrame in the map's CRS."""
    import geopandas as gpd

    if not os.path.exists(reference) and "://" not in reference:
        raise InputError(f"{reference}: no such file; give the points file that geoseg sample wrote, with its "
                         "reference column filled in")
    try:
        points = gpd.read_file(reference, engine="pyogrio")
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise InputError(f"{reference}: cannot be read as vector points ({first}); give a GeoPackage, shapefile, "
                         "GeoJSON or GeoParquet of points") from None
    if column not in points.columns:
        have = ", ".join(c for c in points.columns if c != points.geometry.name) or "none"
        raise InputError(f"{reference}: has no column {column!r} (columns: {have}); name the column of reference "
                         "classes with --reference-column")
    if not len(points):
        raise InputError(f"{reference}: holds no point; draw a sample with geoseg sample first")
    if strata.crs is not None:
        if points.crs is None:
            log.warning("%s: has no CRS; its coordinates are taken to be in the map's CRS (%s)", reference,
                        strata.crs.to_string())
            points = points.set_crs(strata.crs.to_wkt(), allow_override=True)
        elif not points.crs.equals(strata.crs.to_wkt()):
            log.info("%s: reprojected from %s to the map's CRS", reference, points.crs.to_string())
            points = points.to_crs(strata.crs.to_wkt())
    return points


def _reference_ids(values: Any, strata: MapStrata) -> list[int | str | None]:
    """Each point's reference class as a map class id; the text given when it is no class of the map;
    ``None`` when empty."""
    by_name = {name.strip().lower(): i for i, name in strata.names.items()}
    out: list[int | str | None] = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip()):
            out.append(None)
            continue
        text = str(v).strip()
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number == int(number):
            out.append(int(number) if int(number) in strata.ids else text)
        else:
            out.append(by_name.get(text.lower(), text))
    return out


def _map_values(path: str, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The map class under each point (-1 where none: off the map or on nodata), and whether the point is on
    the map."""
    values, inside, valid = values_at(path, xs, ys)
    return np.where(valid, values, -1), inside


def _num(v: Any, digits: int = 6) -> float | None:
    """A JSON number: rounded, ``None`` for NaN."""
    if v is None:
        return None
    f = float(v)
    return None if not math.isfinite(f) else round(f, digits)


def assess(classmap: str | os.PathLike[str], reference: str | os.PathLike[str], column: str = "reference",
           output_dir: str | os.PathLike[str] = ".", *, overwrite: bool = False) -> AssessmentResult:
    """Estimate a class map's accuracy and its classes' areas, with 95 % confidence intervals, from a
    stratified random sample of interpreted points (see the module's text).

    Args:
        classmap: the class map the sample was drawn from (its classes are the strata).
        reference: the points (``geoseg sample``'s file with its reference column filled in, or any points).
        column: the column holding each point's reference class: a class id or a class name of the map.
        output_dir: the folder of the four reports.
        overwrite: replace existing reports.

    Returns:
        An :class:`AssessmentResult`.

    Raises:
        InputError: unreadable map or points, a missing column, or no usable point.
        OutputExistsError: a report exists and ``overwrite`` is false.
    """
    t0 = time.perf_counter()
    path, ref = os.fspath(classmap), os.fspath(reference)
    out = Path(output_dir)
    stem = output_stem(path)
    paths = {kind: out / f"{stem}.assessment.{kind}" for kind in ("json", "md", "csv", "png")}
    for p in paths.values():
        check_writable(p, overwrite)
    strata = read_strata(path)
    points = _read_points(ref, column, strata)
    labels = (points["point_id"].tolist() if "point_id" in points.columns
              else [f"#{i + 1}" for i in range(len(points))])
    geoms = points.geometry
    is_point = np.asarray(geoms.geom_type == "Point") & ~np.asarray(geoms.is_empty)
    xs, ys = np.full(len(points), np.nan), np.full(len(points), np.nan)
    xs[is_point] = shapely.get_x(geoms.values[is_point])
    ys[is_point] = shapely.get_y(geoms.values[is_point])
    values, inside = _map_values(path, np.nan_to_num(xs, nan=-1e300), np.nan_to_num(ys, nan=-1e300))
    refs = _reference_ids(points[column].tolist(), strata)

    index = {c: k for k, c in enumerate(strata.ids)}
    counts = np.zeros((len(strata.ids), len(strata.ids)), dtype=np.int64)
    skipped: list[SkippedPoint] = []
    for k in range(len(points)):
        x, y = (None if not math.isfinite(xs[k]) else float(xs[k])), (None if not math.isfinite(ys[k]) else float(ys[k]))
        if not is_point[k]:
            reason = f"its geometry is {geoms.iloc[k].geom_type if geoms.iloc[k] is not None else 'empty'}, not a point"
        elif not inside[k]:
            reason = "outside the map"
        elif values[k] < 0:
            reason = "on nodata (no map class there)"
        elif refs[k] is None:
            reason = f"no reference class in column {column!r}"
        elif isinstance(refs[k], str):
            reason = f"reference class {refs[k]!r} is not a class of the map (ids {', '.join(map(str, strata.ids))})"
        else:
            counts[index[int(values[k])], index[cast(int, refs[k])]] += 1
            continue
        where = f" ({x:.10g}, {y:.10g})" if x is not None and y is not None else ""
        log.warning("%s: point %s%s: %s; left out", ref, labels[k], where, reason)
        skipped.append(SkippedPoint(str(labels[k]), x, y, reason))
    if counts.sum() == 0:
        raise InputError(f"{ref}: no point has both a map class and a reference class of the map "
                         f"({len(skipped)} left out, see the warnings); fill in column {column!r}")

    names = [strata.name(c) for c in strata.ids]
    est = stratified_estimate(counts, [strata.pixels[c] for c in strata.ids], labels=names)
    for note in est.warnings:
        log.warning("%s: %s", path, note)
    record = _record(strata, est, ref, column, skipped)
    _publish(out, paths, record, strata)
    result = AssessmentResult(record, est, paths["json"], paths["md"], paths["csv"], paths["png"], skipped,
                              time.perf_counter() - t0)
    log.info("assessed %s with %d points (%d left out): overall accuracy %.4f +- %.4f", path,
             int(counts.sum()), len(skipped), est.overall, Z95 * est.overall_se)
    return result


def _record(strata: MapStrata, est: Estimate, reference: str, column: str, skipped: list[SkippedPoint]
            ) -> dict[str, Any]:
    total_m2 = strata.total_area_m2
    area, area_se = est.areas(total_m2) if total_m2 is not None else (None, None)
    pixels_est, pixels_se = est.areas(strata.total_pixels)
    classes = []
    for k, c in enumerate(strata.ids):
        a = None if area is None else area[k]
        a_ci = None if area_se is None else Z95 * area_se[k]
        classes.append({
            "id": c, "name": strata.name(c), "map_pixels": strata.pixels[c],
            "map_area_m2": _num(strata.area_m2[c], 2) if strata.area_m2 is not None else None,
            "area_m2": _num(a, 2), "area_m2_ci95": _num(a_ci, 2),
            "area_ha": _num(None if a is None else a / 1e4, 4), "area_ha_ci95": _num(None if a_ci is None else a_ci / 1e4, 4),
            "area_pixels": _num(pixels_est[k], 2), "area_pixels_ci95": _num(Z95 * pixels_se[k], 2),
            "area_proportion": _num(est.area_proportion[k]), "area_proportion_ci95": _num(Z95 * est.area_proportion_se[k]),
            "users_accuracy": _num(est.users[k]), "users_accuracy_ci95": _num(Z95 * est.users_se[k]),
            "producers_accuracy": _num(est.producers[k]), "producers_accuracy_ci95": _num(Z95 * est.producers_se[k]),
            "sample_mapped": int(est.counts[k].sum()), "sample_reference": int(est.counts[:, k].sum()),
        })
    return {
        "geoseg_assessment": 1,
        "overall_accuracy": _num(est.overall), "overall_accuracy_ci95": _num(Z95 * est.overall_se),
        "classes": classes,
        "error_matrix": {"rows": "map class", "columns": "reference class", "classes": list(strata.ids),
                         "counts": est.counts.tolist(),
                         "proportions": [[_num(v) for v in row] for row in est.proportions]},
        "classmap": strata.path, "reference": reference, "reference_column": column,
        "points_used": int(est.counts.sum()), "points_left_out": [s.__dict__ for s in skipped],
        "map_pixels": strata.total_pixels, "map_area_m2": _num(total_m2, 2),
        "area_method": strata.area_method, "crs": strata.crs.to_string() if strata.crs is not None else None,
        "warnings": list(est.warnings), "method": METHOD,
    }


# ----------------------------------------------------------------------------------------------- reports


def _f(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pm(v: Any, ci: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f} ± {_f(ci, digits)}"


def _area_unit(record: dict[str, Any]) -> tuple[str, str]:
    """The area unit and column to show: hectares with a CRS, else pixels."""
    return ("ha", "area_ha") if record["map_area_m2"] is not None else ("px", "area_pixels")


def markdown(record: dict[str, Any]) -> str:
    """The assessment as Markdown tables."""
    unit, key = _area_unit(record)
    lines = [f"# Accuracy and area of {Path(record['classmap']).name}", "",
             f"Reference: {record['reference']} (column `{record['reference_column']}`), "
             f"{record['points_used']} points used, {len(record['points_left_out'])} left out.", "",
             f"Overall accuracy: **{_pm(record['overall_accuracy'], record['overall_accuracy_ci95'])}** "
             "(95 % confidence interval half-width).", "",
             f"| id | class | map pixels | map area ({unit}) | estimated area ({unit}) | ± 95 % | user's accuracy "
             "| producer's accuracy | points mapped | points labelled |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in record["classes"]:
        map_area = c["map_area_m2"] / 1e4 if unit == "ha" and c["map_area_m2"] is not None else c["map_pixels"]
        lines.append(f"| {c['id']} | {c['name']} | {c['map_pixels']} | {_f(map_area, 2)} | {_f(c[key], 2)} | "
                     f"{_f(c[key + '_ci95'], 2)} | {_pm(c['users_accuracy'], c['users_accuracy_ci95'])} | "
                     f"{_pm(c['producers_accuracy'], c['producers_accuracy_ci95'])} | {c['sample_mapped']} | "
                     f"{c['sample_reference']} |")
    names = [c["name"] for c in record["classes"]]
    for title, matrix, fmt in (("sample counts", record["error_matrix"]["counts"], str),
                               ("estimated area proportions", record["error_matrix"]["proportions"],
                                lambda v: _f(v, 4))):
        lines += ["", f"Error matrix in {title} (rows: map class, columns: reference class):", "",
                  "| map \\ reference | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        lines += [f"| {n} | " + " | ".join(fmt(v) for v in row) + " |" for n, row in zip(names, matrix, strict=True)]
    if record["points_left_out"]:
        lines += ["", "Points left out:", ""]
        lines += [f"- point {s['point']}: {s['reason']}" for s in record["points_left_out"]]
    if record["warnings"]:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in record["warnings"]]
    lines += ["", f"Method: {record['method']}. Areas: {record['area_method']} pixel areas.", ""]
    return "\n".join(lines)


CSV_COLUMNS = ("id", "name", "map_pixels", "map_area_m2", "area_m2", "area_m2_ci95", "area_ha", "area_ha_ci95",
               "area_pixels", "area_pixels_ci95", "area_proportion", "area_proportion_ci95", "users_accuracy",
               "users_accuracy_ci95", "producers_accuracy", "producers_accuracy_ci95", "sample_mapped",
               "sample_reference")


def csv_table(record: dict[str, Any]) -> str:
    """The per-class table as CSV (empty cells for undefined values)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for c in record["classes"]:
        writer.writerow(["" if c[k] is None else c[k] for k in CSV_COLUMNS])
    return buf.getvalue()


def plot_areas(record: dict[str, Any], dst: Path) -> Path:
    """Per class, the map's area beside the estimated area with its 95 % interval (a PNG)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    unit, key = _area_unit(record)
    classes = record["classes"]
    mapped = [(c["map_area_m2"] / 1e4 if unit == "ha" else c["map_pixels"]) or 0.0 for c in classes]
    estimated = [c[key] if c[key] is not None else 0.0 for c in classes]
    ci = [c[key + "_ci95"] if c[key + "_ci95"] is not None else 0.0 for c in classes]
    y = np.arange(len(classes))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.6 * len(classes)), dpi=110)
    try:
        ax.barh(y + 0.2, mapped, height=0.38, color="0.7", label="map (pixel count)")
        ax.barh(y - 0.2, estimated, height=0.38, color="#1f78b4", xerr=ci, capsize=3,
                label="estimated (stratified sample), 95 % interval")
        ax.set_yticks(y, [c["name"] for c in classes])
        ax.invert_yaxis()
        ax.set_xlabel(f"area ({unit})")
        oa, oa_ci = record["overall_accuracy"], record["overall_accuracy_ci95"]
        ax.set_title(f"{Path(record['classmap']).name}: overall accuracy {_pm(oa, oa_ci)}", fontsize=10)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.5 / (1.2 + 0.6 * len(classes))), ncol=2,
                  fontsize=8, frameon=False)
        ax.set_xlim(left=0)
        fig.tight_layout()
        fig.savefig(dst, format="png")
    finally:
        plt.close(fig)
    return dst


def _publish(out: Path, paths: dict[str, Path], record: dict[str, Any], strata: MapStrata) -> None:
    """Write the four reports, each whole; the JSON, the main record, last."""
    store = Store(out)
    store.prepare()
    with store.staged_file(paths["png"].name) as tmp:
        plot_areas(record, tmp)
    store.write_text(paths["csv"].name, csv_table(record))
    store.write_text(paths["md"].name, markdown(record))
    store.write_text(paths["json"].name, json.dumps(record, indent=1) + "\n")


__all__ = ["CSV_COLUMNS", "METHOD", "AssessmentResult", "SkippedPoint", "assess", "csv_table", "markdown",
           "output_stem", "plot_areas"]
