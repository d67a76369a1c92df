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


def _largest_neighbours(nxt: np.ndarray, cand: np.ndarray, contacts: tuple[np.ndarray, np.ndarray, np.ndarray],
                        size: np.ndarray, open_: np.ndarray) -> None:
    """Set ``nxt`` (in place) for the closed small regions ``cand`` whose largest neighbour is known for good:
    -1 with no neighbour; the best one when every neighbour is closed; the single open one when it is already
    ahead of every closed one (it can only grow). Others stay -2 (unknown)."""
    regions = len(nxt)
    cs, cn, ck = contacts
    has = np.zeros(regions, dtype=bool)
    has[cs] = True
    nxt[cand & ~has] = -1
    sel = cand[cs]
    s, nb, key = cs[sel], cn[sel], ck[sel]
    if not len(s):
        return
    nb_open = open_[nb]
    best = []
    for side in (~nb_open, nb_open):  # the best closed neighbour, the best open one
        region = np.full(regions, -1, dtype=np.int64)
        first = np.zeros(regions, dtype=np.int64)
        b = _best(s[side], nb[side], key[side], size)
        region[b[0]], first[b[0]] = b[1], b[2]
        best.append((region, first, np.where(region >= 0, size[np.maximum(region, 0)], -1)))
    (best_c, key_c, sc), (best_o, key_o, so) = best
    n_open = np.bincount(s[nb_open], minlength=regions)
    go = cand & has
    nxt[go & (n_open == 0)] = best_c[go & (n_open == 0)]
    one = go & (n_open == 1) & ((so > sc) | ((so == sc) & (key_o < key_c)))
    nxt[one] = best_o[one]


def _chain_ends(ptr: np.ndarray) -> np.ndarray:
    """Follow pointers (``>= 0``; negative ends stay) by pointer doubling until nothing changes or every chain
    as long as the array is followed; a pointer still at a non-fixed point then sits in a cycle."""
    for _ in range(len(ptr).bit_length() + 1):
        nn = np.where(ptr >= 0, ptr[np.maximum(ptr, 0)], ptr)
        if np.array_equal(nn, ptr):
            break
        ptr = nn
    return ptr


HOLD_STRIPS = 4  # strips whose output tables wait in memory for their last undecided pieces, then go out


