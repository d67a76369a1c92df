"""Open geoseg's outputs in a real QGIS, headless, and report what a GIS user would see.

Checks, for a class map written by ``geoseg predict`` (``<stem>.classes.tif``) and its polygons
(``<stem>.gpkg``):

- the raster loads, picks up the same-named ``.qml`` style (QGIS's loadDefaultStyle), and is drawn with a
  paletted renderer; prints the legend QGIS shows (class value, label, colour), the CRS, size and nodata,
  and, for comparison, what QGIS would show from the GeoTIFF's embedded colour table alone;
- the GeoPackage's polygon layer loads; prints its CRS, feature count and fields;
- whether QGIS exposes the GDAL raster attribute table (``<stem>.classes.tif.aux.xml``): QGIS >= 3.30 has
  ``dataProvider().attributeTable(1)``; on older QGIS the script says so and reads the table with
  ``gdalinfo -json`` instead, if ``gdalinfo`` is on PATH;
- renders both layers (polygon outlines on top of the raster) at the raster's extent and CRS into a PNG,
  with QGIS's own legend drawn in a corner, and counts how much of the map shows each legend colour.

It needs PyQGIS, which Debian ships for its system Python, so it runs under ``/usr/bin/python3`` (not a
virtual environment's python) and imports only the standard library and qgis::

    apt-get install -y -q qgis python3-qgis xvfb
    /usr/bin/python3 examples/qgis_check.py demo/predictions/scene.classes.tif --png docs/qgis-demo.png

Outputs to look at come from ``geoseg demo --output-dir demo/ --size 1024``. The script sets
``QT_QPA_PLATFORM=offscreen`` itself when no ``$DISPLAY`` is set; if that platform plugin fails on a
machine, run it under Xvfb (it then draws through the X server)::

    xvfb-run /usr/bin/python3 examples/qgis_check.py

Exits 1 with a one-line error when a layer does not load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

if not os.environ.get("DISPLAY"):  # headless; under xvfb-run (DISPLAY set) Qt uses the X server instead
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp/runtime-qgis-check")

from qgis.core import (  # noqa: E402  (the environment above must be set before Qt loads)
    Qgis,
    QgsApplication,
    QgsFillSymbol,
    QgsLayerTree,
    QgsLayerTreeModel,
    QgsLegendRenderer,
    QgsLegendSettings,
    QgsMapRendererParallelJob,
    QgsMapSettings,
    QgsRasterLayer,
    QgsRenderContext,
    QgsSingleSymbolRenderer,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QSize, QSizeF  # noqa: E402
from qgis.PyQt.QtGui import QColor, QImage, QPainter  # noqa: E402

DEFAULT_CLASS_MAP = "demo/predictions/scene.classes.tif"


def fail(message: str) -> None:
    """Stop with a one-line error on stderr and exit status 1."""
    sys.exit(f"qgis_check: error: {message}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("class_map", nargs="?", default=DEFAULT_CLASS_MAP, help="the <stem>.classes.tif")
    ap.add_argument(
        "polygons", nargs="?", default=None, help="the GeoPackage (default: <stem>.gpkg beside it)"
    )
    ap.add_argument("--png", default="qgis_check.png", help="where to write the rendered map")
    ap.add_argument("--size", type=int, default=900, help="width of the PNG in pixels (height follows)")
    return ap.parse_args(argv)


def default_polygons(class_map: Path) -> Path:
    """``<stem>.classes.tif`` -> ``<stem>.gpkg`` in the same folder."""
    name = class_map.name
    stem = name[: -len(".classes.tif")] if name.endswith(".classes.tif") else class_map.stem
    return class_map.with_name(stem + ".gpkg")


def start_qgis() -> QgsApplication:
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, exist_ok=True)
    QgsApplication.setPrefixPath("/usr", True)
    app = QgsApplication([], False)
    app.initQgis()
    return app


def colour_hex(colour: QColor) -> str:
    text = colour.name()
    return text if colour.alpha() == 255 else f"{text} alpha {colour.alpha()}"


# ---------------------------------------------------------------- raster


def load_raster(path: Path) -> QgsRasterLayer:
    if not path.is_file():
        fail(f"class map not found: {path}")
    layer = QgsRasterLayer(str(path), path.name, "gdal")  # loadDefaultStyle: reads <name>.qml if present
    if not layer.isValid():
        reason = " ".join(layer.error().summary().split()).rstrip(":")
        fail(f"QGIS could not load the raster {path}: {reason}")
    return layer


def report_raster(layer: QgsRasterLayer, path: Path) -> None:
    provider = layer.dataProvider()
    qml = path.with_suffix(".qml")
    print(f"raster      {path}")
    print(f"  CRS       {layer.crs().authid()} ({layer.crs().description()})")
    print(
        f"  size      {layer.width()} x {layer.height()} px, {layer.bandCount()} band(s), "
        f"pixel {layer.rasterUnitsPerPixelX():g} x {layer.rasterUnitsPerPixelY():g} map units"
    )
    nodata = provider.sourceNoDataValue(1) if provider.sourceHasNoDataValue(1) else None
    print(f"  nodata    {nodata:g}" if nodata is not None else "  nodata    none")
    print(f"  .qml      {qml.name} {'present' if qml.is_file() else 'MISSING'} beside it")
    renderer = layer.renderer()
    kind = renderer.type()
    print(
        f"  renderer  {kind} ({'a paletted renderer' if kind == 'paletted' else 'NOT a paletted renderer'})"
    )
    print_legend(layer)
    report_without_qml(path)


def report_without_qml(path: Path) -> None:
    """What QGIS would show from the GeoTIFF alone (its embedded colour table), without the .qml."""
    options = QgsRasterLayer.LayerOptions()
    options.loadDefaultStyle = False
    bare = QgsRasterLayer(str(path), path.name, "gdal", options)
    if not bare.isValid():
        return
    renderer = bare.renderer()
    if renderer.type() == "paletted":
        labels = [item.label for item in renderer.classes()]
        shown = ", ".join(labels[:4]) + (", ..." if len(labels) > 4 else "")
        print(f"  no .qml   would be {renderer.type()}: {len(labels)} entries labelled {shown}")
    else:
        print(f"  no .qml   would be {renderer.type()}")


def print_legend(layer: QgsRasterLayer) -> None:
    """The legend QGIS shows: the paletted renderer's classes, else the generic symbology items."""
    renderer = layer.renderer()
    if renderer.type() == "paletted":
        classes = renderer.classes()
        print(f"  legend    {len(classes)} classes (value, label, colour):")
        for item in classes:
            print(f"    {item.value:>4g}  {item.label or '(no label)':<14} {colour_hex(item.color)}")
        return
    items = renderer.legendSymbologyItems()
    print(f"  legend    {len(items)} items (label, colour):")
    for label, colour in items:
        print(f"    {label:<18} {colour_hex(colour)}")


