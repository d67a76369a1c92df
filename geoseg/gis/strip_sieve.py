"""GDAL's sieve of a class raster read in strips of rows: the regions, joined across the strips' seams, and
each small region's fate (the semantics and the streaming scheme are in :mod:`geoseg.gis.sieve`'s docstring).

:class:`StripSieve` takes strips in order (``scan``), decides once every strip was seen (``decide``) and
rewrites strips given again (``apply``); :func:`scan_strip` labels one strip on its own, so that worker
processes can scan strips while the joins stay in order; :func:`sieve_array` runs it on an array.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from geoseg.errors import InputError
from geoseg.gis.quantities import check_connectivity

log = logging.getLogger(__name__)

_NOTHING = np.zeros((2, 0), dtype=np.int32)
_STRUCTURES = {4: ndimage.generate_binary_structure(2, 1), 8: ndimage.generate_binary_structure(2, 2)}


def _label(values: np.ndarray, valid: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pieces of a strip: ``(labels, piece_values)``; ``labels`` int32 ``(rows, cols)``, 0 = invalid,
    pieces ``1..n`` with values ``piece_values[i - 1]``."""
    everywhere = bool(valid.all())
    if values.dtype.itemsize <= 2:
        lo = int(np.iinfo(values.dtype).min)
        shifted = values if lo == 0 else values.astype(np.int32) - lo
        counts = np.bincount(shifted.ravel(), minlength=1)
        if not everywhere:
            off = np.bincount(shifted[~valid], minlength=1)
            counts[: len(off)] -= off
        classes = np.flatnonzero(counts) + lo
    else:
        classes = np.unique(values if everywhere else values[valid])
    labels = np.zeros(values.shape, dtype=np.int32)
    lab = np.empty(values.shape, dtype=np.int32)
    piece_values: list[np.ndarray] = []
    n = 0
    for c in classes.tolist():
        m = values == c
        if not everywhere:
            m &= valid
        k = ndimage.label(m, structure=structure, output=lab)
        np.add(lab, n, out=labels, where=m)  # classes are disjoint: each pixel is written once
        piece_values.append(np.full(k, c, dtype=values.dtype))
        n += k
    return labels, (np.concatenate(piece_values) if piece_values else np.zeros(0, dtype=values.dtype))


