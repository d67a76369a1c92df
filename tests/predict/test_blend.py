import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.errors import InputError, UnknownNameError
from geoseg.predict.blend import BLEND_WINDOWS, RollingAccumulator, chip_weights, cosine, normalise


@settings(max_examples=150, deadline=None)
@given(method=st.sampled_from(sorted(BLEND_WINDOWS)), chip=st.integers(4, 300), frac=st.floats(0, 0.5),
       ramps=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()))
def test_blend_weights_are_positive_and_finite(method, chip, frac, ramps):
    w = chip_weights(method, chip, int(chip * frac), ramps)
    assert w.shape == (chip, chip) and w.dtype == np.float32
    assert np.all(np.isfinite(w)) and w.min() > 0 and w.max() <= 1.0 + 1e-6


@given(chip=st.integers(8, 512), frac=st.floats(0.01, 0.5))
def test_cosine_ramps_of_neighbours_sum_to_one(chip, frac):
    overlap = max(1, int(chip * frac))
    left = cosine(chip, overlap, True, True)
    # chip B starts at stride = chip - overlap: its first `overlap` weights meet A's last ones
    np.testing.assert_allclose(left[chip - overlap:] + left[:overlap], 1.0, atol=1e-12)


def test_edge_sides_are_not_tapered():
    w = chip_weights("cosine", 64, 16, (False, True, False, True))
    assert w[0, 0] == 1.0 and w[-1, -1] < 0.01


def test_unknown_window_lists_valid_names():
    with pytest.raises(UnknownNameError, match="cosine, gaussian, hann, uniform"):
        chip_weights("triangle", 64, 16, (True,) * 4)


def test_custom_profile_callable_and_validation():
    w = chip_weights(lambda n, o, a, b: np.full(n, 2.0), 8, 2, (True,) * 4)
    assert np.all(w == 4.0)
    with pytest.raises(InputError, match="positive"):
        chip_weights(lambda n, o, a, b: np.zeros(n), 8, 2, (True,) * 4)


def test_rolling_accumulator_blends_and_wraps_around_the_ring():
    acc = RollingAccumulator(2, col_off=10, width=6, chip=4, step=3)
    assert acc.rows == 6  # chip + step - 1 rounded up to a multiple of step
    p = np.stack([np.full((4, 6), 0.2, np.float32), np.full((4, 6), 0.8, np.float32)])
    acc.add(p.copy(), np.full((4, 6), 2.0, np.float32), row_off=0, col_off=10)
    acc.add(p[::-1].copy(), np.full((4, 6), 2.0, np.float32), row_off=2, col_off=10)
    sums, wsum = acc.peek(3)
    probs = normalise(sums, wsum)
    np.testing.assert_allclose(probs[:, :2], p[:, :2])
    np.testing.assert_allclose(probs[:, 2], 0.5)
    assert wsum[2, 0] == 4.0
    acc.advance(3)
    # rows 3..8 wrap around the 6-row ring: rows 6 and 7 land where rows 0 and 1 were
    acc.add(p.copy(), np.ones((4, 6), np.float32), row_off=4, col_off=10)
    sums, wsum = acc.peek(3)
    np.testing.assert_allclose(wsum[:, 0], [4.0, 3.0, 3.0])
    acc.advance(3)
    sums, wsum = acc.peek(3)
    np.testing.assert_allclose(wsum[:, 0], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(normalise(sums, wsum)[:, 2], 0.0)
    with pytest.raises(ValueError):
        acc.add(p.copy(), np.ones((4, 6), np.float32), row_off=0, col_off=10)  # already rolled past


@pytest.mark.parametrize("chip,stride,step,lag,rows", [(8, 6, 2, 0, 8), (8, 6, 4, 2, 12), (8, 5, 2, 1, 10)])
def test_a_ring_of_chip_plus_lag_rows_blends_as_the_full_ring(chip, stride, step, lag, rows):
    """Chip rows that start a whole number of steps below the top need no spare rows: the smaller ring gives
    the same sums, in the same order; a ring too small for the grid refuses the chip instead of wrapping onto it."""
    height, width, k = 3 * stride + chip, 5, 2
    origins = list(range(0, height - chip + 1, stride))

    def blend(lag_given):
        acc = RollingAccumulator(k, col_off=0, width=width, chip=chip, step=step, lag=lag_given)
        out = []
        for i, y in enumerate(origins):
            while acc.top + step <= y:
                out.append(np.concatenate([a.copy().reshape(-1) for a in acc.peek(step)]))
                acc.advance(step)
            probs = np.random.default_rng(i).random((k, chip, width), dtype=np.float32)
            acc.add(probs, np.full((chip, width), 0.5 + i, np.float32), y, 0)
        while acc.top < height:
            n = min(step, height - acc.top)
            out.append(np.concatenate([a.copy().reshape(-1) for a in acc.peek(n)]))
            acc.advance(n)
        return acc.rows, np.concatenate(out)

    full_rows, full = blend(None)
    small_rows, small = blend(lag)
    assert small_rows == rows <= full_rows
    assert small.tobytes() == full.tobytes()
    if lag > 0:  # no spare rows where the grid needs some
        with pytest.raises(ValueError, match="outside the buffer"):
            blend(0)
