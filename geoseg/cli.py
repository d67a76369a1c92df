"""The ``geoseg`` command line: each command parses its options, then makes one library call.

Heavy modules (torch, segmentation-models-pytorch) are imported inside the commands that run a model,
so ``geoseg --help`` and ``geoseg info`` start fast. Options shared by several commands are declared once
below and mean the same everywhere.
"""

from __future__ import annotations

import json
from typing import Any

import click

from geoseg import __version__
from geoseg.console.options import (
    RESAMPLING,
    VECTOR_FORMATS,
    Group,
    opt_backend,
    opt_bands,
    opt_batch_size,
    opt_connectivity,
    opt_device,
    opt_min_area,
    opt_mmu,
    opt_model,
    opt_output_dir,
    opt_overlap,
    opt_overwrite,
    opt_precision,
    opt_simplify,
    opt_tile_size,
    opt_workers,
    quiet_library_warnings,
    setup_logging,
)
from geoseg.console.progress import BlockBar, ChipBar, EpochBars


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geoseg")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (and debug log output).")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """geoseg: land-cover segmentation of large GeoTIFFs."""
    setup_logging(2 if debug else verbose, quiet)
    quiet_library_warnings()
    ctx.obj = {"quiet": quiet, "verbose": verbose}


EXIT_PARTIAL = 3  # some scenes of a job failed, the others were written
EXIT_INTERRUPTED = 130


def _job_settings(ctx: click.Context, job: str | None, scenes: tuple[str, ...], given: dict[str, Any]
                  ) -> dict[str, Any]:
    """The job's settings: the job file's, overridden by what the command line sets explicitly."""
    from click.core import ParameterSource

    from geoseg.predict.jobfile import default_model, find_project, load_job

    explicit = {k: v for k, v in given.items()
                if ctx.get_parameter_source(k) not in (ParameterSource.DEFAULT, None)}
    settings: dict[str, Any] = {k: v for k, v in given.items() if k not in explicit}
    if job is not None:
        jf = load_job(job)
        settings.update(jf.predict_options())
        settings.update(model=jf.model, output_dir=jf.output_dir, scheduler=jf.scheduler, name=jf.name,
                        merge_vectors=jf.merge_vectors, report=jf.report, scenes=jf.scene_list())
    else:  # the working folder's geoseg.yaml, if any, gives the defaults
        project = find_project()
        if project is not None:
            settings.update(project.predict_options())
            settings.update({k: v for k, v in (("output_dir", project.output_dir), ("scheduler", project.scheduler),
                                                ("report", project.report)) if v is not None})
            settings.update(name=project.name, merge_vectors=project.merge_vectors)
            if project.scenes or project.scenes_file:
                settings["scenes"] = project.scene_list()
        if "model" not in explicit:
            settings["model"] = default_model(project)
    settings.update(explicit)
    if scenes:
        settings["scenes"] = list(scenes)
    if not settings.get("scenes"):
        raise click.UsageError("give one or more SCENES, or --job FILE")
    return settings


@main.command()
@click.argument("scenes", nargs=-1)
@click.option("--job", type=click.Path(dir_okay=False), default=None,
              help="YAML job file (see configs/job-example.yaml); options given here override it.")
@click.option("--model", "-m", "model", default=None,
              help="Model bundle: a directory with model.json, or a geoseg .safetensors or .onnx file "
                   "[default: $GEOSEG_MODEL, else the model of ./geoseg.yaml].")
@opt_output_dir
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run on a dask.distributed cluster: tcp://host:8786, or local:N for N worker processes here "
                   "[default: this process's threads; DASK_SCHEDULER_ADDRESS is honoured].")
@click.option("--name", default="mosaic", show_default=True,
              help="Job name: two scenes or more also give <name>.vrt, one mosaic of the class maps.")
@opt_tile_size
@opt_overlap
@opt_batch_size
@opt_device
@opt_precision
@opt_backend
@opt_workers
@opt_bands
@click.option("--blend", default="cosine", show_default=True,
              help="Weight window for overlapping chips: cosine, hann, gaussian or uniform.")