def _first_contacts(s: np.ndarray, n: np.ndarray, key: np.ndarray, span: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One row per distinct ``(s, n)`` pair (ids below ``span``), with its smallest ``key``."""
    if not len(s):
        return s, n, key
    pair = s.astype(np.int64) * span + n
    order = np.lexsort((key, pair))
    pair = pair[order]
    first = np.ones(len(pair), dtype=bool)
    first[1:] = pair[1:] != pair[:-1]
    keep = order[first]
    return s[keep], n[keep], key[keep]


def _best(s: np.ndarray, nb: np.ndarray, key: np.ndarray, size: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per region ``s``, its contact with the largest region ``nb``, the one of smallest ``key`` among
    equals (GDAL's strict ``>`` in scan order)."""
    order = np.lexsort((key, -size[nb], s))
    s, nb, key = s[order], nb[order], key[order]
    first = np.ones(len(s), dtype=bool)
    first[1:] = s[1:] != s[:-1]
    return s[first], nb[first], key[first]


def _runs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Where a run of equal consecutive ``(a, b)`` pairs starts (contacts along one boundary repeat)."""
    first = np.ones(len(a), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return first


def _small_lut(sizes: np.ndarray, threshold: int) -> np.ndarray:
    """``lut[label]``: whether piece ``label`` (1..n) has fewer than ``threshold`` pixels; ``lut[0]`` False."""
    lut = np.zeros(len(sizes) + 1, dtype=bool)
    lut[1:] = sizes < threshold
    return lut


def _contacts(a: np.ndarray, b: np.ndarray, va: np.ndarray, vb: np.ndarray, small_a: np.ndarray,
              small_b: np.ndarray, k: int, x0: int, y0: int, width: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contacts of one of GDAL's looks (``k``: 0 above, 1 above left, 2 above right, 3 left) between pixels
    ``a`` (this one, at column ``x + x0`` of image row ``y + y0``) and ``b`` (the one looked at): the pieces
    of both and GDAL's scan position, where the values differ, both are valid and one piece is small; the
    first of each run of equal pairs only (row-major: it is met first)."""
    yy, xx = np.nonzero(va != vb)
    ia, ib = a[yy, xx], b[yy, xx]
    hit = (ia > 0) & (ib > 0) & (small_a[ia] | small_b[ib])
    hit[hit] = _runs(ia[hit], ib[hit])
    return ia[hit], ib[hit], ((yy[hit].astype(np.int64) + y0) * width + (xx[hit] + x0)) * 4 + k


@dataclass
class StripScan:
    """What the scan of one strip finds on its own, in strip-local piece labels ``1..n`` (0 = invalid):
    piece values and sizes, first contacts inside the strip of small pieces ``(piece, neighbour, scan
    position)``, the pixels of small pieces ``(2, k)`` (flat index, label) or the ``.npy`` file holding them,
    and the labels and values of its first and last rows (for the seams)."""

    rows: int
    n: int
    values: np.ndarray
    sizes: np.ndarray
    contacts: tuple[np.ndarray, np.ndarray, np.ndarray]
    changeable: np.ndarray | Path
    first: tuple[np.ndarray, np.ndarray]
    last: tuple[np.ndarray, np.ndarray]


def scan_strip(row0: int, values: np.ndarray, valid: np.ndarray, threshold: int, connectivity: int,
               spill: Path | None = None) -> StripScan:
    """Label a strip starting at image row ``row0`` and gather its :class:`StripScan` (no other strip
    needed, so strips can be scanned in parallel; :meth:`StripSieve.add` then joins them in order)."""
    labels, pvals = _label(values, valid, _STRUCTURES[connectivity])
    n = len(pvals)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.int32)  # a strip < 2**31 pixels
    h, w = values.shape
    nothing = np.zeros(0, dtype=np.int32)
    contacts: tuple[np.ndarray, np.ndarray, np.ndarray] = (nothing, nothing, np.zeros(0, dtype=np.int64))
    changeable: np.ndarray | Path = _NOTHING
    if threshold > 1:
        small = _small_lut(sizes, threshold)
        below, above = slice(1, None), slice(None, -1)
        moves = [(labels[below], labels[above], values[below], values[above], 0, 0, row0 + 1)]
        if connectivity == 8 and w > 1:
            moves += [(labels[below, 1:], labels[above, :-1], values[below, 1:], values[above, :-1], 1, 1, row0 + 1),
                      (labels[below, :-1], labels[above, 1:], values[below, :-1], values[above, 1:], 2, 0, row0 + 1)]
        if w > 1:
            moves.append((labels[:, 1:], labels[:, :-1], values[:, 1:], values[:, :-1], 3, 1, row0))
        parts = [_contacts(a, b, va, vb, small, small, k, x0, y0, w) for a, b, va, vb, k, x0, y0 in moves]
        ia = np.concatenate([q[0] for q in parts])
        ib = np.concatenate([q[1] for q in parts])
        key = np.concatenate([q[2] for q in parts])
        sa, sb = small[ia], small[ib]
        contacts = _first_contacts(np.concatenate([ia[sa], ib[sb]]), np.concatenate([ib[sa], ia[sb]]),
                                   np.concatenate([key[sa], key[sb]]), n + 1)
        flat = labels.ravel()
        idx = np.flatnonzero(small[flat])
        pixels = np.stack([idx.astype(np.int32), flat[idx]])
        if spill is None:
            changeable = pixels
        else:
            np.save(spill, pixels)
            changeable = spill
    return StripScan(h, n, pvals, sizes, contacts, changeable, (labels[0].copy(), values[0].copy()),
                     (labels[-1].copy(), values[-1].copy()))


@dataclass
class SieveStats:
    """What a sieve found: ``regions`` (all), ``small`` (fewer pixels than the threshold), ``merged`` (small
    regions that took a neighbour's value; the others had no neighbour or only a cycle of small ones)."""

    regions: int = 0
    small: int = 0
    merged: int = 0


