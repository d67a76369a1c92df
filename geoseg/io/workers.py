"""How many readers, writers and worker processes run at once on this machine."""

from __future__ import annotations

import os

__all__ = ["cpu_cores", "default_workers"]


def cpu_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """The one default for ``--workers`` (reader threads, local units, vectorisation processes): min(4, cores)."""
    return max(1, min(4, cpu_cores()))