class StripSieve:
    """GDAL's sieve over strips of rows fed in order: :meth:`scan` each strip (or :meth:`add` the
    :func:`scan_strip` of each, made anywhere), :meth:`decide`, then :meth:`apply` each strip again (the
    same strips, same values) to get its sieved values.

    Strips are ``(rows, width)`` arrays of integer values; the scan also takes their boolean validity.

    Memory is bounded by the width, not the area: regions are decided as the scan goes and forgotten once
    decided. After each strip only these are kept:

    * the *open* regions (a piece in the strip's last row: they may grow), at most one per pixel of a row;
    * small regions already closed whose fate still depends on an open one (a neighbour still growing that
      could become the largest, or a chain of largest neighbours that reaches an open small region), with
      their first contacts, and the closed regions those contacts name (size and value);
    * the output tables of the last :data:`HOLD_STRIPS` strips (piece label -> output value), which go to
      ``spill`` (or a list, in memory) once their pieces are decided; pieces still undecided after that
      wait as ``(strip, label, region)`` rows, then as patches of their strip's table.

    A closed small region is decided when its largest neighbour is known for good: every neighbour closed
    (sizes final), or a single open neighbour already ahead of every closed one (it can only grow). It
    then takes the value at the end of its chain of largest neighbours, or keeps its own (no neighbour, a
    cycle of small regions), exactly as :meth:`decide` on the whole map would: see :mod:`geoseg.gis.sieve`.
    ``peak_regions`` is the most regions kept at once (open and waiting).
    """

    def __init__(self, width: int, threshold: int, connectivity: int = 4,
                 spill: str | os.PathLike[str] | None = None):
        self.width = int(width)
        self.threshold = int(threshold)
        self.connectivity = check_connectivity(connectivity)
        self.strips: list[tuple[int, int, int]] = []  # (row0, rows, pieces) of each scanned strip
        self.stats = SieveStats()
        self.peak_regions = 0
        self._spill = None if spill is None else Path(os.fspath(spill))
        # per strip: the pixels of its small pieces (flat index, label), and its output table (value by label,
        # index 0 unused) once written; None while it waits
        self._changeable: list[np.ndarray | Path] = []
        self._tables: list[np.ndarray | Path | None] = []
        # the regions kept, numbered 0..m-1 anew after each strip
        z64 = np.zeros(0, dtype=np.int64)
        self._val, self._size, self._out, self._next = z64, z64, z64, z64
        self._open = np.zeros(0, dtype=bool)
        self._done = np.zeros(0, dtype=bool)  # output known (``_out``)
        self._reached = np.zeros(0, dtype=bool)  # done, and its chain ended in a region of threshold size
        # first contacts (region, neighbour, scan position) of small regions whose largest neighbour is unknown
        self._contacts: tuple[np.ndarray, np.ndarray, np.ndarray] = (z64, z64, z64)
        # the last row scanned: piece labels, values and each label's region (-1: none kept)
        self._prev: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._held: dict[int, np.ndarray] = {}  # strip -> output table, waiting for undecided pieces
        self._pending: tuple[np.ndarray, np.ndarray, np.ndarray] = (z64, z64, z64)  # (strip, label, region)
        self._late: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}  # strip -> (labels, values) patches
        self._decided = False
        self._applied = 0

    # -- pass 1
    def scan(self, row0: int, values: np.ndarray, valid: np.ndarray) -> None:
        """Label one strip (the next one down) and record its pieces, seam joins and contacts."""
        spill = None if self._spill is None else self._spill / f"strip{len(self.strips)}.npy"
        self.add(row0, scan_strip(row0, values, valid, self.threshold, self.connectivity, spill))

    def add(self, row0: int, facts: StripScan) -> None:
        """Record the :func:`scan_strip` of the next strip down (made here or in a worker process)."""
        if self._decided:
            raise RuntimeError("scan after decide")
        rows, w = facts.rows, len(facts.first[0])
        expected = self.strips[-1][0] + self.strips[-1][1] if self.strips else 0
        if w != self.width or row0 != expected:
            raise ValueError(f"strip at row {row0} of width {w}: expected row {expected}, width {self.width}")
        self.strips.append((row0, rows, facts.n))
        self._changeable.append(facts.changeable)
        self._tables.append(None)
        if self.threshold > 1:
            self._step(len(self.strips) - 1, row0, facts)

    def decide(self) -> SieveStats:
        """Close the regions still open after the last :meth:`scan` and decide the rest."""
        if not self._decided and self.threshold > 1:
            self._step(len(self.strips), 0, None)
            assert not len(self._val) and not len(self._pending[0]) and not self._held
        self._decided = True
        return self.stats

    def _step(self, k: int, row0: int, facts: StripScan | None) -> None:
        """Join strip ``k`` (``None``: the end of the map) to the regions kept, decide what can be decided, keep
        the rest."""
        t = self.threshold
        m = len(self._val)
        n = 0 if facts is None else facts.n
        nodes = m + n
        regions, comp = self._join(facts, m, nodes)
        pv = np.zeros(0, np.int64) if facts is None else facts.values.astype(np.int64)
        ps = np.zeros(0, np.int64) if facts is None else facts.sizes.astype(np.int64)
        size = np.zeros(regions, dtype=np.int64)
        np.add.at(size, comp, np.concatenate([self._size, ps]))
        val = np.zeros(regions, dtype=np.int64)
        val[comp] = np.concatenate([self._val, pv])
        open_ = np.zeros(regions, dtype=bool)
        if facts is not None:
            last = facts.last[0]
            open_[comp[m + last[last > 0].astype(np.int64) - 1]] = True
        live = np.zeros(regions, dtype=bool)  # new or open before: each closes exactly once
        live[comp[m:]] = True
        live[comp[:m][self._open]] = True
        closing = live & ~open_
        small = size < t
        self.stats.regions += int(closing.sum())
        self.stats.small += int((closing & small).sum())
        # what the kept regions knew (the closed ones are alone in their component)
        done = np.zeros(regions, dtype=bool)
        reached = np.zeros(regions, dtype=bool)
        out = val.copy()
        nxt = np.full(regions, -2, dtype=np.int64)  # largest neighbour: >= 0, -1 none, -2 unknown
        kept_closed = np.flatnonzero(~self._open)
        if len(kept_closed):
            cc = comp[kept_closed]
            done[cc] = self._done[kept_closed]
            reached[cc] = self._reached[kept_closed]
            out[cc] = self._out[kept_closed]
            old = self._next[kept_closed]
            nxt[cc] = np.where(old >= 0, comp[np.maximum(old, 0)], old)
        big = ~small
        done |= big
        reached |= big
        out[big] = val[big]
        # first contacts, in regions: those kept, this strip's own, and across the seam
        cs, cn, ck = self._contacts
        parts = [(comp[cs], comp[cn], ck)]
        if facts is not None:
            ls, ln, lk = facts.contacts
            if len(ls):
                parts.append((comp[m + ls.astype(np.int64) - 1], comp[m + ln.astype(np.int64) - 1], lk))
            if self._prev is not None:
                parts.append(self._seam_contacts(row0, facts, comp, m))
        cs = np.concatenate([q[0] for q in parts])
        cn = np.concatenate([q[1] for q in parts])
        ck = np.concatenate([q[2] for q in parts])
        want = small[cs] & (nxt[cs] == -2) & ~done[cs]
        cs, cn, ck = _first_contacts(cs[want], cn[want], ck[want], max(regions, 1))
        # closed small regions: the largest neighbour, once no open one can still overtake
        cand = ~open_ & small & (nxt == -2) & ~done
        if cand.any():
            _largest_neighbours(nxt, cand, (cs, cn, ck), size, open_)
        # chains of largest neighbours: decided ends are fixed points
        ptr = _chain_ends(np.where(done, np.where(reached, np.arange(regions), -1),
                                   np.where(~open_ & small, nxt, -2)))
        new = ~done & ~open_ & small & (ptr != -2)
        ends = np.maximum(ptr, 0)
        good = new & (ptr >= 0) & done[ends] & reached[ends]
        out[good] = out[ends[good]]
        reached[good] = True
        done[new] = True
        self.stats.merged += int(good.sum())
        # output tables: this strip's, and the pieces waiting in earlier ones
        if facts is not None:
            table = np.zeros(n + 1, dtype=facts.values.dtype)
            reg = comp[m:]
            table[1:] = out[reg].astype(facts.values.dtype)
            waiting = (ps < t) & ~done[reg]
            labels = np.flatnonzero(waiting).astype(np.int64) + 1
            self._held[k] = table
            ps_, pl_, pr_ = self._pending
            self._pending = (np.concatenate([ps_, np.full(len(labels), k, dtype=np.int64)]),
                             np.concatenate([pl_, labels]), np.concatenate([comp[pr_], reg[labels - 1]]))
        else:
            ps_, pl_, pr_ = self._pending
            self._pending = (ps_, pl_, comp[pr_])
        self._settle(done, out, k)
        # keep the open regions, the undecided ones and the regions their contacts name
        keep = open_ | ~done
        still = ~done[cs]
        cs, cn, ck = cs[still], cn[still], ck[still]
        keep[cn] = True
        idx = np.cumsum(keep) - 1
        self._val, self._size, self._out = val[keep], size[keep], out[keep]
        self._open, self._done, self._reached = open_[keep], done[keep], reached[keep]
        nk = nxt[keep]
        self._next = np.where(nk >= 0, idx[np.maximum(nk, 0)], nk)
        self._contacts = (idx[cs], idx[cn], ck)
        ps_, pl_, pr_ = self._pending
        self._pending = (ps_, pl_, idx[pr_])
        self.peak_regions = max(self.peak_regions, int(keep.sum()))
        if facts is not None:
            reg = comp[m:]
            p_reg = np.full(n + 1, -1, dtype=np.int64)
            p_reg[1:] = np.where(keep[reg], idx[reg], -1)
            self._prev = (facts.last[0], facts.last[1], p_reg)

    def _join(self, facts: StripScan | None, m: int, nodes: int) -> tuple[int, np.ndarray]:
        """Regions of the ``m`` kept ones and this strip's pieces (nodes ``m..``), joined across the seam:
        ``(count, region of each node)``."""
        ju: list[np.ndarray] = []
        jv: list[np.ndarray] = []
        if facts is not None and self._prev is not None:
            p_lab, p_val, p_reg = self._prev
            lab0, val0 = facts.first
            for su, sd in self._pairs():
                u, d = p_lab[su], lab0[sd]
                hit = (u > 0) & (d > 0) & (p_val[su] == val0[sd])
                ju.append(p_reg[u[hit]])
                jv.append(m + d[hit].astype(np.int64) - 1)
        if not sum(len(j) for j in ju):
            return nodes, np.arange(nodes, dtype=np.int64)
        u_, v_ = np.concatenate(ju), np.concatenate(jv)
        graph = coo_matrix((np.ones(len(u_), dtype=np.int8), (u_, v_)), shape=(nodes, nodes)).tocsr()
        regions, comp = connected_components(graph, directed=False)
        return int(regions), comp.astype(np.int64)

    def _pairs(self) -> list[tuple[slice, slice]]:
        """Column slices of (row above, row below) that touch: straight down, and both diagonals with 8."""
        pairs = [(slice(None), slice(None))]
        if self.connectivity == 8 and self.width > 1:
            pairs += [(slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))]
        return pairs

    def _seam_contacts(self, row0: int, facts: StripScan, comp: np.ndarray, m: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """First contacts between the last row scanned (its regions) and this strip's first row (its pieces),
        from the side of a small piece or region, in GDAL's scan positions."""
        assert self._prev is not None
        p_lab, p_val, p_reg = self._prev
        lab0, val0 = facts.first
        small = _small_lut(facts.sizes, self.threshold)
        p_small = np.zeros(len(p_reg), dtype=bool)
        ok = p_reg >= 0
        p_small[ok] = self._size[p_reg[ok]] < self.threshold
        a, b, va, vb = lab0[None], p_lab[None], val0[None], p_val[None]
        moves = [(a, b, va, vb, 0, 0)]
        if self.connectivity == 8 and self.width > 1:
            moves += [(a[:, 1:], b[:, :-1], va[:, 1:], vb[:, :-1], 1, 1),
                      (a[:, :-1], b[:, 1:], va[:, :-1], vb[:, 1:], 2, 0)]
        got = [_contacts(*mv[:4], small, p_small, mv[4], mv[5], row0, self.width) for mv in moves]
        ia = np.concatenate([q[0] for q in got]).astype(np.int64)
        ib = np.concatenate([q[1] for q in got]).astype(np.int64)
        key = np.concatenate([q[2] for q in got])
        ga, gb = comp[m + ia - 1], comp[p_reg[ib]]
        sa, sb = small[ia], p_small[ib]
        return (np.concatenate([ga[sa], gb[sb]]), np.concatenate([gb[sa], ga[sb]]),
                np.concatenate([key[sa], key[sb]]))

    def _settle(self, done: np.ndarray, out: np.ndarray, k: int) -> None:
        """Fill the waiting pieces that are decided now; write out the tables with nothing waiting, and those
        held for :data:`HOLD_STRIPS` strips (their last waiting pieces become patches when decided)."""
        ps_, pl_, pr_ = self._pending
        ready = done[pr_]
        if ready.any():
            rs, rl, rv = ps_[ready], pl_[ready], out[pr_[ready]]
            for strip in np.unique(rs).tolist():
                sel = rs == strip
                table = self._held.get(strip)
                if table is not None:
                    table[rl[sel]] = rv[sel].astype(table.dtype)
                else:
                    self._late.setdefault(strip, []).append((rl[sel], rv[sel]))
            self._pending = (ps_[~ready], pl_[~ready], pr_[~ready])
        waiting = set(np.unique(self._pending[0]).tolist())
        for strip in sorted(self._held):
            if strip not in waiting or k - strip >= HOLD_STRIPS:
                table = self._held.pop(strip)
                if self._spill is None:
                    self._tables[strip] = table
                else:
                    path = self._spill / f"table{strip}.npy"
                    np.save(path, table)
                    self._tables[strip] = path

    # -- pass 2
    def apply(self, row0: int, values: np.ndarray) -> np.ndarray:
        """The sieved values of a strip, fed again in the order of :meth:`scan` (same strips, same values)."""
        if not self._decided:
            raise RuntimeError("apply before decide")
        i = self._applied
        if i >= len(self.strips) or self.strips[i][:2] != (row0, values.shape[0]):
            raise ValueError(f"strip at row {row0} ({values.shape[0]} rows) was not scanned in this order")
        out = values.copy()
        if self.threshold > 1:
            item = self._changeable[i]
            pixels = np.load(item) if isinstance(item, Path) else item
            self._changeable[i] = _NOTHING  # not a view: that would keep the pixels
            table_item = self._tables[i]
            assert table_item is not None
            table = np.load(table_item) if isinstance(table_item, Path) else table_item
            self._tables[i] = None
            for labels, vals in self._late.pop(i, []):
                table[labels] = vals.astype(table.dtype)
            if len(pixels[0]):
                out.ravel()[pixels[0]] = table[pixels[1]]
            for path in (item, table_item):
                if isinstance(path, Path):
                    path.unlink()
        self._applied += 1
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