@click.option("--probabilities", is_flag=True, help="Also write <stem>.probs.tif (per-class probabilities).")
@click.option("--probabilities-dtype", type=click.Choice(["uint8", "float16", "float32"]), default="uint8",
              show_default=True, help="uint8 stores round(p * 254) with nodata 255.")
@click.option("--confidence", is_flag=True,
              help="Also write <stem>.confidence.tif: the blended probability of the mapped class, round(p * 254) "
                   "with nodata 255, styled by <stem>.confidence.qml; polygons gain confidence_mean.")
@click.option("--compress", type=click.Choice(["deflate", "zstd", "lzw"]), default="deflate", show_default=True)
@click.option("--tta", is_flag=True, help="Average over flips and 90-degree rotations (6x slower).")
@click.option("--panel-width", type=int, default=8192, show_default=True,
              help="Widest unit of work in pixels; bounds memory on very wide scenes.")
@click.option("--unit-rows", type=int, default=None,
              help="Rows per unit of work (a multiple of 512) to spread one tall scene over more workers "
                   "[default: whole panels].")
@click.option("--vector-format", type=click.Choice(VECTOR_FORMATS), default="gpkg", show_default=True,
              help="Polygons written beside the class map: <stem>.gpkg, .shp, .geojson or .parquet.")
@click.option("--no-vector", is_flag=True, help="Write no polygons.")
@click.option("--merge-vectors", is_flag=True, help="Also write the polygons of all scenes as one layer, <name>.gpkg.")
@click.option("--quicklook/--no-quicklook", default=True, show_default=True,
              help="Write <stem>.quicklook.png: the map in its colours with a legend and a scale bar.")
@opt_mmu
@click.option("--resolution", type=float, default=None, metavar="SIZE",
              help="Pixel size of STAC Items (and band-file stacks), in their CRS's units "
                   "[default: the finest of the bands the model reads].")
@click.option("--resampling", type=click.Choice(RESAMPLING), default="nearest", show_default=True,
              help="How a STAC Item's bands at other resolutions are resampled onto its grid.")
@opt_min_area
@opt_simplify
@opt_connectivity
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Write a JSON run report (per-scene status, settings, per-stage seconds, MPix/s, files).")
@opt_overwrite
@click.pass_context
def predict(ctx: click.Context, scenes: tuple[str, ...], job: str | None, **given: Any) -> None:
    """Predict a class map for each SCENE (paths, URLs or globs), or for the scenes of a --job file.

    A SCENE may be a STAC Item or ItemCollection (ITEM.json: a path, https:// or s3:// URL): the assets
    named like the model's bands are stacked virtually (nothing copied) and the outputs named after the
    Item's id.

    Writes OUTPUT_DIR/<stem>.classes.tif: a Cloud Optimized GeoTIFF of class ids on the scene's exact
    grid, with a colour table, class names and a QGIS style (<stem>.classes.qml) beside it, and the
    classes as polygons (<stem>.gpkg by default; --no-vector to skip). OUTPUT_DIR may be s3://bucket/prefix.
    Run the same command again after an interruption: finished scenes and strips are skipped.
    Exit codes: 0 done, 1 error, 3 some scenes failed (see the report), 130 interrupted.
    """
    from geoseg.io.workers import share_one_heap
    from geoseg.predict.api import PredictOptions, predict_scenes
    from geoseg.predict.report import run_report, write_report

    share_one_heap()  # this process's threads (readers, model, units) share one C heap: a lower peak, same speed
    settings = _job_settings(ctx, job, scenes, given)
    if settings.pop("no_vector", False):
        settings["vector_format"] = None
    settings["connectivity"] = int(settings["connectivity"])
    scene_list, model = settings.pop("scenes"), settings.pop("model")
    output_dir, report = settings.pop("output_dir"), settings.pop("report")
    scheduler, name = settings.pop("scheduler"), settings.pop("name")
    merge = settings.pop("merge_vectors", False)
    bar = ChipBar(ctx.obj["quiet"])
    try:
        run = predict_scenes(scene_list, model, output_dir, options=PredictOptions(**settings), progress=bar,
                             scheduler=scheduler, name=name, merge_vectors=merge)
    except KeyboardInterrupt:
        bar.close()
        click.echo("interrupted: run the same command again to resume (finished scenes and strips are kept)",
                   err=True)
        ctx.exit(EXIT_INTERRUPTED)
    finally:
        bar.close()
    if report:
        write_report(report, run_report(run))
    if not ctx.obj["quiet"]:
        for s in run.scenes:
            if s.status == "failed":
                click.echo(f"{s.scene}: FAILED: {s.error}", err=True)
                continue
            extra = [str(p) for p in (s.probabilities_path, s.confidence_path, s.vector_path) if p is not None]
            done = " (finished earlier)" if s.status == "skipped" else ""
            click.echo(f"{s.scene} -> {s.classes_path}" + "".join(f", {p}" for p in extra) + done)
        for f in run.files:
            click.echo(f"job: {f}")
        earlier = sum(s.status == "skipped" for s in run.scenes)
        note = f" ({earlier} finished by an earlier run)" if earlier else ""
        click.echo(f"{len(run.scenes)} scene(s){note}, {run.pixels / 1e6:.1f} MPix in {run.seconds:.1f} s "
                   f"({run.pixels / 1e6 / max(run.seconds, 1e-9):.2f} MPix/s) on {run.device} with {run.options.backend} "
                   f"({run.options.precision}, batch {run.options.batch_size}), {run.scheduler} scheduler")
    if run.failed:
        click.echo(f"Error: {len(run.failed)} of {len(run.scenes)} scene(s) failed; the others were written",
                   err=True)
        ctx.exit(EXIT_PARTIAL)


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--vector-format", type=click.Choice(VECTOR_FORMATS), default=None,
              help="Output format [default: from DST's extension, else gpkg].")
