"""Domain exceptions. Each also inherits the builtin a caller would catch without knowing geoseg.

Messages name the file, what is wrong and what to do, on one line: the CLI prints them as they are.
"""

from __future__ import annotations


class GeoSegError(Exception):
    """Base class of every error geoseg raises on purpose."""


class InputError(GeoSegError, ValueError):
    """A scene, label file or argument that cannot be used as given."""


class BundleError(GeoSegError, ValueError):
    """A model bundle that is missing, malformed, or does not fit a scene."""


class OutputExistsError(GeoSegError, FileExistsError):
    """An output file already exists and ``overwrite`` was not asked for."""


class ConfigError(GeoSegError, ValueError):
    """A configuration file or value that does not validate."""


class StorageError(GeoSegError, OSError):
    """A local folder or object-storage location that cannot be read, listed or written."""


class DiskFullError(StorageError):
    """A write that failed because the disk, a quota or the file-size limit is full."""


class UnknownNameError(GeoSegError, KeyError):
    """A name that is not in a registry; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class WorkerError(GeoSegError, RuntimeError):
    """A worker process that died before finishing its work (killed, out of memory, or failed to start)."""


def unknown_name(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> UnknownNameError:
    """Build the error for a registry miss, listing the valid names."""
    return UnknownNameError(f"unknown {kind} {name!r}; valid names: {', '.join(sorted(valid))}")
