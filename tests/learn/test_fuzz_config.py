"""Property-based: a training config or a job file with any value swapped for junk either validates or is
refused with a one-line ConfigError naming the file; never another exception."""

from __future__ import annotations

import copy

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from geoseg.errors import ConfigError
from geoseg.learn.config import load_config
from geoseg.predict.jobfile import load_job

BASE = {
    "name": "fuzz",
    "classes": [{"id": 1, "name": "a", "color": [1, 2, 3]}, {"id": 2, "name": "b"}],
    "data": {"scenes": [{"image": "x.tif", "labels": "y.tif"}], "chip_size": 64, "overlap": 16, "bands": [1, 2]},
    "model": {"architecture": "unet", "encoder": "resnet18", "params": {"encoder_depth": 3}},
    "loss": [{"name": "cross_entropy", "weight": 1.0}],
    "optimizer": {"name": "adamw", "lr": 0.001},
    "epochs": 2, "batch_size": 4,
}
JOB = {"scenes": ["a.tif"], "model": "m", "output_dir": "out",
       "options": {"tile_size": 64, "batch_size": "auto", "precision": "auto", "compress": "zstd",
                   "connectivity": 4, "vector_format": "gpkg", "blend": "cosine"}}

junk = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(-3, 300), max_size=4),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _mutate(base, path, value):
    doc = copy.deepcopy(base)
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return doc


def _check(tmp_path, loader, base, data):
    paths = list(_paths(base))
    path = data.draw(st.sampled_from(paths))
    doc = _mutate(base, path, data.draw(junk))
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(doc))
    try:
        loader(f)
    except ConfigError as exc:
        assert "\n" not in str(exc) and "c.yaml" in str(exc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_training_config_validates_or_is_refused_in_one_line(tmp_path, data):
    _check(tmp_path, load_config, BASE, data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_job_file_validates_or_is_refused_in_one_line(tmp_path, data):
    _check(tmp_path, load_job, JOB, data)
