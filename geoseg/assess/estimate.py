"""Stratified estimators of accuracy and area (Olofsson et al. 2014), in plain numpy.

Olofsson, P., Foody, G. M., Herold, M., Stehman, S. V., Woodcock, C. E., Wulder, M. A. (2014). Good practices
for estimating area and assessing accuracy of land change. Remote Sensing of Environment 148, 42-57.

The strata are the map classes: ``counts[i, j]`` is the number of sample points mapped as class ``i`` whose
reference class is ``j`` (rows: map, columns: reference, one order for both), and ``map_pixels[i]`` is the
map's own pixel count of class ``i``, so that ``W_i = map_pixels[i] / sum(map_pixels)``. With
``n_i. = sum_j counts[i, j]``, the paper's estimators are

* eq. 4, the error matrix in estimated area proportions: ``p_ij = W_i n_ij / n_i.``;
* eq. 1-3, overall ``O = sum_j p_jj``, user's ``U_i = p_ii / p_i.``, producer's ``P_j = p_jj / p_.j``;
* eq. 5, ``V(O) = sum_i W_i^2 U_i (1 - U_i) / (n_i. - 1)``;
* eq. 6, ``V(U_i) = U_i (1 - U_i) / (n_i. - 1)``;
* eq. 7, ``V(P_j) = [N_j.^2 (1 - P_j)^2 U_j (1 - U_j) / (n_j. - 1)
  + P_j^2 sum_{i != j} N_i.^2 (n_ij / n_i.) (1 - n_ij / n_i.) / (n_i. - 1)] / N_.j^2``, where ``N_i.`` is
  the map's pixel count of class ``i`` and ``N_.j = sum_i N_i. n_ij / n_i.`` the estimated pixel count of
  reference class ``j``;
* eq. 9-10, the area proportion ``p_.k = sum_i W_i n_ik / n_i.`` and its standard error
  ``S(p_.k) = sqrt(sum_i W_i^2 (n_ik / n_i.) (1 - n_ik / n_i.) / (n_i. - 1))``;
* eq. 11-12, area ``A_k = A p_.k`` and ``S(A_k) = A S(p_.k)`` for a map of total area ``A``;
* 95 % confidence intervals ``+- 1.96 S`` (the ``_ci95`` values are these half-widths);
* eq. 13, the sample size for a target standard error ``S(O)`` of overall accuracy, from conjectured user's
  accuracies ``U_i`` (``S_i = sqrt(U_i (1 - U_i))``):
  ``n = (sum_i W_i S_i)^2 / (S(O)^2 + sum_i W_i S_i^2 / N)``, with ``N`` the pixels of the map.

A stratum with fewer than two sample points has no variance estimate (``n_i. - 1 <= 0``): the standard
errors that need it are NaN. A stratum without any sample point contributes nothing to the estimated
proportions, which are then biased: :attr:`Estimate.warnings` says so.

Allocations of ``n`` points to strata (:data:`ALLOCATIONS`, :func:`allocate`): ``proportional`` (to
``W_i``), ``equal``, ``neyman`` (to ``W_i S_i``, optimal for overall accuracy) and ``min:N`` (at least
``N`` points in every stratum, the rest proportional to area: the paper's recommendation for rare classes,
with N = 50 to 100). Every stratum gets at most its pixel count; shares are rounded by largest remainder so
that they add up to ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from geoseg.errors import InputError, unknown_name

Z95 = 1.96  # the paper's 95 % normal quantile


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den`` is 0 (an undefined ratio, not a zero)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


@dataclass(frozen=True)
class Estimate:
    """The stratified estimates of one error matrix (see the module's text for the formulas).

    Arrays of length ``q`` (the classes) follow the order of :attr:`counts`; ``*_se`` are standard errors
    and :meth:`ci95` turns one into the 95 % half-width. Undefined values (a class never mapped, or a
    stratum too small for a variance) are NaN.
    """

    counts: np.ndarray  # (q, q) int: sample points, rows map class, columns reference class
    map_pixels: np.ndarray  # (q,) the map's pixels of each class (the strata sizes N_i.)
    weights: np.ndarray  # (q,) W_i
    proportions: np.ndarray  # (q, q) p_ij, the error matrix in estimated area proportions
    overall: float
    overall_se: float
    users: np.ndarray
    users_se: np.ndarray
    producers: np.ndarray
    producers_se: np.ndarray
    area_proportion: np.ndarray  # p_.k
    area_proportion_se: np.ndarray
    warnings: tuple[str, ...] = field(default=())

    @staticmethod
    def ci95(se: float | np.ndarray) -> float | np.ndarray:
        """The half-width of the 95 % confidence interval of an estimate with standard error ``se``."""
        return Z95 * se

    def areas(self, total: float) -> tuple[np.ndarray, np.ndarray]:
        """Estimated area of each class and its standard error (eq. 11-12), for a map of ``total`` area (in
        any unit: pixels, m2, ha)."""
        return self.area_proportion * total, self.area_proportion_se * total


def stratified_estimate(counts: np.ndarray | Sequence[Sequence[int]], map_pixels: np.ndarray | Sequence[float],
                        labels: Sequence[str] | None = None) -> Estimate:
    """Accuracy and area proportions with standard errors from a stratified random sample.

    Args:
        counts: ``(q, q)`` sample counts, rows the map class (the stratum), columns the reference class.
        map_pixels: ``(q,)`` the map's pixels (or area) of each class, in the same order.
        labels: the classes' names, for the warnings (default: their row numbers).

    Returns:
        An :class:`Estimate`.

    Raises:
        InputError: the shapes disagree, a count or size is negative, or the map is empty.
    """
    n = np.asarray(counts, dtype=np.float64)
    big_n = np.asarray(map_pixels, dtype=np.float64)
    q = len(big_n)
    if n.shape != (q, q):
        raise InputError(f"the error matrix is {n.shape}, not ({q}, {q}) as the {q} map classes need")
    if (n < 0).any() or (big_n < 0).any():
        raise InputError("sample counts and map pixel counts must not be negative")
    total = big_n.sum()
    if total <= 0:
        raise InputError("the map has no mapped pixel: nothing to estimate")
    w = big_n / total
    ni = n.sum(axis=1)
    label = list(labels) if labels is not None else [f"at row {i}" for i in range(q)]
    notes: list[str] = []
    for i in np.flatnonzero((ni == 0) & (w > 0)):
        notes.append(f"map class {label[i]} covers {w[i]:.4%} of the map but has no sample point: the estimated "
                     "proportions leave that share out")
    row_share = _ratio(n, ni[:, None])  # n_ij / n_i.
    row_share = np.nan_to_num(row_share, nan=0.0)
    p = w[:, None] * row_share  # eq. 4
    dof = np.where(ni >= 2, ni - 1, np.nan)  # n_i. - 1; no variance below two points
    for i in np.flatnonzero((ni == 1) & (w > 0)):
        notes.append(f"map class {label[i]} has one sample point: its variance, and those that need it, are "
                     "undefined (NaN)")

    diag = np.diag(p)
    overall = float(diag.sum())  # eq. 1
    users = _ratio(diag, p.sum(axis=1))  # eq. 2
    col = p.sum(axis=0)
    producers = _ratio(diag, col)  # eq. 3
    present = w > 0  # strata without pixels have W_i = 0 and add nothing, whatever their sample
    u_var = users * (1 - users) / dof  # eq. 6
    overall_var = float(np.sum(np.where(present, w**2 * u_var, 0.0)))  # eq. 5

    # eq. 7: the producer's accuracy's variance, strata sizes N_i. as in the paper
    share_var = np.where(present[:, None], row_share * (1 - row_share) / dof[:, None], 0.0)
    n_hat = (big_n[:, None] * row_share).sum(axis=0)  # N_.j
    producers_var = np.full(q, np.nan)
    for j in range(q):
        if n_hat[j] == 0:
            continue
        first = big_n[j] ** 2 * (1 - producers[j]) ** 2 * u_var[j] if big_n[j] > 0 else 0.0
        others = sum(big_n[i] ** 2 * share_var[i, j] for i in range(q) if i != j)
        producers_var[j] = (first + producers[j] ** 2 * others) / n_hat[j] ** 2

    area_var = (w[:, None] ** 2 * share_var).sum(axis=0)  # eq. 10 (squared)
    return Estimate(
        counts=n.astype(np.int64), map_pixels=big_n, weights=w, proportions=p,
        overall=overall, overall_se=math.sqrt(overall_var) if np.isfinite(overall_var) else math.nan,
        users=users, users_se=np.sqrt(u_var), producers=producers, producers_se=np.sqrt(producers_var),
        area_proportion=col, area_proportion_se=np.sqrt(area_var), warnings=tuple(notes),
    )


# ------------------------------------------------------------------------------------------ sample design


def _expected_sd(expected_users: np.ndarray) -> np.ndarray:
    u = np.asarray(expected_users, dtype=np.float64)
    if ((u < 0) | (u > 1)).any():
        raise InputError(f"expected user's accuracies must lie in [0, 1], got {u.tolist()}")
    return np.sqrt(u * (1 - u))


def sample_size(map_pixels: np.ndarray | Sequence[float], expected_users: np.ndarray | Sequence[float],
                target_se: float) -> int:
    """The sample size that gives overall accuracy the standard error ``target_se`` (eq. 13), rounded up.

    Args:
        map_pixels: the map's pixels of each class (the strata sizes).
        expected_users: a conjectured user's accuracy of each class (the paper: lower for rare or change
            classes, higher for stable ones).
        target_se: the standard error of overall accuracy to reach, e.g. 0.01.

    Raises:
        InputError: ``target_se`` is not in (0, 1), or the accuracies are not in [0, 1].
    """
    if not 0 < target_se < 1:
        raise InputError(f"--target-se {target_se!r}: give the standard error of overall accuracy to reach, "
                         "a number between 0 and 1 such as 0.01")
    big_n = np.asarray(map_pixels, dtype=np.float64)
    w = big_n / big_n.sum()
    s = _expected_sd(np.asarray(expected_users, dtype=np.float64))
    n = (w * s).sum() ** 2 / (target_se**2 + (w * s**2).sum() / big_n.sum())
    return max(1, math.ceil(n - 1e-9))


def _largest_remainder(shares: np.ndarray, n: int, caps: np.ndarray) -> np.ndarray:
    """Whole numbers adding up to ``n``, close to ``shares`` (which add up to ``n``), each within its cap."""
    out = np.minimum(np.floor(shares).astype(np.int64), caps)
    while out.sum() < n:
        room = out < caps
        rest = np.where(room, shares - out, -np.inf)
        out[int(np.argmax(rest))] += 1
    return out


def _proportional(n: int, w: np.ndarray, caps: np.ndarray, floor: np.ndarray | None = None) -> np.ndarray:
    """``n`` points in proportion to ``w``, at least ``floor`` and at most ``caps`` in each stratum: a stratum
    whose share passes its cap (then, its floor) is fixed there and the others share the rest again."""
    lo = np.zeros_like(caps) if floor is None else np.minimum(floor, caps)
    if lo.sum() > n:
        raise InputError(f"-n {n}: fewer points than the {int(lo.sum())} that at least {int(lo.max())} in each "
                         f"of {len(lo)} strata need; raise -n or lower min:N")
    fixed = np.full(len(w), np.nan)
    while True:
        free = np.isnan(fixed)
        left = n - np.nansum(fixed)
        wf = np.where(free, w, 0.0)
        shares = np.where(free, left * wf / wf.sum() if wf.sum() > 0 else 0.0, fixed)
        high, low = free & (shares > caps), free & (shares < lo)
        if high.any():
            fixed[high] = caps[high]
        elif low.any():
            fixed[low] = lo[low]
        else:
            return _largest_remainder(shares, n, caps)


def _alloc_proportional(n: int, w: np.ndarray, s: np.ndarray, caps: np.ndarray, arg: int | None) -> np.ndarray:
    return _proportional(n, w, caps)


def _alloc_equal(n: int, w: np.ndarray, s: np.ndarray, caps: np.ndarray, arg: int | None) -> np.ndarray:
    return _proportional(n, np.ones_like(w), caps)


def _alloc_neyman(n: int, w: np.ndarray, s: np.ndarray, caps: np.ndarray, arg: int | None) -> np.ndarray:
    return _proportional(n, w * s, caps)


def _alloc_min(n: int, w: np.ndarray, s: np.ndarray, caps: np.ndarray, arg: int | None) -> np.ndarray:
    return _proportional(n, w, caps, floor=np.full(len(w), int(arg or 0), dtype=np.int64))


Allocation = Callable[[int, np.ndarray, np.ndarray, np.ndarray, "int | None"], np.ndarray]
ALLOCATIONS: dict[str, Allocation] = {
    "proportional": _alloc_proportional,
    "equal": _alloc_equal,
    "neyman": _alloc_neyman,
    "min": _alloc_min,
}


def parse_allocation(spec: str) -> tuple[str, int | None]:
    """``"proportional"``, ``"equal"``, ``"neyman"`` or ``"min:N"`` as ``(name, N)``.

    Raises:
        UnknownNameError: an unknown name (the message lists the valid ones).
        InputError: ``min`` without a positive whole ``N``.
    """
    name, _, arg = spec.strip().lower().partition(":")
    if name not in ALLOCATIONS:
        raise unknown_name("allocation", spec, ["proportional", "equal", "neyman", "min:N"])
    if name != "min":
        if arg:
            raise InputError(f"--allocation {spec!r}: only min takes a number (min:50)")
        return name, None
    try:
        least = int(arg)
    except ValueError:
        least = 0
    if least < 1:
        raise InputError(f"--allocation {spec!r}: give the least points per stratum, e.g. min:50")
    return name, least


def allocate(n: int, map_pixels: np.ndarray | Sequence[int], allocation: str = "proportional",
             expected_users: np.ndarray | Sequence[float] | None = None) -> np.ndarray:
    """Points per stratum for a sample of ``n`` points (see the module's text).

    Args:
        n: the sample size.
        map_pixels: the pixels of each stratum (the most points it can take).
        allocation: ``proportional``, ``equal``, ``neyman`` or ``min:N``.
        expected_users: conjectured user's accuracies (``neyman`` only; default 0.9 everywhere).

    Raises:
        InputError: ``n`` is not positive or exceeds the map's pixels; a bad allocation.
    """
    name, arg = parse_allocation(allocation)
    caps = np.asarray(map_pixels, dtype=np.int64)
    if n < 1:
        raise InputError(f"-n {n}: give a positive number of sample points")
    if n > caps.sum():
        raise InputError(f"-n {n}: the map has only {int(caps.sum())} mapped pixels to sample")
    w = caps / caps.sum()
    s = _expected_sd(np.full(len(caps), 0.9) if expected_users is None else np.asarray(expected_users))
    return ALLOCATIONS[name](n, w.astype(np.float64), s, caps, arg)


__all__ = ["ALLOCATIONS", "Z95", "Estimate", "allocate", "parse_allocation", "sample_size", "stratified_estimate"]
