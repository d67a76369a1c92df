"""The ``geoseg`` command line: each command parses its options, then makes one library call.

Heavy modules (torch, segmentation-models-pytorch) are imported inside the commands that run a model,
so ``geoseg --help`` and ``geoseg info`` start fast. Options shared by several commands are declared once
below and mean the same everywhere.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from geoseg import __version__
from geoseg.errors import GeoSegError
from geoseg.progress_bars import BlockBar, ChipBar, EpochBars

F = Callable[..., Any]


def _disk_full(ctx: click.Context, exc: Exception) -> GeoSegError | None:
    """A full disk under the output folder the command was given (train, vectorize, export...)."""
    from geoseg.store import disk_full

    params = ctx.meta.get("geoseg.params", {})
    folder = next((params[k] for k in ("output_dir", "output") if params.get(k)), None)
    return disk_full(exc, str(folder) if folder is not None else None)


def _late_verbosity(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """``-q`` / ``-v`` given after the subcommand: the same as before it."""
    if not value:
        return
    root = ctx.find_root()
    root.obj = root.obj or {}
    if param.name == "quiet":
        root.obj["quiet"] = True
    else:
        root.obj["verbose"] = max(root.obj.get("verbose", 0), int(value))
    _setup_logging(2 if root.params.get("debug") else root.obj.get("verbose", 0), root.obj.get("quiet", False))


class _Command(click.Command):
    """Takes ``-q``/``-v`` after its name too, and leaves its parsed options where the group's error handler
    can see them."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.params += [
            click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_late_verbosity,
                         help="More log output (-vv for debug); also accepted before the command."),
            click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_late_verbosity,
                         help="Only errors; no progress bars; also accepted before the command."),
        ]

    def invoke(self, ctx: click.Context) -> Any:
        ctx.meta["geoseg.params"] = ctx.params
        return super().invoke(ctx)


class _Group(click.Group):
    """Turns geoseg's domain errors into one-line messages and a non-zero exit code."""

    command_class = _Command

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GeoSegError as exc:
            if ctx.params.get("debug"):
                raise
            raise click.ClickException(str(exc)) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a bug, not bad input: still one line, the traceback on request
            if ctx.params.get("debug"):
                raise
            full = _disk_full(ctx, exc)
            if full is not None:
                raise click.ClickException(str(full)) from None
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise click.ClickException(f"internal error: {type(exc).__name__}: {first} (run again with "
                                       "geoseg --debug for the traceback, and please report it)") from None


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        out = [int(v) for v in value.replace(" ", "").split(",") if v]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated band numbers, e.g. 3,2,1") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{value!r}: band numbers start at 1")
    return out


class BatchSize(click.ParamType):
    """``auto`` or a positive whole number."""

    name = "auto|N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) or value == "auto":
            return value
        try:
            n = int(value)
        except ValueError:
            n = 0
        if n < 1:
            self.fail(f"{value!r}: give a positive whole number of chips, or auto", param, ctx)
        return n


# ------------------------------------------------------------------ options shared by several commands
opt_model = click.option("--model", "-m", "model", required=True, type=click.Path(exists=False),
                         help="Model bundle: a directory with model.json, or a geoseg .safetensors file.")
opt_output_dir = click.option("--output-dir", "-o", type=click.Path(file_okay=False), default=".",
                              show_default=True, help="Folder for the outputs.")
opt_tile_size = click.option("--tile-size", type=int, default=None,
                             help="Chip size in pixels [default: the bundle's chip size].")
opt_overlap = click.option("--overlap", type=int, default=None,
                           help="Pixels shared by neighbouring chips [default: the bundle's overlap].")
opt_batch_size = click.option("--batch-size", type=BatchSize(), default="auto", show_default=True,
                              help="Chips per model batch; auto: about one 512 px chip of pixels per batch on a "
                                   "CPU, what fits in 60% of free memory on a GPU.")
opt_device = click.option("--device", default="auto", show_default=True,
                          help="auto (CUDA, else Apple's mps, else the CPU), cpu, cuda, cuda:N or mps.")
opt_precision = click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
                             default="auto", show_default=True,
                             help="Number format of the network. auto: bf16 on CUDA where supported (else fp16); "
                                  "on a CPU bf16 with Intel AMX, else fp32.")
opt_backend = click.option("--backend", type=click.Choice(["eager", "onnxruntime"]), default="eager",
                           show_default=True,
                           help="What runs the network: eager PyTorch, or ONNX Runtime on the CPU (float32; "
                                "0.6-0.8x eager's time per chip here, checked against eager on the first batch).")
opt_workers = click.option("--workers", type=int, default=None,
                           help="Reader threads and Dask workers [default: min(4, CPU cores)].")
opt_bands = click.option("--bands", callback=_int_list, default=None, metavar="N,N,...",
                         help="Scene band numbers (1-based) feeding the model inputs, in order "
                              "[default: from the bundle].")
opt_overwrite = click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
VECTOR_FORMATS = ["gpkg", "shp", "geojson", "parquet"]
opt_min_area = click.option("--min-area", default=None, metavar="AREA",
                            help="Drop smaller polygons (measured after --simplify): px, m2, ha or km2, e.g. 40px, "
                                 "200m2, 0.5ha, 1km2 (a plain number is pixels).")
