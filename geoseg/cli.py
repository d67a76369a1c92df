"""The ``geoseg`` command line: each command parses its options, then makes one library call.

Heavy modules (torch, segmentation-models-pytorch) are imported inside the commands that run a model,
so ``geoseg --help`` and ``geoseg info`` start fast. Options shared by several commands are declared once
below and mean the same everywhere.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from geoseg import __version__
from geoseg.errors import GeoSegError

F = Callable[..., Any]


class _Group(click.Group):
    """Turns geoseg's domain errors into one-line messages and a non-zero exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GeoSegError as exc:
            raise click.ClickException(str(exc)) from None


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


# ------------------------------------------------------------------ options shared by several commands
opt_model = click.option("--model", "-m", "model", required=True, type=click.Path(exists=False),
                         help="Model bundle: a directory with model.json, or a geoseg .safetensors file.")
opt_output_dir = click.option("--output-dir", "-o", type=click.Path(file_okay=False), default=".",
                              show_default=True, help="Folder for the outputs.")
opt_tile_size = click.option("--tile-size", type=int, default=None,
                             help="Chip size in pixels [default: the bundle's chip size].")
opt_overlap = click.option("--overlap", type=int, default=None,
                           help="Pixels shared by neighbouring chips [default: the bundle's overlap].")
opt_batch_size = click.option("--batch-size", type=int, default=8, show_default=True,
                              help="Chips per model batch.")
opt_device = click.option("--device", default="auto", show_default=True,
                          help="auto (CUDA when available), cpu, cuda or cuda:N.")
opt_precision = click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
                             default="auto", show_default=True,
                             help="Mixed precision on CUDA (auto: bf16 where supported); CPU runs fp32.")
opt_workers = click.option("--workers", type=int, default=None,
                           help="Reader threads and Dask workers [default: min(4, CPU cores)].")
opt_bands = click.option("--bands", callback=_int_list, default=None, metavar="N,N,...",
                         help="Scene band numbers (1-based) feeding the model inputs, in order "
                              "[default: from the bundle].")
opt_overwrite = click.option("--overwrite", is_flag=True, help="Replace existing outputs.")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 \
        else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="geoseg")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """geoseg: land-cover segmentation of large GeoTIFFs."""
    _setup_logging(verbose, quiet)
    ctx.obj = {"quiet": quiet}


class _ChipBar:
    """A tqdm bar over chips with the output rate in MPix/s."""

    def __init__(self, quiet: bool, desc: str = "predict"):
        self.quiet = quiet
        self.desc = desc
        self.bar: Any = None  # created at the first event, so errors before any work print alone
        self.t0 = time.perf_counter()

    def __call__(self, ev: Any) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=ev.chips_total, desc=self.desc, unit="chip", dynamic_ncols=True, mininterval=0.5)
            self.t0 = time.perf_counter()
        self.bar.total = ev.chips_total
        self.bar.n = ev.chips_done
        rate = ev.pixels_done / max(time.perf_counter() - self.t0, 1e-9) / 1e6
        self.bar.set_postfix_str(f"{rate:.2f} MPix/s", refresh=False)
        self.bar.refresh() if ev.chips_done == ev.chips_total else self.bar.update(0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@main.command()
@click.argument("scenes", nargs=-1, required=True)
@opt_model
@opt_output_dir
@opt_tile_size
@opt_overlap
@opt_batch_size
@opt_device
@opt_precision
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
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Write a JSON run report (settings, per-stage seconds, MPix/s, peak memory).")
@opt_overwrite
@click.pass_context
def predict(ctx: click.Context, scenes: tuple[str, ...], model: str, output_dir: str, report: str | None,
            **options: Any) -> None:
    """Predict a class map for each SCENE (paths, URLs or globs).

    Writes OUTPUT_DIR/<stem>.classes.tif: a Cloud Optimized GeoTIFF of class ids on the scene's exact
    grid, with a colour table, class names and a QGIS style (<stem>.classes.qml) beside it.
    """
    from geoseg.predict import PredictOptions, predict_scenes
    from geoseg.report import run_report, write_report

    bar = _ChipBar(ctx.obj["quiet"])
    try:
        run = predict_scenes(list(scenes), model, output_dir, options=PredictOptions(**options), progress=bar)
    finally:
        bar.close()
    if report:
        write_report(report, run_report(run))
    if not ctx.obj["quiet"]:
        for s in run.scenes:
            click.echo(f"{s.scene} -> {s.classes_path}" + (f", {s.probabilities_path}" if s.probabilities_path else ""))
        click.echo(f"{len(run.scenes)} scene(s), {run.pixels / 1e6:.1f} MPix in {run.seconds:.1f} s "
                   f"({run.pixels / 1e6 / max(run.seconds, 1e-9):.2f} MPix/s) on {run.device}")


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(path: str, as_json: bool) -> None:
    """Describe a scene (size, bands, dtype, CRS, nodata, blocks) or a model bundle."""
    from geoseg.report import describe_path

    desc = describe_path(path)
    if as_json:
        click.echo(json.dumps(desc, indent=2, default=str))
        return
    for key, value in desc.items():
        if isinstance(value, (list, dict)):
            value = json.dumps(value, default=str)
        click.echo(f"{key}: {value}")


@main.command()
@click.option("--output-dir", "-o", type=click.Path(file_okay=False), default="demo", show_default=True)
@click.option("--size", type=int, default=2048, show_default=True, help="Width and height of the predicted scene.")
@click.option("--train-seconds", type=float, default=60, show_default=True, help="Training time budget.")
@opt_device
@opt_overwrite
@click.pass_context
def demo(ctx: click.Context, output_dir: str, size: int, train_seconds: float, device: str, overwrite: bool) -> None:
    """Offline demo: make a synthetic land-cover scene, train a small U-Net, predict, score it."""
    from geoseg.demo import run_demo

    bar = _ChipBar(ctx.obj["quiet"], desc="demo predict")
    try:
        result = run_demo(output_dir, size=size, train_seconds=train_seconds, device=device,
                          overwrite=overwrite, progress=bar, log=None if ctx.obj["quiet"] else click.echo)
    finally:
        bar.close()
    click.echo(result.summary())


# --- training commands (train, evaluate, export) ---


if __name__ == "__main__":  # pragma: no cover
    main()
