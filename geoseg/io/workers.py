"""This machine as a job uses it: how many readers, writers and worker processes run at once, and handing
memory that the C libraries have freed back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["cpu_cores", "default_workers", "release_freed_memory"]


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """The one default for ``--workers`` (reader threads, local units, vectorisation processes): min(4, cores)."""
    return max(1, min(4, cpu_cores()))


def release_freed_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``); ``False`` where there is none.

    glibc keeps memory that C libraries free in its heap for reuse, so a large short-lived working set (ONNX
    Runtime's copy of a model file and its weights before the graph optimisations replace them: ~95 MB of a
    57 MB U-Net resnet18) stays resident for the rest of the process unless it is trimmed. Trimming only
    returns free pages: no allocation moves, nothing computed changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        return False
    if trim is None:  # musl and others: no malloc_trim
        return False
    trim(0)
    return True
