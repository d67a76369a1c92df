"""Settings files (training configs, job files, project files): YAML read with one-line errors, validation
errors turned into one line that names the file, the key and the allowed keys, and relative paths resolved
against the file that names them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from geoseg.errors import ConfigError

__all__ = ["format_validation_error", "read_yaml_file", "resolve_path"]


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the sub-model that ``loc`` (a pydantic error location) points into."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or (ann,)
        nxt = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            inner = [b for a in args for b in getattr(a, "__args__", ())]
            nxt = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            return None
        current = nxt
    return sorted(getattr(current, "model_fields", {}))


def format_validation_error(exc: ValidationError, where: str, model: type[BaseModel]) -> str:
    """One line naming the file, the key, the problem and the allowed values where there are some.

    ``model`` is the validated model whose keys an unknown key is listed against (a training config, a job
    file, a project file).
    """
    first = exc.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc)
        msg = "unknown key" + (f"; allowed keys here: {', '.join(allowed)}" if allowed else "")
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif first["type"] == "value_error":  # our validators' own messages, without pydantic's prefix
        msg = msg.removeprefix("Value error, ")
    more = len(exc.errors()) - 1
    tail = f" (and {more} more problem(s))" if more else ""
    return f"{where}: invalid config at '{key}': {msg}{tail}"


def resolve_path(value: str, base_dir: str | os.PathLike[str]) -> str:
    """``value`` made absolute against ``base_dir`` (the folder of the file that names it).

    URLs (anything with ``://``) and absolute paths are returned as they are; ``~`` is expanded. Glob
    characters are kept: the path is made absolute, not expanded.
    """
    if "://" in value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path) if value.startswith("~") else value
    return str((Path(base_dir) / path).resolve())


def read_yaml_file(path: str | os.PathLike[str], missing: str) -> Any:
    """The parsed content of a YAML file.

    Args:
        path: the file.
        missing: the message after ``"<path>: "`` when the file does not exist (what it is, what to do).

    Raises:
        ConfigError: the file is missing or is not YAML (one line starting with the path).
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {missing}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}; check indentation and quoting") from None
