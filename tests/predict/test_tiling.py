import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.errors import InputError
from geoseg.predict.tiling import ChipGrid, axis_origins, clip_to_scene, panels


def test_axis_origins_examples():
    assert axis_origins(1000, 512, 128) == (0, 384, 488)
    assert axis_origins(512, 512, 128) == (0,)
    assert axis_origins(300, 512, 128) == (0,)
    assert axis_origins(896, 512, 128) == (0, 384)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 3000), chip=st.integers(8, 600), frac=st.floats(0, 0.49))
def test_chips_cover_every_pixel_and_stay_inside(length, chip, frac):
    overlap = int(chip * frac)
    xs = axis_origins(length, chip, overlap)
    covered = np.zeros(length, bool)
    for x in xs:
        covered[x:x + chip] = True
    assert covered.all()
    assert list(xs) == sorted(set(xs))
    if length >= chip:
        assert xs[-1] + chip == length  # the last chip ends at the edge, never past it
        assert all(0 <= x <= length - chip for x in xs)
        # neighbours overlap by at least the requested overlap
        assert all(b - a <= chip - overlap for a, b in zip(xs, xs[1:]))
    else:
        assert xs == (0,)


@settings(max_examples=100, deadline=None)
@given(w=st.integers(1, 2000), h=st.integers(1, 2000), chip=st.sampled_from([32, 64, 256]),
       a=st.integers(0, 2000), b=st.integers(1, 500))
def test_cols_touching_matches_brute_force(w, h, chip, a, b):
    g = ChipGrid(w, h, chip, chip // 4)
    lo, hi = min(a, w - 1), min(a + b, w)
    brute = [i for i, x in enumerate(g.xs) if x < hi and x + chip > lo]
    assert list(g.cols_touching(lo, hi)) == brute


def test_grid_iterates_in_row_major_order_with_ramps():
    g = ChipGrid(1000, 700, 256, 64)
    chips = list(g)
    assert len(chips) == len(g) == g.shape[0] * g.shape[1]
    assert [(c.row, c.col) for c in chips] == sorted((c.row, c.col) for c in chips)
    first, last = chips[0], chips[-1]
    assert first.ramps == (False, True, False, True)
    assert last.ramps == (True, False, True, False)


def test_grid_rejects_bad_overlap():
    with pytest.raises(InputError):
        ChipGrid(100, 100, 64, 64)
    with pytest.raises(InputError):
        axis_origins(0, 64, 8)


@given(width=st.integers(1, 50000), maxw=st.integers(512, 20000))
def test_panels_partition_the_width(width, maxw):
    ps = panels(width, maxw, 512)
    assert ps[0][0] == 0 and ps[-1][1] == width
    assert all(a[1] == b[0] for a, b in zip(ps, ps[1:]))
    assert all((c1 - c0) % 512 == 0 for c0, c1 in ps[:-1])


def test_clip_to_scene():
    from rasterio.windows import Window

    assert clip_to_scene(Window(0, 0, 64, 64), 30, 20) == Window(0, 0, 30, 20)
