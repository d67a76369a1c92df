"""Job files: validation, one-line errors, path resolution, scene lists, and agreement with the library."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from geoseg.errors import ConfigError
from geoseg.predict.jobfile import JobFile, JobOptions, job_from_dict, load_job

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "job-example.yaml"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _job(tmp_path: Path, body: str, name: str = "job.yaml") -> Path:
    head = "model: models/unet\noutput_dir: maps\n"
    return _write(tmp_path / name, head + body)


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_job(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))
    return msg


def test_valid_file_round_trip(tmp_path: Path) -> None:
    path = _write(tmp_path / "jobs" / "june.yaml", """
scenes: [/data/a.tif, "s3://bucket/imagery/*.tif"]
model: https://example.com/models/unet
output_dir: s3://bucket/maps/
scheduler: local:4
merge_vectors: true
report: /reports/june.json
options:
  tile_size: 256
  overlap: 64
  batch_size: 4
  bands: [4, 3, 2]
  blend: hann
  precision: bf16
  vector_format: null
  min_area: 0.5ha
  simplify: 1.5
  connectivity: 8
  unit_rows: 1024
""")
    job = load_job(path)
    assert job.name == "june"  # the file's stem
    assert job.scenes == ["/data/a.tif", "s3://bucket/imagery/*.tif"]
    assert job.model == "https://example.com/models/unet"
    assert job.output_dir == "s3://bucket/maps/"
    assert job.scheduler == "local:4" and job.merge_vectors and job.report == "/reports/june.json"
    assert job.scene_list() == job.scenes
    assert job.predict_options() == {
        "tile_size": 256, "overlap": 64, "batch_size": 4, "bands": [4, 3, 2], "blend": "hann",
        "precision": "bf16", "vector_format": None, "min_area": "0.5ha", "simplify": 1.5, "connectivity": 8,
        "unit_rows": 1024}
    again = job_from_dict(job.model_dump(), str(path))
    assert again == job and again.predict_options() == job.options.model_dump()


def test_predict_options_only_what_the_file_sets(tmp_path: Path) -> None:
    from geoseg.predict.api import PredictOptions

    job = load_job(_job(tmp_path, "scenes: a.tif\noptions:\n  tta: true\n"))
    assert job.predict_options() == {"tta": True}
    opts = PredictOptions(**job.predict_options())
    assert opts.tta and opts.vector_format == "gpkg"  # polygons unless the file says vector_format: null
    # whatever the file leaves out, PredictOptions ends up with the default the job file documents
    bare = PredictOptions(**load_job(_job(tmp_path, "scenes: a.tif\n", "bare.yaml")).predict_options())
    assert dataclasses.asdict(bare) == JobOptions().model_dump()


def test_relative_paths_resolve_against_the_job_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the job's folder: resolution must not depend on the cwd
    folder = tmp_path / "jobs"
    _write(folder / "j.yaml", """
scenes: ["tiles/*.tif", ../imagery/b.tif, /abs/c.tif, "https://example.com/d.tif"]
model: ../models/unet
output_dir: out/
report: reports/j.json
""")
    job = load_job(Path("jobs") / "j.yaml")
    base = folder.resolve()
    assert job.scenes == [str(base / "tiles" / "*.tif"), str(tmp_path.resolve() / "imagery" / "b.tif"),
                          "/abs/c.tif", "https://example.com/d.tif"]
    assert job.model == str(tmp_path.resolve() / "models" / "unet")
    assert job.output_dir == str(base / "out")
    assert job.report == str(base / "reports" / "j.json")
    assert job.scenes[0].endswith("*.tif")  # the glob is kept, not expanded


def test_scenes_file(tmp_path: Path) -> None:
    _write(tmp_path / "lists" / "june.txt", """# June scenes
a.tif
  ../imagery/b.tif   # the big one