@opt_mmu
@opt_min_area
@opt_simplify
@opt_connectivity
@click.option("--skip-class", "skip_classes", type=int, multiple=True, metavar="ID",
              help="Class id that produces no polygons (repeatable); nodata never does.")
@click.option("--to-crs", default=None, help="Reproject the polygons (e.g. EPSG:4326); default: the raster's CRS.")
@click.option("--block-size", type=int, default=1024, show_default=True, help="Block side in pixels.")
@click.option("--confidence", type=click.Path(dir_okay=False), default=None, metavar="MAP",
              help="The class map's confidence map (<stem>.confidence.tif of predict --confidence): polygons "
                   "gain confidence_mean, the mean confidence (0..1) of their pixels.")
@opt_workers
@opt_overwrite
@click.pass_context
def vectorize(ctx: click.Context, src: str, dst: str, connectivity: str, **options: Any) -> None:
    """Polygonise the class raster SRC into DST (.gpkg, .shp, .geojson or .parquet), block by block.

    Polygons carry class_id, class_name, area_m2 and perim_m, in the raster's CRS (GeoJSON: EPSG:4326,
    as RFC 7946 requires). Polygons crossing block seams are merged: the result equals a whole-raster
    polygonisation.
    """
    from geoseg.gis.vectorize import vectorize_raster

    bar = None if ctx.obj["quiet"] else BlockBar()
    try:
        res = vectorize_raster(src, dst, connectivity=int(connectivity), progress=bar, **options)
    finally:
        if bar is not None:
            bar.close()
    if not ctx.obj["quiet"]:
        click.echo(f"{res.features} polygons -> {res.path} ({res.vector_format}, {res.crs}) in {res.seconds:.1f} s")


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the whole record as JSON (the training config included).")
def info(path: str, as_json: bool) -> None:
    """Describe a scene (size, bands, dtype, CRS, nodata, blocks) or a model bundle."""
    from geoseg.predict.report import describe_path, describe_text

    desc = describe_path(path)
    if as_json:
        click.echo(json.dumps(desc, indent=2, default=str))
        return
    click.echo(describe_text(desc))