opt_simplify = click.option("--simplify", default=None, metavar="TOL",
                            help="Topology-preserving simplification: 1m, 0.5px, or CRS units.")
opt_mmu = click.option("--mmu", default=None, metavar="AREA",
                       help="Minimum mapping unit: regions smaller than this take the class of their largest "
                            "neighbour first (GDAL's sieve of the whole map, streamed; same --connectivity): "
                            "px, m2, ha or km2, e.g. 0.5ha, 5000m2, 12px (a plain number is pixels).")
opt_connectivity = click.option("--connectivity", type=click.Choice(["4", "8"]), default="4", show_default=True,
                                help="Pixel connectivity of polygons.")


def _quiet_library_warnings() -> None:
    """geoseg says itself when a scene has no CRS; GDAL's and pyogrio's repeats of it are noise here."""
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    warnings.filterwarnings("ignore", message="'crs' was not provided")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 \
        else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geoseg")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (and debug log output).")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool, debug: bool) -> None:
    """geoseg: land-cover segmentation of large GeoTIFFs."""
    _setup_logging(2 if debug else verbose, quiet)
    _quiet_library_warnings()
    ctx.obj = {"quiet": quiet, "verbose": verbose}


EXIT_PARTIAL = 3  # some scenes of a job failed, the others were written
EXIT_INTERRUPTED = 130


def _job_settings(ctx: click.Context, job: str | None, scenes: tuple[str, ...], given: dict[str, Any]
                  ) -> dict[str, Any]:
    """The job's settings: the job file's, overridden by what the command line sets explicitly."""
    from click.core import ParameterSource

    from geoseg.jobfile import default_model, find_project, load_job

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
@opt_min_area
@opt_simplify
@opt_connectivity
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Write a JSON run report (per-scene status, settings, per-stage seconds, MPix/s, files).")
@opt_overwrite
@click.pass_context
def predict(ctx: click.Context, scenes: tuple[str, ...], job: str | None, **given: Any) -> None:
    """Predict a class map for each SCENE (paths, URLs or globs), or for the scenes of a --job file.

    Writes OUTPUT_DIR/<stem>.classes.tif: a Cloud Optimized GeoTIFF of class ids on the scene's exact
    grid, with a colour table, class names and a QGIS style (<stem>.classes.qml) beside it, and the
    classes as polygons (<stem>.gpkg by default; --no-vector to skip). OUTPUT_DIR may be s3://bucket/prefix.
    Run the same command again after an interruption: finished scenes and strips are skipped.
    Exit codes: 0 done, 1 error, 3 some scenes failed (see the report), 130 interrupted.
    """
    from geoseg.predict import PredictOptions, predict_scenes
    from geoseg.report import run_report, write_report

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
            extra = [str(p) for p in (s.probabilities_path, s.vector_path) if p is not None]
            done = " (finished earlier)" if s.status == "skipped" else ""
            click.echo(f"{s.scene} -> {s.classes_path}" + "".join(f", {p}" for p in extra) + done)
        for f in run.files:
            click.echo(f"job: {f}")
        earlier = sum(s.status == "skipped" for s in run.scenes)
        note = f" ({earlier} finished by an earlier run)" if earlier else ""
        click.echo(f"{len(run.scenes)} scene(s){note}, {run.pixels / 1e6:.1f} MPix in {run.seconds:.1f} s "
                   f"({run.pixels / 1e6 / max(run.seconds, 1e-9):.2f} MPix/s) on {run.device} "
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
@opt_workers
@opt_overwrite
@click.pass_context
def vectorize(ctx: click.Context, src: str, dst: str, connectivity: str, **options: Any) -> None:
    """Polygonise the class raster SRC into DST (.gpkg, .shp, .geojson or .parquet), block by block.

    Polygons carry class_id, class_name, area_m2 and perim_m, in the raster's CRS (GeoJSON: EPSG:4326,
    as RFC 7946 requires). Polygons crossing block seams are merged: the result equals a whole-raster
    polygonisation.
    """
    from geoseg.vectorize import vectorize_raster

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
    from geoseg.report import describe_path, describe_text

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
    from geoseg.demo import run_demo

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
    from geoseg.jobfile import PROJECT_FILE, write_project

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
    from geoseg.config import load_config
    from geoseg.train import train as train_tool

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

    from geoseg.config import load_pretrain_config
    from geoseg.pretrain import pretrain as pretrain_tool

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
    from geoseg.evaluate import evaluate as evaluate_tool

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
@opt_overwrite
def export(model: str, fmt: str, output: str | None, output_old: str | None, opset: int, overwrite: bool) -> None:
    """Export a MODEL bundle to ONNX or TorchScript (a bundle geoseg and other tools run), or describe it as a
    STAC MLM Item."""
    from pathlib import Path

    from geoseg.export import export as export_tool
    from geoseg.export import mlm_path

    output = output or output_old
    if fmt == "mlm" and output is not None:
        output = str(Path(output) / mlm_path(Path(model)).name)
    result = export_tool(model, fmt, output, opset=opset, overwrite=overwrite)
    if fmt == "mlm":
        click.echo(f"{result.contract_path} (STAC MLM item of {result.model_path})")
        return
    click.echo(f"{result.model_path} (contract {result.contract_path}; max |diff| vs PyTorch "
               f"{result.max_abs_diff:.2g})")


if __name__ == "__main__":  # pragma: no cover
    main()