s3://bucket/c.tif
/abs/d.tif
""")
    job = load_job(_job(tmp_path, "scenes: first.tif\nscenes_file: lists/june.txt\n"))
    lists = (tmp_path / "lists").resolve()
    assert job.scenes_file == str(lists / "june.txt")
    assert job.scene_list() == [str(tmp_path.resolve() / "first.tif"), str(lists / "a.tif"),
                                str(tmp_path.resolve() / "imagery" / "b.tif"), "s3://bucket/c.tif", "/abs/d.tif"]
    # scenes_file alone is enough
    assert len(load_job(_job(tmp_path, "scenes_file: lists/june.txt\n", "only.yaml")).scene_list()) == 4


def test_scenes_are_required(tmp_path: Path) -> None:
    assert "no scenes" in _error(_job(tmp_path, ""))
    assert "no scenes" in _error(_job(tmp_path, "scenes: []\n", "empty.yaml"))
    _write(tmp_path / "empty.txt", "# nothing yet\n\n")
    msg = _error(_job(tmp_path, "scenes_file: empty.txt\n", "emptylist.yaml"))
    assert "lists no scenes" in msg and "empty.txt" in msg
    msg = _error(_job(tmp_path, "scenes_file: missing.txt\n", "missinglist.yaml"))
    assert "cannot read scenes_file" in msg and "missing.txt" in msg


def test_unknown_keys_are_named_with_the_allowed_keys(tmp_path: Path) -> None:
    msg = _error(_job(tmp_path, "scenes: a.tif\nschedular: threads\n"))
    assert "'schedular': unknown key" in msg
    for key in JobFile.model_fields:
        assert key in msg
    msg = _error(_job(tmp_path, "scenes: a.tif\noptions:\n  tilesize: 256\n", "opt.yaml"))
    assert "'options.tilesize': unknown key" in msg
    for key in ("tile_size", "unit_rows", "vector_format", "connectivity"):
        assert key in msg


@pytest.mark.parametrize("key, value, allowed", [
    ("blend", "bilinear", ["cosine", "hann", "gaussian", "uniform"]),
    ("precision", "fp64", ["auto", "fp32", "bf16", "fp16"]),
    ("compress", "jpeg", ["deflate", "zstd", "lzw"]),
    ("probabilities_dtype", "int8", ["uint8", "float16", "float32"]),
    ("vector_format", "kml", ["gpkg", "shp", "geojson", "parquet"]),
    ("connectivity", 6, ["4", "8"]),
])
def test_bad_choice_lists_the_allowed_values(tmp_path: Path, key: str, value: object, allowed: list[str]) -> None:
    msg = _error(_job(tmp_path, f"scenes: a.tif\noptions:\n  {key}: {value}\n"))
    assert f"'options.{key}'" in msg
    for name in allowed:
        assert name in msg


@pytest.mark.parametrize("body, key, words", [
    ("options:\n  batch_size: 0\n", "options.batch_size", "greater than or equal to 1"),
    ("options:\n  batch_size: true\n", "options.batch_size", "integer"),
    ("options:\n  tile_size: 8\n", "options.tile_size", "16"),
    ("options:\n  bands: [0, 1]\n", "options.bands", "1-based"),
    ("options:\n  min_area: 40 acres\n", "options.min_area", "0.5ha"),
    ("options:\n  simplify: -1\n", "options.simplify", "non-negative"),
    ("options:\n  panel_width: 100\n", "options.panel_width", "512"),
    ("name: my job\n", "name", "letters, digits"),
    ("model: ''\n", "model", "empty"),
])
def test_bad_values_name_the_key(tmp_path: Path, body: str, key: str, words: str) -> None:
    head = "scenes: a.tif\noutput_dir: o\n" + ("" if body.startswith("model") else "model: m\n")
    msg = _error(_write(tmp_path / "job.yaml", head + body))
    assert f"'{key}'" in msg and words in msg


def test_unsafe_file_stem_asks_for_a_name(tmp_path: Path) -> None:
    msg = _error(_job(tmp_path, "scenes: a.tif\n", "june job.yaml"))
    assert "'name'" in msg and "set name:" in msg
    assert load_job(_job(tmp_path, "scenes: a.tif\nname: june-2024\n", "june job 2.yaml")).name == "june-2024"


@pytest.mark.parametrize("scheduler", [None, "threads", "local:1", "local:16", "tcp://10.0.0.5:8786",
                                       "tls://scheduler.example.com:8786", "ws://sched:8787", "tcp://[::1]:8786"])
def test_good_scheduler_forms(tmp_path: Path, scheduler: str | None) -> None:
    value = "null" if scheduler is None else f'"{scheduler}"'
    assert load_job(_job(tmp_path, f"scenes: a.tif\nscheduler: {value}\n")).scheduler == scheduler


@pytest.mark.parametrize("scheduler", ["processes", "local", "local:0", "local:four", "http://host:8786",
                                       "tcp://", "tcp://host:99999", "host:8786", "tcp://host:8786/path"])
def test_bad_scheduler_form(tmp_path: Path, scheduler: str) -> None:
    msg = _error(_job(tmp_path, f'scenes: a.tif\nscheduler: "{scheduler}"\n'))
    assert "'scheduler'" in msg and ("local:N" in msg or "at least one worker" in msg)


def test_missing_file_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    msg = _error(tmp_path / "nope.yaml")
    assert "no such job file" in msg and "job-example.yaml" in msg
    assert "not valid YAML at line" in _error(_write(tmp_path / "bad.yaml", "scenes: [a.tif\nmodel: m\n"))
    assert "must be a mapping" in _error(_write(tmp_path / "list.yaml", "- a.tif\n"))
    assert "empty file" in _error(_write(tmp_path / "empty.yaml", ""))


def test_required_keys(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path / "job.yaml", "scenes: a.tif\noutput_dir: o\n"))
    assert "'model': required key is missing" in msg


def test_example_config_loads() -> None:
    from geoseg.predict.api import PredictOptions

    job = load_job(EXAMPLE)  # its model and scenes need not exist
    base = EXAMPLE.parent.resolve()
    # as written it maps the demo's scenes with the demo's model (geoseg demo --output-dir demo/)
    repo = base.parent
    assert job.scene_list() == [str(repo / "demo" / "scene.tif"), str(repo / "demo" / "train_scene.tif")]
    assert job.model == str(repo / "demo" / "model") and job.name == "demo-job"
    # the example documents every option, at its default
    assert set(job.predict_options()) == {f.name for f in dataclasses.fields(PredictOptions)}
    assert job.options == JobOptions()
    text = EXAMPLE.read_text()
    for word in ("s3://", "local:4", "tcp://", "threads", "skips"):
        assert word in text


def _choices(annotation: object) -> set[object]:
    """The values of a ``Literal``, also inside a union such as ``Literal[...] | None``."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return set(args)
    return set().union(*(_choices(a) for a in args))


