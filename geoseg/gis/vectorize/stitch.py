"""Merge the pieces of one region, cut by block seams, into its polygon: an exact rectilinear ring stitch.

Rings are read into one array of integer pixel corners; each stage below is one step of :func:`stitch`'s
description: orient, cut at the seams, chains, seam unit edges that cancel, relinking, new rings, polygons.
Array names: ``xy`` vertices, ``cidx`` the ring of each vertex, ``rs`` ring offsets into ``xy`` (rings are
closed: a ring's last vertex repeats its first, and no edge starts there).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import shapely
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components


def stitch(groups: Sequence[Sequence[Any]], connectivity: int, block: int, width: int, height: int
           ) -> np.ndarray:
    """Merge each group of pieces (same class, touching across block seams) into one polygon, exactly.

    Pixel-aligned rings in integer coordinates, oriented with the group's pixels on the left. Rings without
    an edge on an internal seam are kept as they are. The others are cut into *chains* (runs of edges off
    the seams, kept whole, also broken where the group's rings meet at a corner) and seam edges; seam edges
    are split into unit edges and each unit edge present in both directions (shared by two pieces) is
    cancelled; chains and the remaining unit edges are relinked end to start into rings (numpy: sort,
    searchsorted, connected components, list ranking). Where two pixels of the group touch only at a
    corner (a "pinch"), a ring turns around the pixel outside the group, which keeps the rings of
    4-connected regions simple (each bounds one face of the complement); when that makes a ring visit the
    corner twice (only possible with 8-connectivity) it turns around the group's pixels instead. Collinear
    vertices are dropped, so with 4-connectivity a stitched ring has exactly the vertices of GDAL's
    whole-raster ring. Rings of positive signed area are shells, the others holes, each given to the
    smallest shell of its group that contains it; 8-connected results are checked and made valid like the
    pieces. No GEOS overlay is involved.
    """
    out = np.empty(len(groups), dtype=object)
    if not groups:
        return out
    kx, ky = width + 1, height + 1
    per_chunk = max(1, (2**62) // (kx * ky))  # vertex keys (group, x, y) must fit an int64
    for lo in range(0, len(groups), per_chunk):
        out[lo:lo + per_chunk] = _stitch_chunk(groups[lo:lo + per_chunk], connectivity, block, width, height)
    return out


def _ring_order(succ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rings of a successor permutation: ``(order, starts)``; ``order`` lists edges ring by ring, in ring
    order, each ring from its smallest edge index; ``starts`` are the rings' offsets into it (plus the end)."""
    n = len(succ)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64)
    _, label = connected_components(
        csr_matrix((np.ones(n, dtype=np.int8), (np.arange(n), succ)), shape=(n, n)), directed=True,
        connection="weak")
    by_label = np.argsort(label, kind="stable")  # rings, each with its smallest edge first
    first = np.flatnonzero(np.r_[True, label[by_label[1:]] != label[by_label[:-1]]])
    head = np.empty(first.size, dtype=np.int64)
    head[label[by_label[first]]] = by_label[first]
    # list ranking by pointer doubling: distance of each edge to the last edge of its ring
    idx = np.arange(n)
    tail = succ == head[label]
    nxt = np.where(tail, idx, succ)
    dist = (~tail).astype(np.int64)
    while True:
        nn = nxt[nxt]
        if np.array_equal(nn, nxt):
            break
        dist += dist[nxt]
        nxt = nn
    size = np.bincount(label)
    order = np.lexsort((size[label] - 1 - dist, label))
    starts = np.zeros(size.size + 1, dtype=np.int64)
    np.cumsum(size, out=starts[1:])
    return order, starts


class _Items(NamedTuple):
    """What is relinked: the chains, then the surviving unit seam edges; vertex keys are (group, x, y)."""

    group: np.ndarray
    start_key: np.ndarray
    end_key: np.ndarray
    din: np.ndarray  # direction of the first edge
    dout: np.ndarray  # direction of the last edge
    src_lo: np.ndarray  # first vertex in xy
    src_len: np.ndarray  # number of edges (and of vertices taken from xy)


class _NewRings(NamedTuple):
    """The relinked rings: ring ``j``'s vertices are ``xy[src[start[j]:start[j + 1]]]`` (not closed)."""

    src: np.ndarray
    length: np.ndarray
    start: np.ndarray
    area2: np.ndarray  # twice the signed area
    group: np.ndarray