class StripSieve:
    """GDAL's sieve over strips of rows fed in order: :meth:`scan` each strip (or :meth:`add` the
    :func:`scan_strip` of each, made anywhere), :meth:`decide`, then :meth:`apply` each strip again (the
    same strips, same values) to get its sieved values.

    Strips are ``(rows, width)`` arrays of integer values; the scan also takes their boolean validity.
    """

    def __init__(self, width: int, threshold: int, connectivity: int = 4,
                 spill: str | os.PathLike[str] | None = None):
        self.width = int(width)
        self.threshold = int(threshold)
        self.connectivity = check_connectivity(connectivity)
        self.base = 0
        self.strips: list[tuple[int, int, int]] = []  # (row0, rows, pieces) of each scanned strip
        self._values: list[np.ndarray] = []
        self._sizes: list[np.ndarray] = []
        self._joins: list[tuple[np.ndarray, np.ndarray]] = []
        self._contacts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        # the last row scanned: piece labels, values, the sizes of its strip's pieces, and their first id
        self._prev: tuple[np.ndarray, np.ndarray, np.ndarray, int] | None = None
        self._out: np.ndarray | None = None
        self._applied = 0
        # per strip, the pixels of its small pieces (the only ones that can change): (flat index, label),
        # kept in memory, or in files in the folder ``spill``
        self._spill = None if spill is None else Path(os.fspath(spill))
        self._changeable: list[np.ndarray | Path] = []
        self._applied_base = 0
        self.stats = SieveStats()

    # -- pass 1
    def scan(self, row0: int, values: np.ndarray, valid: np.ndarray) -> None:
        """Label one strip (the next one down) and record its pieces, seam joins and contacts."""
        spill = None if self._spill is None else self._spill / f"strip{len(self.strips)}.npy"
        self.add(row0, scan_strip(row0, values, valid, self.threshold, self.connectivity, spill))

    def add(self, row0: int, facts: StripScan) -> None:
        """Record the :func:`scan_strip` of the next strip down (made here or in a worker process)."""
        if self._out is not None:
            raise RuntimeError("scan after decide")
        rows, w = facts.rows, len(facts.first[0])
        expected = self.strips[-1][0] + self.strips[-1][1] if self.strips else 0
        if w != self.width or row0 != expected:
            raise ValueError(f"strip at row {row0} of width {w}: expected row {expected}, width {self.width}")
        n, base = facts.n, self.base
        self._values.append(facts.values)
        self._sizes.append(facts.sizes)
        self.strips.append((row0, rows, n))
        self.base += n
        if self.threshold > 1:
            cs, cn, ck = facts.contacts
            if len(cs):
                self._contacts.append((self._ids(cs, base), self._ids(cn, base), ck))
            self._changeable.append(facts.changeable)
            if self._prev is not None:
                self._seam(row0, facts, base)
        self._prev = (facts.last[0], facts.last[1], facts.sizes, base)

    def _ids(self, labels: np.ndarray, base: int) -> np.ndarray:
        """Global piece ids of strip-local labels, in int32 while they fit (halves the bookkeeping)."""
        return (labels.astype(np.int64) + (base - 1)).astype(np.int32 if self.base < 2**31 else np.int64)

    def _seam(self, row0: int, facts: StripScan, base: int) -> None:
        """Joins and contacts between the last row scanned and this strip's first row."""
        assert self._prev is not None
        p_lab, p_val, p_size, p_base = self._prev
        lab0, val0 = facts.first
        self._join_seam(p_lab, p_val, p_base, lab0, val0, base)
        small = _small_lut(facts.sizes, self.threshold)
        p_small = _small_lut(p_size, self.threshold)
        a, b, va, vb = lab0[None], p_lab[None], val0[None], p_val[None]
        moves = [(a, b, va, vb, 0, 0)]
        if self.connectivity == 8 and self.width > 1:
            moves += [(a[:, 1:], b[:, :-1], va[:, 1:], vb[:, :-1], 1, 1),
                      (a[:, :-1], b[:, 1:], va[:, :-1], vb[:, 1:], 2, 0)]
        parts = [_contacts(*m[:4], small, p_small, m[4], m[5], row0, self.width) for m in moves]
        ia = np.concatenate([q[0] for q in parts])
        ib = np.concatenate([q[1] for q in parts])
        key = np.concatenate([q[2] for q in parts])
        sa, sb = small[ia], p_small[ib]
        ga, gb = self._ids(ia, base), self._ids(ib, p_base)
        if len(ia):
            self._contacts.append((np.concatenate([ga[sa], gb[sb]]), np.concatenate([gb[sa], ga[sb]]),
                                   np.concatenate([key[sa], key[sb]])))

    def _join_seam(self, up_lab: np.ndarray, up_val: np.ndarray, up_base: int, lab0: np.ndarray,
                   val0: np.ndarray, base: int) -> None:
        pairs = [(slice(None), slice(None))]
        if self.connectivity == 8 and self.width > 1:
            pairs += [(slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))]
        for su, sd in pairs:
            u, d = up_lab[su], lab0[sd]
            hit = (u > 0) & (d > 0) & (up_val[su] == val0[sd])
            if hit.any():
                self._joins.append((u[hit].astype(np.int64) + (up_base - 1), d[hit].astype(np.int64) + (base - 1)))

    # -- decision
    def decide(self) -> SieveStats:
        """Join pieces into regions and decide every region's output value (after the last :meth:`scan`)."""
        n = self.base
        values = np.concatenate(self._values).astype(np.int64) if self._values else np.zeros(0, dtype=np.int64)
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros(0, dtype=np.int32)
        self._values, self._sizes = [], []
        if self._joins:
            u = np.concatenate([j[0] for j in self._joins])
            d = np.concatenate([j[1] for j in self._joins])
            graph = coo_matrix((np.ones(len(u), dtype=np.int8), (u, d)), shape=(n, n)).tocsr()
            ncomp, comp = connected_components(graph, directed=False)
        else:
            ncomp, comp = n, np.arange(n, dtype=np.int64)
        self._joins = []
        region_size = np.bincount(comp, weights=sizes, minlength=ncomp).astype(np.int64)
        region_value = np.zeros(ncomp, dtype=np.int64)
        region_value[comp] = values
        small = region_size < self.threshold
        nxt = np.arange(ncomp, dtype=np.int64)  # regions of threshold size or more stay themselves
        nxt[small] = -1
        if self._contacts and self.threshold > 1:
            # each strip's contacts, in regions, cut down to the best per small region, then the best of those
            parts = []
            while self._contacts:
                cs, cn, ck = self._contacts.pop(0)
                rs = comp[cs]
                keep = small[rs]
                parts.append(_best(rs[keep], comp[cn[keep]], ck[keep], region_size))
            s, nb, _ = _best(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                             np.concatenate([p[2] for p in parts]), region_size)
            del parts
            nxt[s] = nb
        # follow the chains of largest neighbours by pointer doubling: big regions are fixed points, a
        # chain that reaches one ends there, a cycle of small regions never does
        steps = 1
        while steps <= ncomp:
            nn = np.where(nxt >= 0, nxt[np.maximum(nxt, 0)], -1)
            if np.array_equal(nn, nxt):
                break
            nxt = nn
            steps *= 2
        ok = nxt >= 0
        ok[ok] = ~small[nxt[ok]]
        out = np.where(ok, region_value[np.maximum(nxt, 0)], region_value)
        self._out = out[comp]
        self.stats = SieveStats(regions=int(ncomp), small=int(small.sum()), merged=int((ok & small).sum()))
        return self.stats

    # -- pass 2
    def apply(self, row0: int, values: np.ndarray) -> np.ndarray:
        """The sieved values of a strip, fed again in the order of :meth:`scan` (same strips, same values)."""
        if self._out is None:
            raise RuntimeError("apply before decide")
        if self._applied >= len(self.strips) or self.strips[self._applied][:2] != (row0, values.shape[0]):
            raise ValueError(f"strip at row {row0} ({values.shape[0]} rows) was not scanned in this order")
        _, _, n = self.strips[self._applied]
        base = self._applied_base
        out = values.copy()
        if self.threshold > 1:
            item = self._changeable[self._applied]
            pixels = np.load(item) if isinstance(item, Path) else item
            self._changeable[self._applied] = _NOTHING  # not a view: that would keep the pixels
            if isinstance(item, Path):
                item.unlink()
            out.ravel()[pixels[0]] = self._out[pixels[1].astype(np.int64) + (base - 1)]
        self._applied += 1
        self._applied_base += n
        return out