def test_options_match_the_library() -> None:
    """The job's options are PredictOptions' fields, and its choices the library's registries."""
    from geoseg.gis.vectorize import FORMATS
    from geoseg.io.profiles import COMPRESSIONS
    from geoseg.predict.api import PROBABILITY_DTYPES, PredictOptions
    from geoseg.predict.blend import BLEND_WINDOWS
    from geoseg.predict.hardware import ALL_PRECISIONS

    assert set(JobOptions.model_fields) == {f.name for f in dataclasses.fields(PredictOptions)}
    fields = JobOptions.model_fields
    assert _choices(fields["precision"].annotation) == set(ALL_PRECISIONS)
    assert _choices(fields["blend"].annotation) == set(BLEND_WINDOWS)
    from geoseg.predict.hardware import ALL_BACKENDS

    assert _choices(fields["backend"].annotation) == set(ALL_BACKENDS)
    assert _choices(fields["probabilities_dtype"].annotation) == set(PROBABILITY_DTYPES)
    assert _choices(fields["compress"].annotation) == set(COMPRESSIONS)
    assert _choices(fields["vector_format"].annotation) == set(FORMATS)
    from geoseg.io.vrt import RESAMPLING

    assert _choices(fields["resampling"].annotation) == set(RESAMPLING)
    # and its defaults (shown in configs/job-example.yaml) are the library's
    assert JobOptions().model_dump() == {f.name: f.default for f in dataclasses.fields(PredictOptions)}
