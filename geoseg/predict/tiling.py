"""Pure window arithmetic: the global chip grid of a scene, and the units of work over it.

No I/O here. Windows are :class:`rasterio.windows.Window` values; ``col``/``x`` run along the width.

The chip grid depends only on the scene size, the chip size and the overlap, never on how the work is
split, so a class map is the same whether it is computed in one piece or in panels. Along each axis,
chip origins step by ``stride = chip - overlap`` from 0, and the last chip is moved back to end exactly at
the scene edge (so no chip hangs over the edge and no pixel is left out). A scene smaller than one chip
gets a single chip at 0 that reaches past the edge; the reader pads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from rasterio.windows import Window

from geoseg.errors import InputError


def axis_origins(length: int, chip: int, overlap: int) -> tuple[int, ...]:
    """Chip origins along one axis of ``length`` pixels.

    >>> axis_origins(1000, 512, 128)
    (0, 384, 488)
    >>> axis_origins(300, 512, 128)
    (0,)
    """
    if length <= 0:
        raise InputError(f"an axis of {length} pixels cannot be tiled")
    stride = chip - overlap
    if stride <= 0:
        raise InputError(f"overlap {overlap} must be smaller than the chip size {chip}")
    if length <= chip:
        return (0,)
    origins = list(range(0, length - chip, stride))
    origins.append(length - chip)
    return tuple(origins)


@dataclass(frozen=True)
class Chip:
    """One chip of the grid: its place ``(row, col)`` in the grid and its window in the scene.

    ``window`` may reach past the scene's bottom or right edge only when the scene is smaller than one
    chip; ``ramps`` says on which sides (top, bottom, left, right) a neighbour chip overlaps this one.
    """

    row: int
    col: int
    window: Window
    ramps: tuple[bool, bool, bool, bool]

    @property
    def index(self) -> tuple[int, int]:
        return (self.row, self.col)


@dataclass(frozen=True)
class ChipGrid:
    """The global chip grid of a ``width`` x ``height`` scene.

    Args:
        width: scene width in pixels.
        height: scene height in pixels.
        chip: chip size (square) in pixels.
        overlap: pixels shared by neighbouring chips (``stride = chip - overlap``).
    """

    width: int
    height: int
    chip: int
    overlap: int

    def __post_init__(self) -> None:
        if self.chip <= 0:
            raise InputError(f"chip size must be positive, got {self.chip}")
        if not 0 <= self.overlap < self.chip:
            raise InputError(f"overlap must be in 0..{self.chip - 1} for chip size {self.chip}, got {self.overlap}")

    @property
    def stride(self) -> int:
        return self.chip - self.overlap

    @cached_property
    def xs(self) -> tuple[int, ...]:
        return axis_origins(self.width, self.chip, self.overlap)

    @cached_property
    def ys(self) -> tuple[int, ...]:
        return axis_origins(self.height, self.chip, self.overlap)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of chips."""
        return (len(self.ys), len(self.xs))

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def chip_at(self, row: int, col: int) -> Chip:
        nr, nc = self.shape
        ramps = (row > 0, row < nr - 1, col > 0, col < nc - 1)
        return Chip(row, col, Window(self.xs[col], self.ys[row], self.chip, self.chip), ramps)

    def __iter__(self) -> Iterator[Chip]:
        """All chips in grid order (row-major)."""
        for r in range(len(self.ys)):
            for c in range(len(self.xs)):
                yield self.chip_at(r, c)

    def cols_touching(self, col_off: int, col_end: int) -> range:
        """Chip columns whose windows intersect scene columns ``[col_off, col_end)``."""
        return _touching(self.xs, self.chip, col_off, col_end)

    def rows_touching(self, row_off: int, row_end: int) -> range:
        """Chip rows whose windows intersect scene rows ``[row_off, row_end)``."""
        return _touching(self.ys, self.chip, row_off, row_end)


def _touching(origins: tuple[int, ...], chip: int, start: int, end: int) -> range:
    idx = [i for i, o in enumerate(origins) if o < end and o + chip > start]
    return range(idx[0], idx[-1] + 1) if idx else range(0)


def panels(width: int, max_width: int, block: int) -> list[tuple[int, int]]:
    """Split ``width`` columns into panels of at most ``max_width`` (a multiple of ``block``).

    Panels are the units of work: each is processed top to bottom with a rolling accumulator, so memory
    is bounded by the panel width, never by the scene's height or area.

    >>> panels(1000, 512, 256)
    [(0, 512), (512, 1000)]
    """
    step = max(block, (max_width // block) * block)
    return [(c, min(c + step, width)) for c in range(0, width, step)]


def clip_to_scene(window: Window, width: int, height: int) -> Window:
    """The part of ``window`` inside a ``width`` x ``height`` scene."""
    c0, r0 = max(int(window.col_off), 0), max(int(window.row_off), 0)
    c1 = min(int(window.col_off + window.width), width)
    r1 = min(int(window.row_off + window.height), height)
    return Window(c0, r0, max(c1 - c0, 0), max(r1 - r0, 0))
