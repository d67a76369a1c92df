"""The ``--backend auto`` probe: a few timed forwards of one batch through each candidate backend.

:func:`time_backends` builds each candidate in turn, runs it once on the batch (the warm-up: ONNX Runtime's
conversion and graph optimisation, OpenVINO's compilation, the first run's allocations), then times up to
:data:`PROBE_RUNS` more forwards and keeps their median. The timed forwards of all candidates together stay
within about :data:`PROBE_SECONDS` (each candidate gets its share, and at least one run); the warm-ups are
not capped. A candidate that cannot be built or refuses itself (a missing package, an agreement check it
fails) is dropped with its one-line reason. One candidate at a time holds its runtime, so the probe needs
no more memory than the job.

Which backends are candidates, and what the probe's winner becomes, is decided in
:func:`geoseg.predict.runtime.resolve_settings`; this module only measures. It imports neither torch nor
numpy: an ONNX bundle's probe stays torch-free.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from geoseg.errors import GeoSegError

log = logging.getLogger(__name__)

PROBE_RUNS = 3  # timed forwards per candidate, after its warm-up
PROBE_SECONDS = 2.0  # the timed forwards of all candidates together, about at most

Forward = Callable[[Any], Any]

__all__ = ["PROBE_RUNS", "PROBE_SECONDS", "ProbeResult", "time_backends"]


@dataclass(frozen=True)
class ProbeResult:
    """What the probe measured: the median seconds per batch of each candidate that ran, fastest first."""

    seconds: dict[str, float]
    dropped: dict[str, str] = field(default_factory=dict)  # candidate -> why it did not run
    wall: float = 0.0  # seconds the whole probe took, warm-ups included
    warmup: dict[str, float] = field(default_factory=dict)  # candidate -> seconds to build it and run it once

    @property
    def winner(self) -> str | None:
        """The fastest candidate, or ``None`` when none ran."""
        return next(iter(self.seconds), None)

    def describe(self) -> str:
        """One line: each candidate's median time, the dropped ones with their reasons, the probe's wall time."""
        times = ", ".join(f"{name} {s:.3f} s (first {self.warmup.get(name, 0.0):.1f} s)"
                          for name, s in self.seconds.items())
        dropped = "".join(f"; {name} dropped ({why})" for name, why in self.dropped.items())
        return f"{times or 'no candidate ran'} per batch{dropped}; probe {self.wall:.1f} s"


def time_backends(builders: Mapping[str, Callable[[], Forward]], batch: Any, runs: int = PROBE_RUNS,
                  budget: float = PROBE_SECONDS) -> ProbeResult:
    """Time ``forward(batch)`` for each candidate (see the module docstring).

    Args:
        builders: candidate name -> a callable that makes its ``forward`` (called once, in the probe).
        batch: the input every forward gets, e.g. a float32 ``(N, C, H, W)`` array of the job's batch shape.
        runs: timed forwards per candidate, at most.
        budget: seconds for the timed forwards of all candidates together, about at most.

    Returns:
        A :class:`ProbeResult` whose ``seconds`` are ordered fastest first (ties keep the order of ``builders``).
    """
    started = time.perf_counter()
    share = budget / max(1, len(builders))
    seconds: dict[str, float] = {}
    dropped: dict[str, str] = {}
    warmup: dict[str, float] = {}
    for name, build in builders.items():
        t0 = time.perf_counter()
        try:
            forward = build()
            forward(batch)  # the warm-up
        except GeoSegError as exc:
            dropped[name] = str(exc)
            continue
        warmup[name] = time.perf_counter() - t0
        times: list[float] = []
        first = time.perf_counter()
        for _ in range(max(1, runs)):
            t0 = time.perf_counter()
            forward(batch)
            times.append(time.perf_counter() - t0)
            if time.perf_counter() - first >= share:
                break
        del forward  # its runtime's memory, before the next candidate's
        seconds[name] = statistics.median(times)
    order = sorted(seconds, key=lambda n: seconds[n])  # stable: a tie keeps the builders' order
    return ProbeResult({n: seconds[n] for n in order}, dropped, time.perf_counter() - started, warmup)
