"""Job files: many scenes predicted with one model into one output folder (``geoseg predict --job job.yaml``).

A job file is YAML, checked like a training config (:mod:`geoseg.learn.config`): an unknown key is named with the
keys allowed there, a bad value names its key and the allowed values, and every error is one line that
starts with the file's path (:class:`geoseg.errors.ConfigError`). Relative local paths and globs are made
absolute against the job file's folder; URLs are kept as they are; globs are not expanded here (the predict
engine expands them). Nothing is checked for existence except ``scenes_file``, which is read.

See ``configs/job-example.yaml`` for a commented example.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from geoseg.errors import ConfigError, InputError
from geoseg.io.settings import format_validation_error, read_yaml_file, resolve_path

# The allowed values mirror the library's registries (geoseg.predict.inference.PRECISIONS, geoseg.predict.blend.BLEND_WINDOWS,
# geoseg.predict.api.PROBABILITY_DTYPES, geoseg.io.profiles.COMPRESSIONS, geoseg.gis.vectorize.FORMATS,
# geoseg.io.vrt.RESAMPLING); they are spelled
# out here so that reading a job file imports neither torch nor GDAL, and tests/predict/test_jobfile.py keeps them equal.
Precision = Literal["auto", "fp32", "bf16", "fp16", "int8"]
BlendWindow = Literal["cosine", "hann", "gaussian", "uniform"]
ProbabilitiesDtype = Literal["uint8", "float16", "float32"]
Compression = Literal["deflate", "zstd", "lzw"]
VectorFormat = Literal["gpkg", "shp", "geojson", "parquet"]
Resampling = Literal["nearest", "bilinear", "cubic", "cubicspline", "lanczos", "average", "mode"]  # geoseg.io.vrt

SCHEDULER_SCHEMES = ("tcp", "tls", "ws", "wss")
_LOCAL_CLUSTER = re.compile(r"^local:(\d+)$")
_ADDRESS = re.compile(r"^(?P<scheme>[a-z]+)://(?P<host>[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::(?P<port>\d{1,5}))?/?$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_SCHEDULER_FORMS = ("null (local threads), 'threads', 'local:N' (a local dask cluster of N worker processes) "
                    f"or a scheduler address such as tcp://host:8786 ({', '.join(s + '://' for s in SCHEDULER_SCHEMES)})")

class _Strict(BaseModel):
    # strict: a YAML file gives typed values, so `batch_size: true` or `connectivity: "8"` is a mistake
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class JobOptions(_Strict):
    """Predict options of a job: exactly the fields of :class:`geoseg.predict.api.PredictOptions`.

    ``None`` means: take it from the model bundle (or the library default).
    """

    tile_size: int | None = Field(default=None, ge=16, description="chip side in pixels; default the bundle's")
    overlap: int | None = Field(default=None, ge=0, description="chip overlap in pixels; default the bundle's")
    batch_size: int | str = Field(default="auto", description="chips per model call; auto: chosen per device")
    device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps")
    precision: Precision = "auto"
    backend: Literal["eager", "onnxruntime", "openvino", "auto"] = Field(
        default="eager", description="eager or onnxruntime (CPU); openvino for ONNX bundles; auto: the fastest, "
                                     "by a probe at the job's start")
    workers: int | None = Field(default=None, ge=1, description="reader threads; default min(4, CPU cores)")
    bands: list[int] | None = Field(default=None, min_length=1, description="1-based scene bands; default the bundle's")
    blend: BlendWindow = "cosine"
    probabilities: bool = False
    probabilities_dtype: ProbabilitiesDtype = "uint8"
    confidence: bool = Field(default=False, description="<stem>.confidence.tif: the mapped class's probability")
    compress: Compression = "deflate"
    overwrite: bool = False
    tta: bool = False
    panel_width: int = Field(default=8192, ge=512)
    unit_rows: int | None = Field(default=None, ge=512, description="rows per unit of work; default the whole panel")
    vector_format: VectorFormat | None = Field(default="gpkg", description="null: no polygons")
    min_area: float | str | None = Field(default=None, description="40px, 200m2, 0.5ha; a plain number is pixels")
    simplify: float | str | None = Field(default=None, description="1m, 0.5px; a plain number is CRS units")
    connectivity: Literal[4, 8] = 4
    mmu: float | str | None = Field(default=None, description="minimum mapping unit: 0.5ha, 5000m2, 12px; a plain "
                                    "number is pixels")
    quicklook: bool = Field(default=True, description="<stem>.quicklook.png beside every class map")
    resolution: float | None = Field(default=None, gt=0, description="pixel size of STAC Items and band-file "
                                     "stacks, in CRS units; default the finest of their bands")
    resampling: Resampling = Field(default="nearest", description="of stacked bands onto their grid")

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, v: Any) -> Any:
        if v == "auto":
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{v!r}: give a whole number of chips (an integer) or auto")
        if v < 1:
            raise ValueError(f"{v}: must be greater than or equal to 1, or auto")
        return v

    @field_validator("bands")
    @classmethod
    def _bands(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and min(v) < 1:
            raise ValueError(f"band numbers are 1-based, got {v}")
        return v

    @field_validator("min_area", "simplify", "mmu", mode="before")
    @classmethod
    def _quantity(cls, v: Any, info: ValidationInfo) -> Any:
        if isinstance(v, str):  # numbers are checked by the type; a unit needs the vectoriser's own parser
            from geoseg.gis.quantities import parse_mmu
            from geoseg.gis.vectorize import parse_min_area, parse_simplify

            parse = {"min_area": parse_min_area, "mmu": parse_mmu}.get(info.field_name or "", parse_simplify)
            try:
                parse(v)
            except InputError as exc:
                raise ValueError(str(exc)) from None
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0:
            raise ValueError(f"{info.field_name} must be a non-negative number, got {v}")
        return v


class JobFile(_Strict):
    """A mapping job: scenes, one model, one output folder, and how to run it.

    Read one with :func:`load_job`; relative paths are then absolute against the job file's folder.
    """

    scenes: list[str | list[str]] = Field(
        default_factory=list, description="paths, globs or URLs (s3://, https://) of rasters or STAC Items "
                                          "(.json); a list of band files is one scene")
    scenes_file: str | None = Field(default=None, description="text file with one scene per line")
    model: str = Field(description="model bundle: path or URL")
    output_dir: str = Field(description="output folder or URL (s3://bucket/maps/)")
    name: str = Field(description="job name: <name>.vrt mosaic, <name> vector layer; default the file's stem")
    scheduler: str | None = Field(default=None, description=_SCHEDULER_FORMS)
    merge_vectors: bool = False
    report: str | None = Field(default=None, description="JSON run report path")
    options: JobOptions = Field(default_factory=JobOptions)

    _source: str = PrivateAttr(default="job")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict):
            default_name = (info.context or {}).get("default_name")
            if "name" not in data and default_name is not None:
                data = {**data, "name": default_name}
            if data.get("options", {}) is None:  # `options:` with nothing under it
                data = {**data, "options": {}}
        return data

    @field_validator("scenes", mode="before")
    @classmethod
    def _scenes_shorthand(cls, v: Any) -> Any:
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("scenes")
    @classmethod
    def _resolve_scenes(cls, v: list[str | list[str]], info: ValidationInfo) -> list[str | list[str]]:
        if any(not s for s in v) or any(not f.strip() for s in v for f in ([s] if isinstance(s, str) else s)):
            raise ValueError("a scene is an empty string (or an empty list of band files)")
        base = (info.context or {}).get("base_dir")
        if base is None:
            return v
        return [resolve_path(s.strip(), base) if isinstance(s, str) else [resolve_path(f.strip(), base) for f in s]
                for s in v]

    @field_validator("scenes_file", "model", "output_dir", "report")
    @classmethod
    def _resolve(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("must not be empty")
        if info.field_name == "scenes_file" and "://" in v:
            raise ValueError(f"scenes_file {v!r} must be a local file; list URLs in it, or under scenes:")
        base = (info.context or {}).get("base_dir")
        return resolve_path(v.strip(), base) if base is not None else v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _SAFE_NAME.match(v) or len(v) > 200:
            raise ValueError(f"job name {v!r} must be a file stem of letters, digits, '-', '_' and '.' "
                             "(it names <name>.vrt and the <name> vector layer); the default is the job "
                             "file's stem, so set name: when that has other characters")
        return v

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str | None) -> str | None:
        if v is None or v == "threads":
            return v
        local = _LOCAL_CLUSTER.match(v)
        if local:
            if int(local.group(1)) < 1:
                raise ValueError(f"scheduler {v!r} needs at least one worker process, e.g. local:4")
            return v
        address = _ADDRESS.match(v)
        if address and address["scheme"] in SCHEDULER_SCHEMES and 0 < int(address["port"] or 1) < 65536:
            return v
        raise ValueError(f"scheduler {v!r} is not understood; use {_SCHEDULER_FORMS}")

    @model_validator(mode="after")
    def _some_scenes(self) -> JobFile:
        if not self.scenes and self.scenes_file is None:
            raise ValueError("no scenes: give scenes (paths, globs or URLs) or scenes_file (one scene per line)")
        return self

    # ------------------------------------------------------------------ derived values

    def scene_list(self) -> list[str | list[str]]:
        """The scenes: ``scenes`` then the entries of ``scenes_file``, in order, with paths resolved.

        Globs are returned as they are (absolute), not expanded. In ``scenes_file``, blank lines and ``#``
        comments are skipped and relative entries are relative to that file's folder.

        Raises:
            ConfigError: ``scenes_file`` cannot be read, or no scene is given at all.
        """
        scenes = list(self.scenes)
        if self.scenes_file is not None:
            listed = Path(self.scenes_file)
            try:
                text = listed.read_text()
            except OSError as exc:
                raise ConfigError(f"{self._source}: cannot read scenes_file {listed}: {exc.strerror or exc}; "
                                  "give a text file with one scene per line") from None
            for line in text.splitlines():
                entry = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()
                if entry:
                    scenes.append(resolve_path(entry, listed.parent))
        if not scenes:
            where = f"scenes_file {self.scenes_file} lists no scenes" if self.scenes_file else "no scenes"
            raise ConfigError(f"{self._source}: {where}; give at least one path, glob or URL")
        return scenes

    def predict_options(self) -> dict[str, Any]:
        """The options the file set, as keyword arguments of :class:`geoseg.predict.api.PredictOptions`.

        Options the file leaves out are left out here, so the library (or the command line) decides them;
        the defaults shown by :class:`JobOptions` are ``PredictOptions``' own.
        """
        return self.options.model_dump(exclude_unset=True)


def job_from_dict(data: Any, where: str = "job", base_dir: str | os.PathLike[str] | None = None,
                  default_name: str | None = None) -> JobFile:
    """Validate a mapping as a :class:`JobFile`.

    Args:
        data: the parsed YAML.
        where: what error messages start with (the file's path).
        base_dir: relative paths are resolved against it; ``None`` keeps them as given.
        default_name: ``name`` when the mapping has none.

    Raises:
        ConfigError: the mapping does not validate.
    """
    if not isinstance(data, dict):
        got = "an empty file" if data is None else type(data).__name__
        raise ConfigError(f"{where}: a job file must be a mapping of keys (scenes, model, output_dir...), got {got}")
    context = {"base_dir": base_dir, "default_name": default_name}
    try:
        job = JobFile.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, where, JobFile)) from None
    job._source = where
    return job


def load_job(path: str | os.PathLike[str]) -> JobFile:
    """Read and validate a YAML job file; ``scenes_file`` is read to check that there is a scene.

    Paths of scenes, model, output and report are not checked for existence.

    Raises:
        ConfigError: the file is missing, is not YAML, does not validate, or names no scene.
    """
    p = Path(path)
    data = read_yaml_file(p, "no such job file; copy configs/job-example.yaml and edit it")
    job = job_from_dict(data, str(p), base_dir=p.resolve().parent, default_name=p.stem)
    job.scene_list()
    return job


PROJECT_FILE = "geoseg.yaml"
MODEL_ENV = "GEOSEG_MODEL"


class ProjectFile(JobFile):
    """``geoseg.yaml`` in the working folder: a job file's keys, every one optional, as the defaults of
    ``geoseg predict`` run there (what the command line sets explicitly wins)."""

    scenes: list[str | list[str]] = Field(default_factory=list, description="scenes when the command names none")
    model: str | None = Field(default=None, description="model bundle used when --model and GEOSEG_MODEL are absent")  # type: ignore[assignment]
    output_dir: str | None = Field(default=None, description="output folder or URL")  # type: ignore[assignment]
    name: str = Field(default="mosaic", description="job name: <name>.vrt mosaic, <name> vector layer")

    @model_validator(mode="after")
    def _some_scenes(self) -> ProjectFile:  # a project file needs no scenes
        return self


def find_project(folder: str | os.PathLike[str] | None = None) -> ProjectFile | None:
    """The project file of ``folder`` (default the working folder), validated, or ``None`` when it has none.

    Raises:
        ConfigError: the file exists but does not validate.
    """
    p = Path(folder or os.getcwd()) / PROJECT_FILE
    if not p.is_file():
        return None
    data = read_yaml_file(p, f"cannot read the project file; fix or remove {PROJECT_FILE}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: a project file is a mapping of job keys (model, output_dir, options...), got "
                          f"{type(data).__name__}")
    try:
        project = ProjectFile.model_validate(data, context={"base_dir": p.resolve().parent})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(p), ProjectFile)) from None
    project._source = str(p)
    return project


def write_project(model: str | os.PathLike[str], folder: str | os.PathLike[str] | None = None) -> Path | None:
    """Write ``geoseg.yaml`` naming ``model`` in ``folder`` (default the working folder), so that
    ``geoseg predict SCENE`` run there uses it; an existing project file is left as it is (returns ``None``)."""
    base = Path(folder or os.getcwd())
    p = base / PROJECT_FILE
    if p.exists():
        return None
    try:
        ref = os.path.relpath(Path(model).resolve(), base.resolve())
    except ValueError:  # another drive
        ref = str(Path(model).resolve())
    text = (f"# geoseg project file: the defaults of `geoseg predict` run in this folder (a job file's keys,\n"
            f"# all optional; see configs/job-example.yaml). Command-line options win; {MODEL_ENV} wins over model.\n"
            f"model: {ref}\n")
    tmp = base / f".{PROJECT_FILE}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, p)
    return p


def default_model(project: ProjectFile | None) -> str:
    """The model a command uses when ``--model`` is not given: ``GEOSEG_MODEL``, then the project file's.

    Raises:
        InputError: neither names one (the message says how to get a model).
    """
    env = os.environ.get(MODEL_ENV, "").strip()
    if env:
        return env
    if project is not None and project.model:
        return project.model
    raise InputError(f"no model: give --model BUNDLE, set {MODEL_ENV}=BUNDLE, or name one in ./{PROJECT_FILE} "
                     "(model: PATH); `geoseg demo` trains a demo model and writes that file, `geoseg train CONFIG` "
                     "trains your own")


__all__ = ["JobFile", "JobOptions", "ProjectFile", "load_job", "job_from_dict", "find_project", "default_model",
           "write_project",
           "PROJECT_FILE", "MODEL_ENV", "SCHEDULER_SCHEMES"]