@main.command()
@click.option("--output-dir", "-o", type=click.Path(file_okay=False), default="demo", show_default=True)
@click.option("--size", type=int, default=2048, show_default=True, help="Width and height of the predicted scene.")
@click.option("--epochs", type=int, default=12, show_default=True, help="Training epochs (15 batches each).")
@click.option("--train-seconds", type=float, default=None, help="Optional cap on the training time.")
@opt_device
@opt_overwrite
@click.pass_context
def demo(ctx: click.Context, output_dir: str, size: int, epochs: int, train_seconds: float | None, device: str,
         overwrite: bool) -> None:
    """Offline demo: make a synthetic land-cover scene, train a small U-Net, predict, score it."""
    from geoseg.learn.demo import run_demo

    bar = ChipBar(ctx.obj["quiet"], desc="demo predict")
    epochs_bar = EpochBars(ctx.obj["quiet"])
    try:
        result = run_demo(output_dir, size=size, epochs=epochs, train_seconds=train_seconds, device=device,
                          overwrite=overwrite, progress=bar, log=None if ctx.obj["quiet"] else click.echo,
                          train_progress=epochs_bar)
    finally:
        epochs_bar.close()
        bar.close()
    click.echo(result.summary())
    from geoseg.predict.jobfile import PROJECT_FILE, write_project

    project = write_project(result.bundle)
    if project is not None:
        click.echo(f"wrote {PROJECT_FILE}: `geoseg predict SCENE.tif` run in this folder now uses {result.bundle}")


# --- training commands (train, evaluate, export) ---


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--output-dir", "-o", type=click.Path(file_okay=False), required=True,
              help="Folder for checkpoints, logs, plots and the model bundle (<output-dir>/model).")
@click.option("--resume", is_flag=True, help="Continue the run in --output-dir from its last checkpoint.")
@opt_overwrite
@click.pass_context
def train(ctx: click.Context, config: str, output_dir: str, resume: bool, overwrite: bool) -> None:
    """Train a segmentation model from a YAML CONFIG (see configs/*.yaml)."""
    from geoseg.learn.config import load_config
    from geoseg.learn.train import train as train_tool

    cfg = load_config(config)
    bars = EpochBars(ctx.obj["quiet"])
    try:
        result = train_tool(cfg, output_dir, resume=resume, overwrite=overwrite, progress=bars)
    except KeyboardInterrupt:
        bars.close()
        click.echo(f"interrupted: `geoseg train {config} --output-dir {output_dir} --resume` continues from the "
                   "last finished epoch's checkpoint", err=True)
        ctx.exit(EXIT_INTERRUPTED)
    finally:
        bars.close()
    m = result.metrics
    score = f", validation mIoU {m['miou']:.4f}" if m.get("miou") is not None else ""
    click.echo(f"model bundle: {result.bundle_path} (kept epoch {result.best_epoch} of {result.epochs_run}, the {result.kept}{score}; "
               f"{result.chips_seen} training chips in {result.seconds:.0f} s, stopped by "
               f"{result.stopped_by.replace('_', ' ')})")


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False), required=True,
              help="The encoder file to write (.safetensors); name it as model.encoder_weights when training.")
@opt_overwrite
@click.pass_context
def pretrain(ctx: click.Context, config: str, output: str, overwrite: bool) -> None:
    """Pretrain an encoder on unlabelled scenes (masked-image modelling) from a YAML CONFIG
    (see configs/pretrain.yaml)."""
    from tqdm import tqdm

    from geoseg.learn.config import load_pretrain_config
    from geoseg.learn.pretrain import pretrain as pretrain_tool

    cfg = load_pretrain_config(config)
    bar = tqdm(total=cfg.steps or None, desc="pretrain", unit="step", disable=ctx.obj["quiet"], leave=False)

    def advance(step: int, total: int, loss: float) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    try:
        result = pretrain_tool(cfg, output, overwrite=overwrite, progress=advance)
    finally:
        bar.close()
    click.echo(f"encoder: {result.path} ({result.steps} steps, {result.chips} chips in {result.seconds:.0f} s; "
               f"reconstruction loss {result.loss_first:.4f} -> {result.loss_last:.4f})")


@main.command()
@click.argument("scene", required=False)
@opt_model
@click.option("--image", "-i", default=None, hidden=True, help="The SCENE (the former spelling).")
@click.option("--labels", "-l", required=True, help="Label raster (class ids) or vector file (polygons).")
@click.option("--label-column", default=None, help="Vector labels: column with class ids or names.")
@click.option("--label-value", type=int, default=None, help="Vector labels: class id of every polygon.")
@click.option("--background-outside", "background_outside", is_flag=False, flag_value="model", default=None,
              metavar="[CLASS]",
              help="Vector labels: pixels outside every polygon are this class (id or name; alone: the model's "
                   "background class, else its first class), for polygons of one class. Default: the model's "
                   "background class if it has one, else outside pixels are not scored.")
