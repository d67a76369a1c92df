"""Blending overlapping chip predictions: weight windows (a registry) and the rolling accumulator.

For each output pixel, the probabilities of every chip covering it are summed with the chip's weight at
that pixel, in chip-grid order and in float32, then divided by the summed weights. Weights are zero where
the input is invalid, so masked pixels never enter the blend, and the sum is zero exactly there.

A weight window is a 1-D profile ``fn(length, overlap, ramp_start, ramp_end) -> float64[length]``, all
positive; the 2-D window is the outer product of the row and column profiles. A side with no
neighbouring chip (the scene edge) is not tapered: the only chip there carries full weight.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

from geoseg.errors import InputError, unknown_name

Profile = Callable[[int, int, bool, bool], np.ndarray]


def _flatten(w: np.ndarray, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    half = len(w) // 2
    if not ramp_start:
        w[:half] = np.maximum(w[:half], w[half])
    if not ramp_end:
        w[half:] = np.maximum(w[half:], w[half])
    return w / w.max()


def cosine(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """Raised-cosine ramps across the overlap, flat (1) elsewhere.

    With ``stride = length - overlap``, two neighbours' ramps add up to exactly 1 in their shared strip.
    """
    w = np.ones(length)
    n = min(overlap, length)
    if n > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n)
        if ramp_start:
            w[:n] = ramp
        if ramp_end:
            w[length - n:] = np.minimum(w[length - n:], ramp[::-1])
    return w


def hann(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """A Hann window over the whole chip (peak in the centre); untapered towards the scene edge."""
    w = np.sin(np.pi * (np.arange(length) + 0.5) / length) ** 2
    return _flatten(w, ramp_start, ramp_end)


def gaussian(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """A Gaussian window (sigma = length / 8) centred on the chip; untapered towards the scene edge."""
    x = np.arange(length) + 0.5 - length / 2
    w = np.exp(-0.5 * (x / (length / 8)) ** 2)
    return _flatten(w, ramp_start, ramp_end)


def uniform(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """Equal weights: a plain mean of the overlapping chips."""
    return np.ones(length)


BLEND_WINDOWS: dict[str, Profile] = {"cosine": cosine, "hann": hann, "gaussian": gaussian, "uniform": uniform}


def get_profile(method: str | Profile) -> Profile:
    """A weight profile by name (see :data:`BLEND_WINDOWS`), or the callable itself.

    Raises:
        UnknownNameError: the name is not registered.
    """
    if callable(method):
        return method
    if method not in BLEND_WINDOWS:
        raise unknown_name("blend window", method, list(BLEND_WINDOWS))
    return BLEND_WINDOWS[method]


@lru_cache(maxsize=64)
def _weights_cached(method: str, chip: int, overlap: int, ramps: tuple[bool, bool, bool, bool]) -> np.ndarray:
    w = _compute_weights(get_profile(method), chip, overlap, ramps)
    w.flags.writeable = False  # shared between callers
    return w


def chip_weights(method: str | Profile, chip: int, overlap: int,
                 ramps: tuple[bool, bool, bool, bool]) -> np.ndarray:
    """The ``(chip, chip)`` float32 weight window of a chip (read-only when ``method`` is a name).

    Args:
        method: a registered name or a profile callable.
        ramps: (top, bottom, left, right): whether a neighbour chip overlaps on that side.

    Raises:
        UnknownNameError: ``method`` is a name that is not registered.
        InputError: the profile returned non-positive or non-finite weights.
    """
    if isinstance(method, str):
        return _weights_cached(method, chip, overlap, tuple(ramps))
    return _compute_weights(method, chip, overlap, tuple(ramps))


def _compute_weights(profile: Profile, chip: int, overlap: int,
                     ramps: tuple[bool, ...]) -> np.ndarray:
    top, bottom, left, right = ramps
    wy = np.asarray(profile(chip, overlap, top, bottom), dtype=np.float64)
    wx = np.asarray(profile(chip, overlap, left, right), dtype=np.float64)
    if wy.shape != (chip,) or wx.shape != (chip,):
        raise InputError(f"blend profile must return {chip} weights, got {wy.shape} and {wx.shape}")
    w = np.outer(wy, wx).astype(np.float32)
    if not np.all(np.isfinite(w)) or w.min() <= 0:
        raise InputError("blend weights must be finite and positive; fix the custom blend profile")
    return w


class RollingAccumulator:
    """Weighted sums of probabilities over a band of rows that rolls down a panel of the scene.

    A ring buffer of ``rows`` scene rows (a multiple of ``step``) and columns ``[col_off, col_off + width)``.
    Chips are added in grid order; the finished top rows are read with :meth:`peek` and released with
    :meth:`advance`, ``step`` rows at a time (fewer at the scene's bottom), so nothing is ever shifted.

    Args:
        n_classes: probability channels K.
        col_off: the first scene column the buffer covers.
        width: the number of scene columns it covers.
        chip: the chip size; the buffer holds ``chip + lag`` rows, rounded up to a multiple of ``step``.
        step: rows released at a time (the output's tile height).
        top: the first scene row the buffer holds (a unit that resumes part-way down starts there).
        lag: the most rows a chip starts below the buffer's top when it is added. Rows are released ``step``
            at a time, so ``step - 1`` (the default) always holds; a grid whose chip rows all start a whole
            number of steps below ``top`` (512 px chips at a 384 px stride, released 128 rows at a time)
            has 0, and its buffer is ``chip`` rows instead of ``chip + step``.
    """

    def __init__(self, n_classes: int, col_off: int, width: int, chip: int, step: int, top: int = 0,
                 lag: int | None = None):
        self.col_off = col_off
        self.width = width
        self.step = step
        lag = step - 1 if lag is None else min(max(0, lag), step - 1)
        self.rows = -(-(chip + lag) // step) * step
        self.top = top
        self.acc = np.zeros((n_classes, self.rows, width), dtype=np.float32)
        self.wsum = np.zeros((self.rows, width), dtype=np.float32)

    def add(self, probs: np.ndarray, weights: np.ndarray, row_off: int, col_off: int) -> None:
        """Add ``probs`` ``(K, h, w)`` weighted by ``weights`` ``(h, w)`` at scene ``(row_off, col_off)``.

        ``probs`` is used as scratch space (multiplied by the weights in place).
        """
        h, w = weights.shape
        c = col_off - self.col_off
        if row_off < self.top or row_off + h > self.top + self.rows or c < 0 or c + w > self.width:
            raise ValueError(f"chip at row {row_off}, col {col_off} ({h}x{w}) is outside the buffer "
                             f"(rows {self.top}..{self.top + self.rows}, cols {self.col_off}..{self.col_off + self.width})")
        np.multiply(probs, weights, out=probs)
        p = row_off % self.rows
        first = min(h, self.rows - p)  # rows before the ring wraps
        for src, dst, n in ((0, p, first), (first, 0, h - first)):
            if n > 0:
                self.acc[:, dst:dst + n, c:c + w] += probs[:, src:src + n]
                self.wsum[dst:dst + n, c:c + w] += weights[src:src + n]

    def peek(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Views of the top ``n`` rows (``n <= step``): weighted sums ``(K, n, width)`` and weights ``(n, width)``.

        Dividing the sums by the weights gives the blended probabilities; where the weight is 0 no valid
        pixel was ever predicted. The views are valid until :meth:`advance`.
        """
        if n > self.step:
            raise ValueError(f"peek at most {self.step} rows at a time, not {n}")
        p = self.top % self.rows
        return self.acc[:, p:p + n], self.wsum[p:p + n]

    def advance(self, n: int) -> None:
        """Release the top ``n`` rows (zero them for reuse) and move down by ``n``."""
        p = self.top % self.rows
        self.acc[:, p:p + n] = 0.0
        self.wsum[p:p + n] = 0.0
        self.top += n


def normalise(sums: np.ndarray, wsum: np.ndarray) -> np.ndarray:
    """Blended probabilities ``(K, ...)`` from weighted sums and summed weights (0 where the weight is 0)."""
    out = np.zeros_like(sums)
    np.divide(sums, wsum, out=out, where=wsum > 0)
    return out
