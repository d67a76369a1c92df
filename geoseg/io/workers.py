"""This machine as a job uses it: how many readers, writers and worker processes run at once, and handing
memory that the C libraries have freed back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["cpu_cores", "default_workers", "release_freed_memory", "share_one_heap"]


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """The one default for ``--workers`` (reader threads, local units, vectorisation processes): min(4, cores)."""
    return max(1, min(4, cpu_cores()))


def _libc() -> ctypes.CDLL | None:
    """glibc, or ``None`` off Linux or where it is not found."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


_M_ARENA_MAX = -8  # malloc.h


def share_one_heap() -> bool:
    """Let the threads created from now on share one glibc heap (``M_ARENA_MAX`` 1); ``False`` where there is none.

    glibc gives each thread that allocates its own arena, and a chip's temporaries freed in one thread's
    arena are not reused by another's: the reader threads, the model thread and the unit thread each kept
    their own high-water mark (21 MB of the peak of a 4096 x 4096 ONNX predict). Their large allocations
    are few (a few per chip), so sharing one arena costs no measurable time.
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_ARENA_MAX, 1))


def release_freed_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``); ``False`` where there is none.

    glibc keeps memory that C libraries free in its heap for reuse, so a large short-lived working set (ONNX
    Runtime's copy of a model file and its weights before the graph optimisations replace them: ~95 MB of a
    57 MB U-Net resnet18) stays resident for the rest of the process unless it is trimmed. Trimming only
    returns free pages: no allocation moves, nothing computed changes.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:  # not glibc (musl, macOS, Windows): nothing to trim
        return False
    trim(0)
    return True