@click.option("--within", default=None, help="Vector file limiting the scored area (e.g. split/*_val.geojson).")
@opt_output_dir
@opt_bands
@opt_tile_size
@opt_overlap
@opt_batch_size
@opt_device
@opt_precision
@opt_workers
@click.option("--tta", is_flag=True, help="Average over flips and 90-degree rotations.")
@click.option("--keep-prediction", is_flag=True, help="Keep the class map in --output-dir.")
@opt_overwrite
@click.pass_context
def evaluate(ctx: click.Context, scene: str | None, model: str, image: str | None, labels: str, label_column: str | None,
             label_value: int | None, background_outside: str | None, within: str | None, output_dir: str, bands: list[int] | None,
             tile_size: int | None, overlap: int | None, batch_size: int | str, device: str, precision: str,
             workers: int | None, tta: bool, keep_prediction: bool, overwrite: bool) -> None:
    """Predict SCENE with a model and score it against labels (IoU, F1, precision, recall)."""
    from geoseg.learn.evaluate import evaluate as evaluate_tool

    if (scene is None) == (image is None):
        raise click.UsageError("give the SCENE to score (once): geoseg evaluate SCENE --model M --labels L")
    image = scene or image
    assert image is not None

    bar = ChipBar(ctx.obj["quiet"], desc="evaluate")
    try:
        result = evaluate_tool(model, image, labels, label_column=label_column, label_value=label_value,
                               background_outside=background_outside, within=within, output_dir=output_dir, bands=bands, tile_size=tile_size,
                               overlap=overlap, batch_size=batch_size, device=device, precision=precision,
                               workers=workers, tta=tta, keep_prediction=keep_prediction, overwrite=overwrite, progress=bar)
    finally:
        bar.close()
    click.echo(result.markdown_path.read_text().rstrip())
    click.echo(f"reports: {result.json_path}, {result.markdown_path}")


@main.command()
@click.argument("model", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript", "mlm"]), default="onnx", show_default=True,
              help="onnx (ONNX Runtime, QGIS Deepness), torchscript (torch.jit) or mlm (a STAC MLM Item of MODEL).")
@click.option("--output-dir", "-o", "output", default=None, type=click.Path(),
              help="Export folder (network + model.json + model.mlm.json) [default: <model>-<format> beside the "
                   "bundle]; for mlm, the folder of <model>.mlm.json [default: beside the bundle].")
@click.option("--output", "output_old", default=None, type=click.Path(), hidden=True,
              help="The former spelling of --output-dir.")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset version.")
@click.option("--int8", is_flag=True,
              help="ONNX: quantise to int8 (static QDQ), calibrated on the bundle's training chips or --calibration; "
                   "the float32 network stays beside it as model.fp32.onnx.")
@click.option("--calibration", default=None, metavar="SCENE",
              help="A scene whose chips calibrate --int8 (for a bundle without calibration.npz).")
@opt_overwrite
def export(model: str, fmt: str, output: str | None, output_old: str | None, opset: int, int8: bool,
           calibration: str | None, overwrite: bool) -> None:
    """Export a MODEL bundle to ONNX or TorchScript (a bundle geoseg and other tools run), or describe it as a
    STAC MLM Item."""
    from pathlib import Path

    from geoseg.model.export import export as export_tool
    from geoseg.model.export import mlm_path

    output = output or output_old
    if fmt == "mlm" and output is not None:
        output = str(Path(output) / mlm_path(Path(model)).name)
    result = export_tool(model, fmt, output, opset=opset, overwrite=overwrite, int8=int8, calibration=calibration)
    if fmt == "mlm":
        click.echo(f"{result.contract_path} (STAC MLM item of {result.model_path})")
        return
    click.echo(f"{result.model_path} (contract {result.contract_path}; max |diff| vs PyTorch "
               f"{result.max_abs_diff:.2g})")
    if int8:
        from geoseg.model.bundle import read_bundle

        q = read_bundle(result.folder).contract.metadata["export"]["int8"]
        click.echo(f"int8: {100 * q['agreement']:.2f} % of the calibration pixels keep the fp32 class "
                   f"({q['calibration_chips']} chips of {q['calibration']})")


