"""Evaluation: predict a whole scene through the same tiled path as ``geoseg predict``, then score it.

The class map comes from :func:`geoseg.predict.api.predict_scene` (so blending, edges and nodata are exactly
what users get), and is compared with the labels (a raster, or polygons rasterised onto the scene grid)
window by window: memory stays bounded whatever the scene size. Pixels without a label, with label
nodata, with a label id that is not one of the model's classes, or where the prediction is nodata (no
valid imagery) are left out. An optional ``within`` area restricts the comparison (for example the
validation blocks that ``geoseg train`` writes to ``split/*_val.geojson``).

Outputs, named after the image: ``<stem>.evaluation.json`` (all numbers and the confusion matrix),
``<stem>.evaluation.md`` (a Markdown table) and ``<stem>.confusion.png``.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rasterio.windows import Window, subdivide

from geoseg.errors import InputError
from geoseg.io.raster import SceneInfo, check_writable, gdal_env, inspect_scene, open_scene
from geoseg.learn.labels import ClassMap, is_vector, open_labels
from geoseg.learn.metrics import ConfusionMatrix, markdown_table, plot_confusion, scores
from geoseg.model.bundle import Bundle, LoadedModel
from geoseg.model.weights import load_model

log = logging.getLogger(__name__)

_WINDOW = 1024


@dataclass
class EvaluationResult:
    """The scores (see :func:`geoseg.learn.metrics.scores`) and the files written."""

    metrics: dict[str, Any]
    json_path: Path
    markdown_path: Path
    plot_path: Path | None
    prediction_path: Path | None

    @property
    def miou(self) -> float | None:
        return self.metrics.get("miou")  # type: ignore[no-any-return]


def _within_mask(within: Any, info: SceneInfo) -> Callable[[Window], np.ndarray] | None:
    """A function giving the bool ``(rows, cols)`` mask of ``within`` for a window, or None."""
    if within is None:
        return None
    from rasterio.features import geometry_mask
    from rasterio.windows import transform as window_transform
    from shapely.geometry.base import BaseGeometry
    from shapely.ops import unary_union

    if isinstance(within, BaseGeometry):
        geom = within
    else:
        import geopandas as gpd

        p = os.fspath(within)
        if not Path(p).exists():
            raise InputError(f"{p}: no such file for the evaluation area; give a vector file or a geometry")
        try:
            gdf = gpd.read_file(p)
        except Exception as exc:
            raise InputError(f"{p}: cannot be read as an evaluation area ({exc})") from None
        if gdf.crs is not None and info.crs is not None and gdf.crs != info.crs:
            gdf = gdf.to_crs(info.crs)
        geom = unary_union(list(gdf.geometry.values))
    if geom.is_empty:
        raise InputError(f"{info.path}: the evaluation area is empty")

    def mask(window: Window) -> np.ndarray:
        tf = window_transform(window, info.transform)
        shape = (int(window.height), int(window.width))
        return ~geometry_mask([geom], out_shape=shape, transform=tf)

    return mask


def evaluate(
    model: LoadedModel | Bundle | str | os.PathLike[str],
    image: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    *,
    label_column: str | None = None,
    label_value: int | None = None,
    background_class: int | None | Literal["model"] = "model",
    background_outside: str | int | None = None,
    label_nodata: int | None = None,
    within: Any = None,
    output_dir: str | os.PathLike[str] = ".",
    bands: list[int] | None = None,
    tile_size: int | None = None,
    overlap: int | None = None,
    batch_size: int | str = "auto",
    device: str = "auto",
    precision: str = "auto",
    workers: int | None = None,
    tta: bool = False,
    keep_prediction: bool = False,
    overwrite: bool = False,
    progress: Callable[[Any], None] | None = None,
) -> EvaluationResult:
    """Predict ``image`` with ``model`` and score the class map against ``labels``.

    Args:
        model: a loaded model, a bundle or a bundle path.
        image: the scene to predict (whole, through the tiled predict engine).
        labels: a raster of class ids, or a vector file of polygons (reprojected to the scene's CRS).
        label_column: vector labels: column with class ids or class names.
        label_value: vector labels without a column: the class id of every polygon.
        background_class: class id of pixels outside every polygon; ``"model"`` takes the bundle's
            ``background_class``; None leaves them out of the scores.
        background_outside: vector labels: pixels outside every polygon are this class, given by id or
            name, or ``"model"`` for the bundle's background class (else its first class); overrides
            ``background_class`` (the CLI's ``--background-outside``).
        label_nodata: label raster value meaning "unlabelled" (default: the raster's nodata).
        within: a vector file or shapely geometry (scene CRS) limiting the scored area.
        output_dir: folder for the JSON, Markdown and PNG reports (and the class map when kept).
        bands: as for :func:`geoseg.predict.api.predict_scene`.
        tile_size: as for :func:`geoseg.predict.api.predict_scene`.
        overlap: as for :func:`geoseg.predict.api.predict_scene`.
        batch_size: as for :func:`geoseg.predict.api.predict_scene`.
        device: as for :func:`geoseg.predict.api.predict_scene`.
        precision: as for :func:`geoseg.predict.api.predict_scene`.
        workers: as for :func:`geoseg.predict.api.predict_scene`.
        tta: as for :func:`geoseg.predict.api.predict_scene`.
        keep_prediction: keep the class map in ``output_dir`` (else it goes to a temporary folder).
        overwrite: replace existing reports.
        progress: passed on to the predict engine.

    Returns:
        An :class:`EvaluationResult`: per-class IoU, F1, precision, recall, overall accuracy, mean IoU
        and the confusion matrix (rows: labels, columns: predictions, in the model's class order).

    Raises:
        InputError: unreadable labels or area, or no pixel left to score.
        BundleError: the scene does not fit the model.
        OutputExistsError: a report exists and ``overwrite`` is false.
    """
    from geoseg.io.raster import scene_stem
    from geoseg.predict.api import predict_scene

    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    contract = loaded.contract
    info = inspect_scene(image)
    out = Path(output_dir)
    stem = scene_stem(os.fspath(image))
    json_path, md_path, png_path = (out / f"{stem}.evaluation.json", out / f"{stem}.evaluation.md",
                                    out / f"{stem}.confusion.png")
    for p in (json_path, md_path, png_path):
        check_writable(p, overwrite)
    names = {c.name: c.id for c in contract.classes}
    if background_outside is not None:
        background: int | None = _background_class(contract, background_outside, labels)
    else:
        background = contract.background_class if background_class == "model" else background_class
    if is_vector(os.fspath(labels)):
        if background is None:
            log.warning("%s: pixels outside the polygons are not scored (the model names no background class); "
                        "--background-outside CLASS scores them as that class", labels)
        else:
            log.info("%s: pixels outside the polygons are scored as class %d", labels, background)
    label_src = open_labels(os.fspath(labels), info, column=label_column, value=label_value,
                            background=background, names=names, nodata=label_nodata)
    area = _within_mask(within, info)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix=".geoseg-eval-", dir=out) as tmp:
        pred_dir = out if keep_prediction else Path(tmp)
        result = predict_scene(image, loaded, pred_dir, tile_size=tile_size, overlap=overlap,
                               batch_size=batch_size, device=device, precision=precision, workers=workers, bands=bands,
                               tta=tta,
                               overwrite=overwrite, progress=progress, vector_format=None)
        cm = compare(Path(str(result.classes_path)), label_src, ClassMap(contract.class_ids), info, area)
        prediction = Path(str(result.classes_path)) if keep_prediction else None

    if cm.total == 0:
        raise InputError(f"{labels}: no labelled pixel overlaps a predicted pixel of {image}; check the labels' "
                         "CRS, label_column and the classes of the model")
    metrics = scores(cm.matrix, [c.name for c in contract.classes])
    metrics.update(image=os.fspath(image), labels=os.fspath(labels), model=str(loaded.bundle.path),
                   class_ids=contract.class_ids)
    json_path.write_text(json.dumps(metrics, indent=2) + "\n")
    md_path.write_text(f"# Evaluation of {contract.name} on {Path(os.fspath(image)).name}\n\n" + markdown_table(metrics))
    plotted = plot_confusion(cm.matrix, [c.name for c in contract.classes], png_path,
                             title=f"{contract.name} on {stem}")
    if not plotted:
        log.warning("matplotlib is not installed; no confusion matrix plot")
    log.info("mean IoU %.4f, accuracy %.4f over %d pixels", metrics["miou"] or 0, metrics["accuracy"] or 0,
             metrics["pixels"])
    return EvaluationResult(metrics, json_path, md_path, png_path if plotted else None, prediction)


def _background_class(contract: Any, value: str | int, labels: Any) -> int:
    """The class id ``--background-outside`` names (``model``: the bundle's background, else its first class)."""
    if value == "model":
        return int(contract.background_class if contract.background_class is not None else contract.classes[0].id)
    by_name = {c.name: c.id for c in contract.classes}
    ids = [c.id for c in contract.classes]
    if str(value) in by_name:
        return int(by_name[str(value)])
    try:
        cid = int(value)
    except ValueError:
        cid = None
    if cid is None or cid not in ids:
        raise InputError(f"{labels}: --background-outside {value}: not a class of the model; give one of "
                         f"{', '.join(f'{c.id} ({c.name})' for c in contract.classes)}")
    return int(cid)


def compare(classes_path: str | os.PathLike[str], labels: Any, class_map: ClassMap, info: SceneInfo,
            area: Callable[[Window], np.ndarray] | None = None) -> ConfusionMatrix:
    """The confusion matrix of a class map against labels on its grid, read window by window (bounded
    memory). ``labels`` has ``read(window)`` (:func:`geoseg.learn.data.open_labels`); nodata in either, and pixels
    outside ``area``, are left out."""
    cm = ConfusionMatrix(len(class_map))
    with gdal_env(), open_scene(classes_path) as ds:
        if (ds.width, ds.height) != (info.width, info.height):
            raise InputError(f"{classes_path}: class map is {ds.width}x{ds.height}, the scene {info.width}x{info.height}")
        nodata = ds.nodata
        for win in subdivide(Window(0, 0, info.width, info.height), _WINDOW, _WINDOW):
            pred_ids = ds.read(1, window=win).astype(np.int64)
            pred = class_map.to_index(pred_ids)
            if nodata is not None:
                pred[pred_ids == int(nodata)] = -1
            true = class_map.to_index(labels.read(win))
            if area is not None:
                true[~area(win)] = -1
            cm.update(true, pred)
    return cm


__all__ = ["evaluate", "compare", "EvaluationResult"]
