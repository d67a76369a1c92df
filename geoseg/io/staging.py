"""Temporary files beside outputs: their names (which process made them), sweeping what killed processes
left behind, the file mode a shared disk needs, and telling a full disk from other write failures.

Everything :class:`geoseg.io.store.Store` builds is staged under such a temporary name and moved into place
whole; this module holds the rules for those names and for the failures that can strike while they exist.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from geoseg.errors import DiskFullError

__all__ = ["FULL_BELOW", "HOST", "STAGING_NAME", "disk_full", "full_disk_as_error", "sweep_dead",
           "sweep_dead_temporaries", "umask_mode", "unique_suffix"]

log = logging.getLogger(__name__)

# names this module leaves beside outputs while it works; listings hide them
STAGING_NAME = re.compile(r"^\..+\.(tmp|old)-[0-9A-Za-z_-]+$|^\.geoseg-work-")



HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"


def unique_suffix() -> str:
    """``host-pid-random``: a temporary name says which process made it, so leftovers of dead processes on
    this host can be swept (:func:`sweep_dead`)."""
    return f"{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def sweep_dead(folder: Path, prefix: str) -> None:
    """Remove ``prefix<host>-<pid>-*`` temporaries in ``folder`` left by processes of this host that no longer
    run (a SIGKILL between staging and publishing); other hosts' and live processes' are left alone."""
    pattern = re.compile(re.escape(prefix) + re.escape(HOST) + r"-(\d+)-[0-9a-f]{8}$")
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            m = pattern.match(entry.name)
            if not m or int(m.group(1)) == os.getpid():
                continue
            try:
                os.kill(int(m.group(1)), 0)
                continue  # alive
            except ProcessLookupError:
                pass
            except OSError:
                continue  # alive, another user's
            log.info("%s: removed, left by a process that was killed", entry)
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def sweep_dead_temporaries(folder: Path, name: str) -> None:
    """Remove the temporaries of ``name`` in ``folder`` that killed processes of this host left behind."""
    sweep_dead(folder, f".{name}.tmp-")


def _umask(default: int = 0o022) -> int:
    """This process's umask, read without changing it (``os.umask`` would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return default


def umask_mode(path: Path) -> None:
    """Give a file written by a library that creates it owner-only (safetensors: 0600) the usual mode
    (0666 less the umask), so bundles on a shared disk can be read by the other users and worker accounts."""
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~_umask())


FULL_BELOW = 64 * 2**20  # bytes free under which a failed write is taken for a full disk
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _at_size_limit(folder: Path | None) -> bool:
    """A file in ``folder`` that reached the process's file-size limit (``ulimit -f``)."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if folder is None or limit == resource.RLIM_INFINITY or not folder.is_dir():
        return False
    return any(f.is_file() and f.stat().st_size >= limit * 0.9 for f in folder.rglob("*"))


def disk_full(exc: BaseException, folder: str | os.PathLike[str] | None,
              measure: Path | None = None) -> DiskFullError | None:
    """The one-line error for a write that failed because the disk (or quota, or file size limit) is full.

    An ``OSError`` says so by its errno; GDAL's write errors do not (libtiff reports ``No space left on
    device`` on stderr only), so a failed write into a local ``folder`` (or the local folder ``measure``
    that stages it) with less than 64 MB free counts too. ``None`` when ``exc`` is something else.
    """
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    full = any(isinstance(c, OSError) and c.errno in _FULL_ERRNOS for c in chain)
    where = measure or (None if folder is None or "://" in os.fspath(folder) else Path(folder))
    while where is not None and not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free if where is not None else None
    # inside a write (``measure`` given) any failure counts; elsewhere only one that speaks of writing
    writing = measure is not None or any(re.search(r"writ|space|disk|full", str(c), re.IGNORECASE) for c in chain)
    if not full and not (writing and free is not None and free < FULL_BELOW) and not _at_size_limit(measure):
        return None
    return DiskFullError(f"{folder}: the disk is full (or its quota or file-size limit reached); nothing was "
                        "written under a final name and the run's temporary files are removed: free some space or "
                        "choose another output folder, then run the same command again")


@contextlib.contextmanager
def full_disk_as_error(folder: str | os.PathLike[str], measure: Path) -> Iterator[None]:
    """Raise :func:`disk_full`'s error for what the block raises when the disk under ``measure`` (the local
    folder being written, checked before its partial files go) is full; anything else as it is."""
    try:
        yield
    except Exception as exc:
        full = disk_full(exc, folder, measure)
        if full is not None:
            raise full from exc
        raise