# --- accuracy assessment (sample, assess) ---


@main.command()
@click.argument("classmap")
@click.option("-n", "n", type=int, default=None,
              help="Sample size (points) [default: eq. 13's size for --target-se].")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="The points file: .gpkg, .shp, .geojson or .parquet.")
@click.option("--allocation", default="proportional", show_default=True, metavar="NAME",
              help="Points per stratum (map class): proportional (to area), equal, neyman, or min:N (at least N "
                   "per class, the rest by area; Olofsson et al. recommend 50-100).")
@click.option("--seed", type=int, default=None, help="Random seed; the same seed draws the same points.")
@click.option("--target-se", type=float, default=None, metavar="SE",
              help="Target standard error of overall accuracy (e.g. 0.01): suggests the sample size (eq. 13).")
@click.option("--expected-accuracy", default=None, metavar="U|ID:U,...",
              help="Conjectured user's accuracy for --target-se and neyman: one value or per class id, e.g. "
                   "1:0.7,2:0.6 [default: 0.9].")
@click.option("--label-from", default=None, metavar="RASTER",
              help="Fill the reference column from this one-band raster of reference class ids (a better map, "
                   "or the demo's truth): each point takes the class under it [default: left empty].")
@click.option("--vector-format", type=click.Choice(VECTOR_FORMATS), default=None,
              help="Output format [default: from --output's extension].")
@opt_overwrite
@click.pass_context
def sample(ctx: click.Context, classmap: str, **options: Any) -> None:
    """Draw a stratified random sample of points from CLASSMAP for reference interpretation.

    The map classes are the strata; points sit at pixel centres and carry class_id, class_name, stratum_px
    (the stratum's pixels) and an empty reference column to fill in (a class id or name) for geoseg assess,
    or filled from a reference class raster with --label-from.
    """
    from geoseg.assess import sample_points

    result = sample_points(classmap, options.pop("output"), options.pop("n"), **options)
    if not ctx.obj["quiet"]:
        if result.suggested_n is not None:
            click.echo(f"eq. 13: {result.suggested_n} points for a standard error of {result.target_se:g} in "
                       "overall accuracy")
        click.echo("  id  class                     pixels   weight  points")
        for s in result.strata:
            click.echo(f"{s.id:>4}  {s.name:<22} {s.pixels:>10} {s.weight:8.4f} {s.points:>7}")
        click.echo(f"{result.n} points ({result.allocation}, seed {result.seed}) -> {result.path}")
        if result.label_from is not None:
            click.echo(f"reference filled from {result.label_from} for {result.labelled} of {result.n} points")


@main.command()
@click.argument("classmap")
@click.option("--reference", "-r", required=True,
              help="The points with their reference classes (geoseg sample's file, filled in).")
@click.option("--reference-column", default="reference", show_default=True,
              help="Column of the reference class: a class id or a class name of the map.")
@click.option("--output-dir", "-o", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Folder for <stem>.assessment.json, .md, .csv and .png.")
@opt_overwrite
@click.pass_context
def assess(ctx: click.Context, classmap: str, reference: str, reference_column: str, output_dir: str,
           overwrite: bool) -> None:
    """Estimate CLASSMAP's accuracy and class areas with 95 % confidence intervals from reference points
    (stratified estimators of Olofsson et al. 2014; strata weighted by the map's exact pixel counts)."""
    from geoseg.assess import assess as assess_tool

    result = assess_tool(classmap, reference, reference_column, output_dir, overwrite=overwrite)
    if not ctx.obj["quiet"]:
        click.echo(result.markdown_path.read_text(encoding="utf-8").rstrip())
        click.echo(f"reports: {result.json_path}, {result.markdown_path}, {result.csv_path}, {result.png_path}")


if __name__ == "__main__":  # pragma: no cover
    main()