def report_rat(layer: QgsRasterLayer, path: Path) -> None:
    """Whether QGIS exposes GDAL's raster attribute table; on older QGIS read it with gdalinfo."""
    provider = layer.dataProvider()
    print(f"attribute table (QGIS {Qgis.version()})")
    if Qgis.QGIS_VERSION_INT >= 33000 and hasattr(provider, "attributeTable"):
        rat = provider.attributeTable(1)
        if rat is None:
            print("  QGIS: dataProvider().attributeTable(1) exists but returns no table")
        else:
            names = [field.name for field in rat.fields()]
            print(f"  QGIS: attributeTable(1) has {rat.data().__len__()} rows, fields {', '.join(names)}")
            for row in rat.data():
                print("    " + " | ".join(str(value) for value in row))
        return
    print("  QGIS: not available (dataProvider().attributeTable() arrived in QGIS 3.30)")
    report_rat_gdalinfo(path)


def report_rat_gdalinfo(path: Path) -> None:
    exe = shutil.which("gdalinfo")
    if exe is None:
        print("  gdalinfo: not on PATH, table not read")
        return
    out = subprocess.run([exe, "-json", str(path)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(f"  gdalinfo: failed: {out.stderr.strip().splitlines()[-1:]}")
        return
    info = json.loads(out.stdout)
    rat = info.get("rat") or info.get("bands", [{}])[0].get("rat")  # top level in GDAL < 3.8, per band after
    if not rat:
        print("  gdalinfo: no raster attribute table")
        return
    names = [field["name"] for field in rat["fieldDefn"]]
    print(f"  gdalinfo -json: {rat.get('tableType', '?')} table, {len(rat['row'])} rows")
    print("    " + " | ".join(names))
    for row in rat["row"]:
        print(
            "    "
            + " | ".join(f"{value:g}" if isinstance(value, float) else str(value) for value in row["f"])
        )


# ---------------------------------------------------------------- polygons


def gpkg_feature_tables(path: Path) -> list[str]:
    """The feature tables a GeoPackage declares (read with sqlite3, read-only)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        rows = con.execute("SELECT table_name FROM gpkg_contents WHERE data_type = 'features'").fetchall()
    return [name for (name,) in rows]


def load_polygons(path: Path) -> QgsVectorLayer:
    if not path.is_file():
        fail(f"polygons not found: {path}")
    try:
        tables = gpkg_feature_tables(path)
    except sqlite3.Error as exc:
        fail(f"{path} is not a readable GeoPackage: {exc}")
    if not tables:
        fail(f"{path} has no feature table")
    layer = QgsVectorLayer(f"{path}|layername={tables[0]}", tables[0], "ogr")
    if not layer.isValid():
        fail(f"QGIS could not load the polygon layer {tables[0]!r} of {path}")
    return layer


def report_polygons(layer: QgsVectorLayer, path: Path) -> None:
    print(f"polygons    {path} (layer {layer.name()!r})")
    print(f"  CRS       {layer.crs().authid()} ({layer.crs().description()})")
    print(f"  geometry  {QgsWkbTypes.displayString(layer.wkbType())}")
    print(f"  features  {layer.featureCount()}")
    fields = ", ".join(f"{field.name()} ({field.typeName()})" for field in layer.fields())
    print(f"  fields    {fields}")


def style_outlines(layer: QgsVectorLayer) -> None:
    symbol = QgsFillSymbol.createSimple(
        {"style": "no", "outline_color": "20,20,20,255", "outline_width": "0.25", "outline_width_unit": "MM"}
    )
    layer.setRenderer(QgsSingleSymbolRenderer(symbol))


# ---------------------------------------------------------------- rendering


def render_map(raster: QgsRasterLayer, polygons: QgsVectorLayer, width: int) -> QImage:
    height = max(1, round(width * raster.height() / raster.width()))
    settings = QgsMapSettings()
    settings.setLayers([polygons, raster])  # first is drawn on top
    settings.setDestinationCrs(raster.crs())
    settings.setExtent(raster.extent())
    settings.setOutputSize(QSize(width, height))
    settings.setBackgroundColor(QColor("white"))
    job = QgsMapRendererParallelJob(settings)
    job.start()
    job.waitForFinished()
    for error in job.errors():
        print(f"  render error in {error.layerID}: {error.message}")
    return job.renderedImage()


def colour_shares(image: QImage, raster: QgsRasterLayer, stride: int = 3) -> dict[str, float]:
    """Share of (sampled) map pixels that show each legend colour exactly."""
    renderer = raster.renderer()
    legend = (
        [(item.label, item.color.rgb()) for item in renderer.classes()]
        if renderer.type() == "paletted"
        else [(label, colour.rgb()) for label, colour in renderer.legendSymbologyItems()]
    )
    counts = {label: 0 for label, _ in legend}
    by_rgb = {rgb: label for label, rgb in legend}
    total = 0
    for y in range(0, image.height(), stride):
        for x in range(0, image.width(), stride):
            total += 1
            label = by_rgb.get(image.pixel(x, y) | 0xFF000000)
            if label is not None:
                counts[label] += 1
    return {label: count / max(total, 1) for label, count in counts.items()}


def draw_legend(image: QImage, raster: QgsRasterLayer) -> None:
    """Draw QGIS's own legend for the raster (QgsLegendRenderer) in the image's top-right corner."""
    root = QgsLayerTree()
    root.addLayer(raster)
    model = QgsLayerTreeModel(root)
    settings = QgsLegendSettings()
    settings.setTitle("")
    painter = QPainter(image)
    context = QgsRenderContext.fromQPainter(painter)
    context.setFlag(QgsRenderContext.Antialiasing, True)
    legend = QgsLegendRenderer(model, settings)
    size_mm: QSizeF = legend.minimumSize(context)
    px_per_mm = context.scaleFactor()
    w, h = size_mm.width() * px_per_mm, size_mm.height() * px_per_mm
    painter.save()
    painter.translate(image.width() - w - 8, 8)
    painter.fillRect(0, 0, round(w), round(h), QColor(255, 255, 255, 220))
    painter.scale(px_per_mm, px_per_mm)  # the legend draws in millimetres
    legend.drawLegend(context)
    painter.restore()
    painter.end()
    del legend, model  # the model refers to the tree: drop it first
    root.removeAllChildren()


def save_png(image: QImage, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not image.save(str(path), "PNG"):
        fail(f"could not write {path}")
    print(f"picture     {path} ({image.width()} x {image.height()} px, {path.stat().st_size / 1024:.0f} KiB)")


# ---------------------------------------------------------------- main


def check(class_map: Path, polygons_path: Path, png: Path, width: int) -> None:
    """Load, report and render; every QGIS object made here is released when it returns."""
    raster = load_raster(class_map)
    polygons = load_polygons(polygons_path)
    report_raster(raster, class_map)
    report_rat(raster, class_map)
    report_polygons(polygons, polygons_path)
    if polygons.crs() != raster.crs():
        print(f"  note      polygons are reprojected on the fly to {raster.crs().authid()}")
    style_outlines(polygons)
    image = render_map(raster, polygons, width)
    shares = colour_shares(image, raster)
    print(
        "rendered    share of the map in each legend colour: "
        + ", ".join(f"{label} {share:.1%}" for label, share in shares.items())
    )
    draw_legend(image, raster)
    save_png(image, png)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    class_map = Path(args.class_map)
    polygons_path = Path(args.polygons) if args.polygons else default_polygons(class_map)
    app = start_qgis()
    print(f"QGIS {Qgis.version()} (Qt platform {QgsApplication.platformName()})")
    check(class_map, polygons_path, Path(args.png), args.size)
    app.exitQgis()  # after check() returned: layers freed after exitQgis() crash the interpreter at exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
