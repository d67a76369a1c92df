"""The stratified estimators against the worked example of Olofsson et al. (2014), and the sample design.

The example (section 5 of the paper): a change map of 10,000,000 Landsat pixels (30 m, 0.09 ha) in four
strata, deforestation 200,000 px, forest gain 150,000, stable forest 3,200,000, stable non-forest 6,450,000,
sampled with 75 / 75 / 165 / 325 points. Table 8 gives the sample counts (rows: map class, columns:
reference class) with the map weights W_i; page 54 the accuracies and areas with 95 % intervals. The counts
are those of the example as reproduced by hagc/mapaccuracy (R, ``olofsson()``'s "table 8" example) and
agcopenhaver/PyMapAccuracy (``test_olofsson_table8_2014``); the printed values below are the paper's, to its
printed precision.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geoseg.assess.estimate import Z95, allocate, parse_allocation, sample_size, stratified_estimate
from geoseg.errors import InputError, UnknownNameError

CLASSES = ["deforestation", "forest gain", "stable forest", "stable non-forest"]
MAP_PIXELS = [200_000, 150_000, 3_200_000, 6_450_000]
PIXEL_HA = 0.09  # a 30 m Landsat pixel
TABLE_8 = [[66, 0, 5, 4],
           [0, 55, 8, 12],
           [1, 0, 153, 11],
           [2, 1, 9, 313]]
TABLE_8_WEIGHTS = [0.020, 0.015, 0.320, 0.645]
# page 54, as printed: value, 95 % half-width
USERS = [(0.88, 0.07), (0.73, 0.10), (0.93, 0.04), (0.96, 0.02)]
PRODUCERS = [(0.75, 0.21), (0.85, 0.25), (0.93, 0.03), (0.96, 0.02)]
OVERALL = (0.95, 0.02)
AREAS_HA = [(21_158, 6_158), (11_686, 3_756), (285_770, 15_510), (581_386, 16_282)]


@pytest.fixture(scope="module")
def paper():  # type: ignore[no-untyped-def]
    return stratified_estimate(TABLE_8, MAP_PIXELS, labels=CLASSES)


def test_table_8_counts_and_weights(paper) -> None:  # type: ignore[no-untyped-def]
    assert paper.counts.tolist() == TABLE_8
    assert np.round(paper.weights, 3).tolist() == TABLE_8_WEIGHTS
    assert paper.counts.sum(axis=1).tolist() == [75, 75, 165, 325]  # n_i.
    assert paper.counts.sum(axis=0).tolist() == [69, 56, 175, 340]  # n_.j
    assert paper.counts.sum() == 640


def test_error_matrix_in_area_proportions(paper) -> None:  # type: ignore[no-untyped-def]
    """eq. 4, p_ij = W_i n_ij / n_i., to four decimals; its column sums are the area proportions."""
    expected = [[0.0176, 0.0000, 0.0013, 0.0011],
                [0.0000, 0.0110, 0.0016, 0.0024],
                [0.0019, 0.0000, 0.2967, 0.0213],
                [0.0040, 0.0020, 0.0179, 0.6212]]
    assert np.round(paper.proportions, 4).tolist() == expected
    assert np.round(paper.area_proportion, 4).tolist() == [0.0235, 0.0130, 0.3175, 0.6460]
    assert paper.proportions.sum() == pytest.approx(1.0)


def test_page_54_accuracies(paper) -> None:  # type: ignore[no-untyped-def]
    assert (round(paper.overall, 2), round(Z95 * paper.overall_se, 2)) == OVERALL
    assert [(round(u, 2), round(Z95 * s, 2)) for u, s in zip(paper.users, paper.users_se, strict=True)] == USERS
    assert [(round(p, 2), round(Z95 * s, 2))
            for p, s in zip(paper.producers, paper.producers_se, strict=True)] == PRODUCERS


def test_page_54_areas(paper) -> None:  # type: ignore[no-untyped-def]
    area, se = paper.areas(sum(MAP_PIXELS) * PIXEL_HA)
    assert [(round(a), round(Z95 * s)) for a, s in zip(area, se, strict=True)] == AREAS_HA
    assert area.sum() == pytest.approx(sum(MAP_PIXELS) * PIXEL_HA)  # the estimates share out the whole map


def test_eq_13_sample_size_of_the_example() -> None:
    """Section 5.1: conjectured user's accuracies 0.7, 0.6, 0.9, 0.95 and a target S(O) of 0.01 give 641."""
    assert sample_size(MAP_PIXELS, [0.7, 0.6, 0.9, 0.95], 0.01) == 641
    # the finite-population term: a map of few pixels needs fewer points
    assert sample_size([20, 15, 320, 645], [0.7, 0.6, 0.9, 0.95], 0.01) < 641
    with pytest.raises(InputError, match="target-se"):
        sample_size(MAP_PIXELS, [0.9] * 4, 0)
    with pytest.raises(InputError, match="between|lie in"):
        sample_size(MAP_PIXELS, [0.9, 1.2, 0.9, 0.9], 0.01)


def test_a_perfect_map_has_no_error() -> None:
    e = stratified_estimate(np.diag([10, 20, 30]), [100, 200, 700])
    assert e.overall == 1.0 and e.overall_se == 0.0
    assert e.users.tolist() == [1, 1, 1] and e.producers.tolist() == [1, 1, 1]
    assert e.area_proportion.tolist() == pytest.approx([0.1, 0.2, 0.7])
    assert e.area_proportion_se.tolist() == [0, 0, 0]