def strips(height: int, rows: int) -> Iterator[tuple[int, int]]:
    """``(first row, rows)`` of each strip of ``rows`` rows, top to bottom."""
    for r0 in range(0, height, rows):
        yield r0, min(rows, height - r0)


def sieve_array(data: np.ndarray, threshold: int, *, connectivity: int = 4, mask: np.ndarray | None = None,
                strip_rows: int = 256) -> np.ndarray:
    """GDAL's sieve of a ``(rows, cols)`` integer array, computed in strips of ``strip_rows`` rows.

    Equal to ``rasterio.features.sieve(data, threshold, mask=mask, connectivity=connectivity)`` for
    ``threshold >= 1`` (and to ``data`` for ``threshold <= 1``), whatever ``strip_rows``. ``mask``: True
    where valid (default: all). For in-memory arrays; :func:`sieve_raster` streams a file.
    """
    if data.ndim != 2 or data.dtype.kind not in "iu":
        raise InputError(f"sieve: expected a 2-D integer array, got {data.ndim}-D {data.dtype}")
    valid = np.ones(data.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if strip_rows < 1:
        raise InputError(f"sieve: strip_rows must be at least 1, got {strip_rows}")
    sv = StripSieve(data.shape[1], threshold, connectivity)
    if threshold <= 1 or data.size == 0:
        return data.copy()
    for r0, h in strips(data.shape[0], strip_rows):
        sv.scan(r0, data[r0:r0 + h], valid[r0:r0 + h])
    sv.decide()
    out = np.empty_like(data)
    for r0, h in strips(data.shape[0], strip_rows):
        out[r0:r0 + h] = sv.apply(r0, data[r0:r0 + h])
    return out