def _stitch_chunk(groups: Sequence[Sequence[Any]], connectivity: int, block: int, width: int, height: int
                  ) -> np.ndarray:
    kx, ky = width + 1, height + 1
    xy, cidx, rs, exterior, ring_group = _vertices(groups)
    xy, area2 = _orient(xy, cidx, rs, exterior)
    xy, on_seam, cut = _cut_at_seams(xy, cidx, rs, block, width, height)
    cs, ce = _chains(xy, cidx, rs, ring_group, on_seam, cut, kx, ky)
    xy, items = _items(xy, cidx, ring_group, on_seam, cs, ce, kx, ky)
    del on_seam, cs, ce
    order, starts = _relink(items)
    new = _new_rings(xy, items, order, starts)
    del items, order, starts
    return _polygons(xy, rs, cut, area2, ring_group, new, len(groups), connectivity)


def _vertices(groups: Sequence[Sequence[Any]]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The groups' rings as integer pixel corners: ``(xy, cidx, rs, exterior, ring_group)`` (per ring)."""
    ngroups = len(groups)
    geoms = np.fromiter(itertools.chain.from_iterable(groups), dtype=object, count=sum(map(len, groups)))
    gid = np.repeat(np.arange(ngroups), [len(g) for g in groups])
    parts, pidx = shapely.get_parts(geoms, return_index=True)
    rings, ridx = shapely.get_rings(parts, return_index=True)
    nr = len(rings)
    exterior = np.r_[True, ridx[1:] != ridx[:-1]]
    ring_group = gid[pidx[ridx]]
    del geoms, gid, parts, pidx, ridx
    xyf, cidx = shapely.get_coordinates(rings, return_index=True)
    del rings
    xy = np.rint(xyf).astype(np.int32)  # pixel corners; products below are taken in int64
    del xyf
    rs = np.zeros(nr + 1, dtype=np.int64)
    np.cumsum(np.bincount(cidx, minlength=nr), out=rs[1:])
    return xy, cidx, rs, exterior, ring_group


def _orient(xy: np.ndarray, cidx: np.ndarray, rs: np.ndarray, exterior: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Shells positive (counter-clockwise in x/y), holes negative: the group's pixels on the left.

    Returns ``(xy, area2)``: the reoriented vertices and twice each ring's signed area.
    """
    n, nr = len(xy), len(rs) - 1
    last = rs[1:] - 1
    cross = np.zeros(n, dtype=np.int64)
    x64, y64 = xy[:, 0].astype(np.int64), xy[:, 1].astype(np.int64)
    cross[:-1] = x64[:-1] * y64[1:] - x64[1:] * y64[:-1]
    del x64, y64
    cross[last] = 0
    area2 = np.bincount(cidx, weights=cross, minlength=nr)
    del cross
    flip = (area2 > 0) != exterior
    area2[flip] *= -1
    if flip.any():  # GDAL's rings all turn the other way: whole-array gathers beat masked ones
        ar = np.arange(n)
        end = rs[:-1] + rs[1:] - 1  # a ring's first plus last vertex: j -> end - j reverses it
        xy = xy[np.where(flip[cidx], end[cidx] - ar, ar)]
    return xy, area2


def _seam_edges(xy: np.ndarray, last: np.ndarray, block: int, width: int, height: int) -> np.ndarray:
    """Per vertex: whether the edge starting there lies on an internal block seam."""
    ax, ay, bx, by = xy[:-1, 0], xy[:-1, 1], xy[1:, 0], xy[1:, 1]  # columns: ~4x faster than rows here
    horiz = ay == by
    on = np.where(horiz, (ay % block == 0) & (ay > 0) & (ay < height) & (ax != bx),
                  (ax % block == 0) & (ax > 0) & (ax < width))  # not horizontal: vertical, and a != b
    out = np.zeros(len(xy), dtype=bool)
    out[:-1] = on
    out[last] = False
    return out


def _cut_at_seams(xy: np.ndarray, cidx: np.ndarray, rs: np.ndarray, block: int, width: int, height: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Find the rings with an edge on a seam (*cut*) and rotate each to start with a seam edge.

    Only cut rings change; other rings, and a cut ring's runs of edges off the seams ("chains"), are kept as
    they are. Starting with a seam edge, no chain wraps. Returns ``(xy, on_seam, cut)``.
    """
    n, nr = len(xy), len(rs) - 1
    last = rs[1:] - 1
    on_seam = _seam_edges(xy, last, block, width, height)
    cut = np.bincount(cidx[on_seam], minlength=nr) > 0
    first_seam = np.full(nr, -1, dtype=np.int64)
    sidx = np.flatnonzero(on_seam)
    first_seam[cidx[sidx[::-1]]] = sidx[::-1]
    rot = cut & (first_seam != rs[:-1])
    if rot.any():
        perm = np.arange(n)
        sel = rot[cidx]
        sel[last] = False  # the closing coordinate is set from the ring's new first one below
        r_ = cidx[sel]
        length = rs[r_ + 1] - 1 - rs[r_]
        perm[sel] = rs[r_] + (perm[sel] - rs[r_] + first_seam[r_] - rs[r_]) % length
        rl = np.flatnonzero(rot)
        perm[last[rl]] = perm[rs[rl]]
        xy = xy[perm]
        on_seam = on_seam[perm]  # an edge keeps its ends (a ring's last vertex repeats its first)
        on_seam[last] = False
    return xy, on_seam, cut


def _chains(xy: np.ndarray, cidx: np.ndarray, rs: np.ndarray, ring_group: np.ndarray, on_seam: np.ndarray,
            cut: np.ndarray, kx: int, ky: int) -> tuple[np.ndarray, np.ndarray]:
    """The chains of the cut rings: ``(cs, ce)``, chain vertices ``cs..ce-1``, ending at vertex ``ce``.

    A chain also breaks where its group's rings meet at a corner off the seams (two pieces of a region in
    one block touching diagonally, or the parts of an 8-connected piece): relinking decides there too.
    """
    n = len(xy)
    last = rs[1:] - 1
    in_cut = cut[cidx]
    in_cut[last] = False
    chain_e = in_cut & ~on_seam  # edges of cut rings off the seams
    ci = np.flatnonzero(in_cut)
    vkey = (ring_group[cidx[ci]] * kx + xy[ci, 0]) * ky + xy[ci, 1]
    o = np.argsort(vkey)  # only equal keys matter, not their order
    sk = vkey[o]
    same = sk[1:] == sk[:-1]
    meet = np.zeros(n, dtype=bool)
    meet[ci[o[1:][same]]] = True
    meet[ci[o[:-1][same]]] = True
    meet[last] = meet[rs[:-1]]
    del in_cut, ci, vkey, o, sk, same
    cs = np.flatnonzero(chain_e & (np.r_[True, ~chain_e[:-1]] | meet))
    ce = np.flatnonzero(chain_e & (np.r_[~chain_e[1:], True] | np.r_[meet[1:], True])) + 1
    return cs, ce


def _seam_units(xy: np.ndarray, cidx: np.ndarray, ring_group: np.ndarray, on_seam: np.ndarray, kx: int,
                ky: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seam edges split into unit edges, less those present in both directions (shared: both cancelled).

    Returns the survivors' ``(start, step, group, start_key, end_key)``.
    """
    se = np.flatnonzero(on_seam)
    sa, sb, sg = xy[se], xy[se + 1], ring_group[cidx[se]]
    step = np.sign(sb - sa)
    slen = np.abs(sb - sa).sum(axis=1)
    rep = np.repeat(np.arange(len(se)), slen)
    k = np.arange(len(rep)) - np.repeat(np.cumsum(slen) - slen, slen)
    ua = sa[rep] + step[rep] * k[:, None]
    ustep = step[rep]
    ug = sg[rep]
    del se, sa, sb, sg, step, slen, rep, k
    ka = (ug * kx + ua[:, 0]) * ky + ua[:, 1]
    kb = (ug * kx + ua[:, 0] + ustep[:, 0]) * ky + ua[:, 1] + ustep[:, 1]
    lo, hi = np.minimum(ka, kb), np.maximum(ka, kb)
    o = np.lexsort((hi, lo))
    dup = (lo[o][1:] == lo[o][:-1]) & (hi[o][1:] == hi[o][:-1])
    live = np.ones(len(o), dtype=bool)
    live[o[1:][dup]] = False
    live[o[:-1][dup]] = False
    return ua[live], ustep[live], ug[live], ka[live], kb[live]


def _items(xy: np.ndarray, cidx: np.ndarray, ring_group: np.ndarray, on_seam: np.ndarray, cs: np.ndarray,
           ce: np.ndarray, kx: int, ky: int) -> tuple[np.ndarray, _Items]:
    """The items to link: the chains, then the surviving unit edges, whose start vertices are appended to
    ``xy``. Returns ``(xy, items)``."""
    n = len(xy)
    ua, ustep, ug, ka, kb = _seam_units(xy, cidx, ring_group, on_seam, kx, ky)
    nlive = len(ua)
    cg = ring_group[cidx[cs]]
    items = _Items(
        group=np.concatenate([cg, ug]),
        start_key=np.concatenate([(cg * kx + xy[cs, 0]) * ky + xy[cs, 1], ka]),
        end_key=np.concatenate([(cg * kx + xy[ce, 0]) * ky + xy[ce, 1], kb]),
        din=np.concatenate([np.sign(xy[cs + 1] - xy[cs]), ustep]),
        dout=np.concatenate([np.sign(xy[ce] - xy[ce - 1]), ustep]),
        src_lo=np.concatenate([cs, n + np.arange(nlive)]),
        src_len=np.concatenate([ce - cs, np.ones(nlive, dtype=np.int64)]),
    )
    return np.concatenate([xy, ua.astype(np.int32)]), items


def _relink(items: _Items) -> tuple[np.ndarray, np.ndarray]:
    """Link each item to the one starting where it ends, into rings: ``(order, starts)``, as
    :func:`_ring_order` gives them.

    At a pinch take the right turn (around the pixel outside the group); a ring that then passes a pinch
    twice turns around the group's pixels there.
    """
    item_ks, item_ke, din, dout = items.start_key, items.end_key, items.din, items.dout
    m = len(item_ks)
    by_start = np.argsort(item_ks, kind="stable")
    sks = item_ks[by_start]
    pos = np.searchsorted(sks, item_ke, side="left")
    count = np.searchsorted(sks, item_ke, side="right") - pos
    if not ((count == 1) | (count == 2)).all():
        raise AssertionError("seam stitch: open ring")  # cannot happen for pieces of a pixel partition
    succ = by_start[np.minimum(pos, max(m - 1, 0))]
    pinch = np.flatnonzero(count == 2)
    if len(pinch):
        c0, c1 = by_start[pos[pinch]], by_start[pos[pinch] + 1]
        use0 = (din[c0, 0] == dout[pinch, 1]) & (din[c0, 1] == -dout[pinch, 0])
        succ[pinch] = np.where(use0, c0, c1)
    del by_start, sks, pos, count
    order, starts = _ring_order(succ)
    if len(pinch):
        label = np.empty(m, dtype=np.int64)
        label[order] = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
        p = pinch[np.argsort(item_ke[pinch], kind="stable")]
        i1, i2 = p[0::2], p[1::2]
        swap = label[i1] == label[i2]
        if swap.any():
            i1, i2 = i1[swap], i2[swap]
            succ[i1], succ[i2] = succ[i2], succ[i1].copy()
            order, starts = _ring_order(succ)
    return order, starts


def _new_rings(xy: np.ndarray, items: _Items, order: np.ndarray, starts: np.ndarray) -> _NewRings:
    """The new rings: the items' coordinate ranges in ring order, collinear vertices dropped."""
    src_lo, src_len = items.src_lo, items.src_len
    nnew = len(starts) - 1
    lens = src_len[order]
    tot = int(lens.sum())
    src = np.repeat(src_lo[order], lens) + (np.arange(tot) - np.repeat(np.cumsum(lens) - lens, lens))
    vring = np.repeat(np.repeat(np.arange(nnew), np.diff(starts)), lens)
    vstart = np.zeros(nnew + 1, dtype=np.int64)
    np.cumsum(np.bincount(vring, minlength=nnew), out=vstart[1:])
    nxt = np.arange(1, tot + 1)
    nxt[vstart[1:] - 1] = vstart[:-1]
    dv = np.sign(xy[src[nxt]] - xy[src])
    prv = np.arange(-1, tot - 1)
    prv[vstart[:-1]] = vstart[1:] - 1
    keep = (dv[:, 0] != dv[prv, 0]) | (dv[:, 1] != dv[prv, 1])
    src, vring = src[keep], vring[keep]
    del dv, nxt, prv, keep, lens
    new_len = np.bincount(vring, minlength=nnew)
    new_start = np.zeros(nnew + 1, dtype=np.int64)
    np.cumsum(new_len, out=new_start[1:])
    nx2 = np.arange(1, len(src) + 1)
    nx2[new_start[1:] - 1] = new_start[:-1]
    p0, p1 = xy[src].astype(np.int64), xy[src[nx2]].astype(np.int64)
    new_area2 = np.bincount(vring, weights=p0[:, 0] * p1[:, 1] - p1[:, 0] * p0[:, 1], minlength=nnew)
    del p0, p1, nx2, vring
    new_group = items.group[order[starts[:-1]]]
    return _NewRings(src, new_len, new_start, new_area2, new_group)


def _polygons(xy: np.ndarray, rs: np.ndarray, cut: np.ndarray, area2: np.ndarray, ring_group: np.ndarray,
              new: _NewRings, ngroups: int, connectivity: int) -> np.ndarray:
    """One (multi)polygon per group from its rings: the untouched ones and the new ones."""
    src, new_len, new_start = new.src, new.length, new.start
    nnew = len(new_len)
    # all rings: the untouched ones (closed coordinate ranges of xy), then the new ones (closed here)
    keep_r = np.flatnonzero(~cut)
    ring_len = np.concatenate([rs[keep_r + 1] - rs[keep_r], new_len + 1])  # closed
    ring_src = np.concatenate([rs[keep_r], np.zeros(nnew, dtype=np.int64)])
    rarea = np.concatenate([area2[keep_r], new.area2])
    rgroup = np.concatenate([ring_group[keep_r], new.group])
    nring = len(ring_len)
    is_new = np.r_[np.zeros(len(keep_r), dtype=bool), np.ones(nnew, dtype=bool)]
    shell = rarea > 0

    def ring_coords(r: int) -> np.ndarray:
        if is_new[r]:
            j = r - len(keep_r)
            return xy[src[new_start[j]:new_start[j + 1]]]
        return xy[ring_src[r]:ring_src[r] + ring_len[r] - 1]

    owner, nshell = _hole_owners(shell, rgroup, ngroups, ring_coords)

    # polygons: each shell followed by its holes; a group with several shells becomes a multipolygon
    seq = np.lexsort((~shell, owner))
    lens = ring_len[seq]
    tot = int(lens.sum())
    within = np.arange(tot) - np.repeat(np.cumsum(lens) - lens, lens)
    rep = np.repeat(seq, lens)
    gather = np.empty(tot, dtype=np.int64)
    old = ~is_new[rep]
    gather[old] = ring_src[rep[old]] + within[old]
    nw = ~old
    j = rep[nw] - len(keep_r)
    w = within[nw]
    closing = w == new_len[j]
    gather[nw] = src[new_start[j] + np.where(closing, 0, w)]
    coords = xy[gather].astype(np.float64)
    del gather, rep, within, old, nw, j, w, closing
    ring_off = np.zeros(nring + 1, dtype=np.int64)
    np.cumsum(lens, out=ring_off[1:])
    seq_shell = shell[seq]
    poly_off = np.r_[np.flatnonzero(seq_shell), nring].astype(np.int64)
    polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, (ring_off, poly_off))
    poly_group = rgroup[seq[seq_shell]]
    out = np.empty(ngroups, dtype=object)
    one = nshell[poly_group] == 1
    out[poly_group[one]] = polys[one]
    if not one.all():
        many = np.flatnonzero(~one)
        many = many[np.argsort(poly_group[many], kind="stable")]
        mg, inv = np.unique(poly_group[many], return_inverse=True)
        out[mg] = shapely.multipolygons(polys[many], indices=inv)
    if connectivity == 8:
        bad = ~shapely.is_valid(out)
        if bad.any():
            out[bad] = shapely.make_valid(out[bad], method="structure", keep_collapsed=False)
    return out


def _hole_owners(shell: np.ndarray, rgroup: np.ndarray, ngroups: int,
                 ring_coords: Callable[[int], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Holes to shells: a group with one shell takes all its holes; otherwise the smallest containing shell.

    Returns ``(owner, nshell)``: the shell of each ring (a shell owns itself) and the shells per group.
    """
    nring = len(shell)
    nshell = np.bincount(rgroup[shell], minlength=ngroups)
    owner = np.full(nring, -1, dtype=np.int64)
    sh = np.flatnonzero(shell)
    owner[sh] = sh
    first_shell = np.full(ngroups, -1, dtype=np.int64)
    first_shell[rgroup[sh]] = sh
    single = ~shell & (nshell[rgroup] == 1)
    owner[single] = first_shell[rgroup[single]]
    multi = np.flatnonzero(~shell & (nshell[rgroup] > 1))
    if len(multi):
        cand: dict[int, list[tuple[float, int, Any]]] = {}
        for s in sh[nshell[rgroup[sh]] > 1].tolist():
            poly = shapely.polygons(ring_coords(s))
            cand.setdefault(int(rgroup[s]), []).append((poly.area, s, poly))
        for h in multi.tolist():
            c = ring_coords(h)
            d = np.sign(c[1] - c[0])
            # the centre of the pixel right of the hole's first edge: outside the group, inside the hole
            x, y = c[0, 0] + 0.5 * (d[0] + d[1]), c[0, 1] + 0.5 * (d[1] - d[0])
            inside = [(area, s) for area, s, poly in cand[int(rgroup[h])] if shapely.contains_xy(poly, x, y)]
            owner[h] = min(inside)[1]
    return owner, nshell