def test_undefined_values_are_nan_with_a_warning() -> None:
    # class 3 is never mapped (no pixels, no points) but is found by the reference; class 2 has one point
    e = stratified_estimate([[9, 0, 1], [0, 1, 0], [0, 0, 0]], [500, 500, 0], labels=["a", "b", "c"])
    assert np.isnan(e.users[2])
    assert e.area_proportion[2] == pytest.approx(0.5 * 1 / 10)
    assert np.isnan(e.users_se[1]) and np.isnan(e.overall_se)
    assert any("b has one sample point" in w for w in e.warnings)
    e = stratified_estimate([[10, 0], [0, 0]], [500, 500], labels=["a", "b"])
    assert any("b covers 50.0000% of the map but has no sample point" in w for w in e.warnings)


def test_bad_matrices_are_refused() -> None:
    with pytest.raises(InputError, match="not \\(2, 2\\)"):
        stratified_estimate([[1, 2, 3]], [1, 2])
    with pytest.raises(InputError, match="negative"):
        stratified_estimate([[1, -1], [0, 1]], [1, 2])
    with pytest.raises(InputError, match="no mapped pixel"):
        stratified_estimate([[1, 0], [0, 1]], [0, 0])


@pytest.mark.parametrize("n", [40, 200, 641, 1000])
@pytest.mark.parametrize("allocation", ["proportional", "equal", "neyman", "min:10", "min:50"])
def test_allocations_add_up_within_the_strata(n: int, allocation: str) -> None:
    pixels = np.array([200, 150, 3200, 6450])
    per = allocate(n, pixels, allocation, [0.7, 0.6, 0.9, 0.95]) if not (allocation == "min:50" and n < 200) \
        else None
    if per is None:
        with pytest.raises(InputError, match="min:N"):
            allocate(n, pixels, allocation)
        return
    assert per.sum() == n and (per >= 0).all() and (per <= pixels).all()
    if allocation.startswith("min:"):
        assert (per >= int(allocation[4:])).all()


def test_allocations_follow_their_rule() -> None:
    w = [0.7, 0.6, 0.9, 0.95]
    assert allocate(641, MAP_PIXELS, "proportional").tolist() == [13, 10, 205, 413]
    assert allocate(640, MAP_PIXELS, "equal").tolist() == [160, 160, 160, 160]
    neyman = allocate(641, MAP_PIXELS, "neyman", w)
    ws = np.array(TABLE_8_WEIGHTS) * np.sqrt(np.array(w) * (1 - np.array(w)))
    assert np.abs(neyman - 641 * ws / ws.sum()).max() < 1
    # min:75 -- the two change strata get their 75, the stable ones share the rest by area
    per = allocate(641, MAP_PIXELS, "min:75")
    assert per[:2].tolist() == [75, 75] and per.sum() == 641
    assert per[2] / per[3] == pytest.approx(3_200_000 / 6_450_000, rel=0.01)
    # a stratum smaller than its share gives all its pixels and the others share the rest
    per = allocate(100, [5, 1000, 1000], "equal")
    assert per[0] == 5 and sorted(per[1:].tolist()) == [47, 48]


def test_allocation_names() -> None:
    assert parse_allocation("min:50") == ("min", 50)
    assert parse_allocation(" Neyman ") == ("neyman", None)
    with pytest.raises(UnknownNameError, match="valid names: equal, min:N, neyman, proportional"):
        parse_allocation("random")
    for bad in ("min", "min:0", "min:x", "equal:3"):
        with pytest.raises(InputError):
            parse_allocation(bad)
    with pytest.raises(InputError, match="only 10 mapped pixels"):
        allocate(11, [5, 5])
    with pytest.raises(InputError, match="positive"):
        allocate(0, [5, 5])


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6).flatmap(lambda q: st.tuples(
    st.lists(st.lists(st.integers(0, 40), min_size=q, max_size=q), min_size=q, max_size=q),
    st.lists(st.integers(1, 10**7), min_size=q, max_size=q))))
def test_estimates_are_proportions_of_the_map(case: tuple[list[list[int]], list[int]]) -> None:
    """Whatever the sample: with every stratum sampled, the proportions share out the map (rows add up to the
    weights, the area proportions to 1), accuracies lie in [0, 1], and scaling the map changes nothing."""
    counts, pixels = case
    counts = [row if sum(row) else [1] + row[1:] for row in counts]
    e = stratified_estimate(counts, pixels)
    assert e.proportions.sum(axis=1) == pytest.approx(e.weights)
    assert e.area_proportion.sum() == pytest.approx(1.0)
    assert 0 <= e.overall <= 1 + 1e-12
    for acc in (e.users, e.producers):
        finite = acc[np.isfinite(acc)]
        assert ((finite >= 0) & (finite <= 1 + 1e-12)).all()
    scaled = stratified_estimate(counts, [3 * p for p in pixels])
    assert np.allclose(scaled.area_proportion_se, e.area_proportion_se, equal_nan=True)
    assert np.allclose(scaled.producers_se, e.producers_se, equal_nan=True)
