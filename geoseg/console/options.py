"""The command line's shared machinery: one-line errors with a non-zero exit, ``-q``/``-v`` before or after
a command's name, option types, and the options several commands share, declared once so that a flag means the
same in every command (as rasterio's ``rio/options.py``)."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from geoseg.errors import GeoSegError


def disk_full_error(ctx: click.Context, exc: Exception) -> GeoSegError | None:
    """A full disk under the output folder the command was given (train, vectorize, export...)."""
    from geoseg.io.staging import disk_full

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
    setup_logging(2 if root.params.get("debug") else root.obj.get("verbose", 0), root.obj.get("quiet", False))


class Command(click.Command):
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


class Group(click.Group):
    """Turns geoseg's domain errors into one-line messages and a non-zero exit code."""

    command_class = Command

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
            full = disk_full_error(ctx, exc)
            if full is not None:
                raise click.ClickException(str(full)) from None
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise click.ClickException(f"internal error: {type(exc).__name__}: {first} (run again with "
                                       "geoseg --debug for the traceback, and please report it)") from None


def int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
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
opt_precision = click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16", "int8"]),
                             default="auto", show_default=True,
                             help="Number format of the network. auto: bf16 on CUDA where supported (else fp16); "
                                  "on a CPU bf16 with Intel AMX, else fp32; an ONNX bundle fp32 (int8 when "
                                  "exported with --int8). int8: ONNX bundles only, checked against fp32 on the "
                                  "scene's first chip and 4 more spread over it.")
opt_backend = click.option("--backend", type=click.Choice(["eager", "onnxruntime", "openvino", "auto"]),
                           default="eager", show_default=True,
                           help="What runs the network: eager PyTorch, or ONNX Runtime on the CPU (float32; "
                                "0.6-0.8x eager's time per chip here, checked against eager on the first batch). "
                                "An ONNX bundle runs without torch, in ONNX Runtime or, with openvino, in OpenVINO "
                                "(pip install openvino). auto: the fastest of those this bundle and machine can "
                                "run, by a probe of a few batches at the job's start (a few seconds), used for "
                                "the whole job.")
opt_workers = click.option("--workers", type=int, default=None,
                           help="Reader threads and Dask workers [default: min(4, CPU cores)].")
opt_bands = click.option("--bands", callback=int_list, default=None, metavar="N,N,...",
                         help="Scene band numbers (1-based) feeding the model inputs, in order "
                              "[default: from the bundle].")
opt_overwrite = click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
VECTOR_FORMATS = ["gpkg", "shp", "geojson", "parquet"]
RESAMPLING = ["nearest", "bilinear", "cubic", "cubicspline", "lanczos", "average", "mode"]  # geoseg.io.vrt.RESAMPLING
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


def quiet_library_warnings() -> None:
    """geoseg says itself when a scene has no CRS; GDAL's and pyogrio's repeats of it are noise here."""
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
    warnings.filterwarnings("ignore", message="'crs' was not provided")


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 \
        else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s", stream=sys.stderr, force=True)
