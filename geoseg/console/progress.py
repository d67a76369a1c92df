"""The command line's progress bars (tqdm), kept out of :mod:`geoseg.cli` so the commands read on their own.

Each bar is created at its first event, so an error before any work prints alone, and none shows a rate
before there is one to show.
"""

from __future__ import annotations

import time
from typing import Any


class ChipBar:
    """A tqdm bar over chips with the scenes done and the output rate in MPix/s."""

    def __init__(self, quiet: bool, desc: str = "predict"):
        self.quiet = quiet
        self.desc = desc
        self.bar: Any = None  # created at the first event, so errors before any work print alone
        self.t0 = time.perf_counter()

    def __call__(self, ev: Any) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=ev.chips_total, desc=self.desc, unit="chip", dynamic_ncols=True, mininterval=0.5)
            self.t0 = time.perf_counter()
        self.bar.total = ev.chips_total
        self.bar.n = ev.chips_done
        elapsed = time.perf_counter() - self.t0
        # no rate before a strip of output exists and a second has passed: a start-up rate means nothing
        rate = f"{ev.pixels_done / elapsed / 1e6:.2f} MPix/s" if ev.pixels_done and elapsed >= 1 else "starting"
        scenes = f"{getattr(ev, 'scenes_done', 0)}/{ev.scenes_total} scenes, " if getattr(ev, "scenes_total", 0) > 1 else ""
        self.bar.set_postfix_str(f"{scenes}{rate}", refresh=False)
        self.bar.refresh() if ev.chips_done == ev.chips_total else self.bar.update(0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BlockBar:
    """A tqdm bar over raster blocks."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.started = time.time()  # tqdm's clock: rates count from the command's start, not the first block

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc="vectorize", unit="block", dynamic_ncols=True, mininterval=0.5)
            self.bar.start_t = self.started
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class EpochBars:
    """One tqdm bar per epoch stage (scan, train, val) from :class:`geoseg.learn.train.TrainProgress` events."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.key: tuple[str, int] | None = None
        self.bar: Any = None
        self.stage_start = time.time()  # tqdm's clock: a stage began when the one before it ended

    def __call__(self, ev: Any) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        key = (ev.stage, ev.epoch)
        if key != self.key:
            self.close()
            of = f"/{ev.epochs}" if ev.epochs else ""  # 0: as many as the time budget allows
            desc = ev.stage if ev.epoch == 0 else f"epoch {ev.epoch}{of} {ev.stage}"
            self.bar = tqdm(total=ev.total, desc=desc, unit="batch" if ev.epoch else "window",
                            dynamic_ncols=True, leave=ev.stage != "scan")
            self.bar.start_t = self.stage_start  # its first step's time counts: no start-up rate of 10^4 it/s
            self.key = key
        self.bar.total = ev.total
        self.bar.n = ev.step
        if ev.metrics:
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in ev.metrics.items()}, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.stage_start = time.time()


__all__ = ["BlockBar", "ChipBar", "EpochBars"]
