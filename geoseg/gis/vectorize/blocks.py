"""Polygonise the raster block by block: GDAL's pieces of one block, and the window of blocks in flight.

:func:`process_block` runs in a worker process (or a thread, see :mod:`.pool`): it and its imports stay lean
(numpy, rasterio, shapely, pyproj) and its :class:`Block` is cheap to pickle.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Generator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import shapely
from affine import Affine
from rasterio.windows import Window

from geoseg.gis.vectorize.features import finalize
from geoseg.gis.vectorize.plan import Plan
from geoseg.gis.vectorize.pool import block_executor
from geoseg.io.raster import band_validity, gdal_env, open_scene


@dataclass
class Block:
    """One polygonised block: closed pieces ready to write, open pieces and the labels along its edges."""

    r: int
    c: int
    n: int  # labels 1..n
    closed: Any  # Features (or, with simplify, (geoms_px, classes, conf))
    open_labels: np.ndarray  # local labels of the open pieces
    open_geoms: np.ndarray  # their geometries in pixel coordinates
    open_classes: np.ndarray
    open_bottom: np.ndarray  # bool: touches the seam with the next row of blocks
    edges: dict[str, tuple[np.ndarray, np.ndarray]]  # side -> (local labels, classes); 0 = no piece
    open_conf: np.ndarray | None = None  # (m, 2) [confidence sum, pixels] of the open pieces (a confidence map)

    def __getstate__(self) -> dict[str, Any]:
        # From a worker process: one vectorised WKB encoding per array, about twice as fast as pickling
        # each geometry (which shapely does through WKB one by one).
        state = dict(self.__dict__)
        state["open_geoms"] = shapely.to_wkb(self.open_geoms)
        if isinstance(self.closed, tuple):
            state["closed"] = (shapely.to_wkb(self.closed[0]), *self.closed[1:])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["open_geoms"] = shapely.from_wkb(state["open_geoms"])
        if isinstance(state["closed"], tuple):
            state["closed"] = (shapely.from_wkb(state["closed"][0]), *state["closed"][1:])
        self.__dict__.update(state)


_SHAPES_DTYPES = frozenset(np.dtype(t) for t in ("uint8", "uint16", "int16", "int32"))  # GDAL polygonize


def pieces(data: np.ndarray, valid: np.ndarray, connectivity: int, col_off: int, row_off: int
           ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The connected regions of equal class in a block, polygonised by GDAL, in global pixel coordinates.

    Returns ``(geoms, classes, sides)``: piece ``i`` (1..n) is ``geoms[i]`` (valid) of class ``classes[i]``;
    ``sides`` maps ``top``/``bottom``/``left``/``right`` to the piece of each pixel along that block edge
    (0 = none), read off the pieces' own boundary edges on the block border, so no label image is needed.
    """
    rows, cols = data.shape
    codes, lut = data, None
    if data.dtype not in _SHAPES_DTYPES:  # e.g. uint32, int64: polygonise dense codes of the classes
        lut, inv = np.unique(data, return_inverse=True)
        codes = inv.reshape(data.shape).astype(np.int32)
    values: list[float] = []
    poly_rings: list[int] = []
    ring_lens: list[int] = []
    coords: list[np.ndarray] = []  # per piece: its vertices, flat; GDAL's tuples are freed piece by piece
    chain = itertools.chain.from_iterable
    # Doubled coordinates (halved exactly below): rasterio warns about an identity transform, and
    # warnings.catch_warnings is not thread-safe.
    doubled = Affine(2.0, 0.0, 2.0 * col_off, 0.0, 2.0, 2.0 * row_off)
    if valid.any():
        for geom, value in rasterio.features.shapes(codes, mask=valid, connectivity=connectivity,
                                                    transform=doubled):
            rings = geom["coordinates"]
            values.append(value)
            poly_rings.append(len(rings))
            ring_lens.extend(map(len, rings))
            coords.append(np.fromiter(chain(chain(rings)), dtype=np.float64))
    n = len(values)
    geoms = np.empty(n + 1, dtype=object)
    classes = np.zeros(n + 1, dtype=np.int64)
    if n == 0:
        return geoms, classes, _no_sides(rows, cols)
    vals = np.asarray(values, dtype=np.int64)
    classes[1:] = lut[vals] if lut is not None else vals
    # building all polygons from one coordinate array is ~4x faster than shapely.geometry.shape per feature
    xy = np.concatenate(coords).reshape(-1, 2) * 0.5
    del coords[:]
    ring_off = np.zeros(len(ring_lens) + 1, dtype=np.int64)
    np.cumsum(ring_lens, out=ring_off[1:])
    poly_off = np.zeros(len(poly_rings) + 1, dtype=np.int64)
    np.cumsum(poly_rings, out=poly_off[1:])
    polys = shapely.from_ragged_array(shapely.GeometryType.POLYGON, xy, (ring_off, poly_off))

    sides = _border_pieces(xy, ring_off, poly_rings, rows, cols, col_off, row_off)

    if connectivity == 8:
        # Diagonal joins come out as self-touching rings: make them (multi)polygons. GDAL's 4-connected
        # polygons are valid (holes touching the shell are separate rings), and checking costs a third
        # of the polygonisation, so they are taken as they are; the tests check validity.
        bad = ~shapely.is_valid(polys)
        if bad.any():
            polys[bad] = shapely.make_valid(polys[bad], method="structure", keep_collapsed=False)
    geoms[1:] = polys
    return geoms, classes, sides


def _no_sides(rows: int, cols: int) -> dict[str, np.ndarray]:
    return {"top": np.zeros(cols, np.int32), "bottom": np.zeros(cols, np.int32),
            "left": np.zeros(rows, np.int32), "right": np.zeros(rows, np.int32)}


def _border_pieces(xy: np.ndarray, ring_off: np.ndarray, poly_rings: list[int], rows: int, cols: int,
                   col_off: int, row_off: int) -> dict[str, np.ndarray]:
    """The piece (1..n) of each pixel along each side of the block, 0 for none: the piece with a boundary
    edge on the pixel's outer side. ``xy`` are the pieces' ring vertices (integers, global pixel corners)."""
    sides = _no_sides(rows, cols)
    lx, ly = xy[:, 0] - col_off, xy[:, 1] - row_off
    # Every edge along a side has both ends on the border: only those few edges are looked at (the edge
    # "from" a ring's last vertex to the next ring's first is none).
    on_border = (lx == 0) | (lx == cols) | (ly == 0) | (ly == rows)
    along = on_border[:-1] & on_border[1:]
    along[ring_off[1:-1] - 1] = False
    i = np.flatnonzero(along)  # edge i runs from vertex i to vertex i + 1
    piece = np.repeat(np.arange(1, len(poly_rings) + 1, dtype=np.int32), poly_rings)
    pc = piece[np.searchsorted(ring_off, i, side="right") - 1]
    a = np.column_stack((lx[i], ly[i])).astype(np.int64)
    b = np.column_stack((lx[i + 1], ly[i + 1])).astype(np.int64)
    horiz = a[:, 1] == b[:, 1]
    for side, axis, at in (("top", 0, (1, 0)), ("bottom", 0, (1, rows)), ("left", 1, (0, 0)),
                           ("right", 1, (0, cols))):
        sel = (horiz if axis == 0 else ~horiz) & (a[:, at[0]] == at[1])
        lo = np.minimum(a[sel, axis], b[sel, axis])
        span = np.abs(a[sel, axis] - b[sel, axis])
        k = np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span)
        sides[side][np.repeat(lo, span) + k] = np.repeat(pc[sel], span)
    return sides


def process_block(plan: Plan, r: int, c: int) -> Block:
    win = plan.window(r, c)
    with gdal_env(), open_scene(plan.path) as ds:
        data = ds.read(1, window=win)
        valid = band_validity(data[None], ds, [1], win, plan.mask_kind)[0]
    if plan.skip:
        valid &= ~np.isin(data, plan.skip)
    geoms, classes, sides = pieces(data, valid, plan.connectivity, int(win.col_off), int(win.row_off))
    conf = piece_confidence(plan, geoms, win) if plan.confidence is not None else None
    del data, valid
    n = len(classes) - 1
    edges = {k: (v, classes[v]) for k, v in sides.items()}
    open_mask = np.zeros(n + 1, dtype=bool)
    bottom = np.zeros(n + 1, dtype=bool)
    if r > 0:
        open_mask[edges["top"][0]] = True
    if r < plan.rows - 1:
        bottom[edges["bottom"][0]] = True
        open_mask |= bottom
    if c > 0:
        open_mask[edges["left"][0]] = True
    if c < plan.cols - 1:
        open_mask[edges["right"][0]] = True
    open_mask[0] = False
    open_labels = np.flatnonzero(open_mask)
    closed_labels = np.flatnonzero(~open_mask)[1:]  # [1:]: label 0 is "no piece"
    closed: Any
    closed_conf = conf[closed_labels] if conf is not None else None
    if plan.simplify_px is not None:
        closed = (geoms[closed_labels], classes[closed_labels], closed_conf)
    else:
        closed = finalize(plan, geoms[closed_labels], classes[closed_labels], closed_conf)
    return Block(r, c, n, closed, open_labels, geoms[open_labels], classes[open_labels], bottom[open_labels],
                 edges, conf[open_labels] if conf is not None else None)


def piece_confidence(plan: Plan, geoms: np.ndarray, win: Window) -> np.ndarray:
    """``(n + 1, 2)`` float64 [sum of confidence values, pixels with a confidence] of each piece (row 0: none).

    From the pieces' own rings, without burning them into an image: with ``S`` the 2-D prefix sum of the
    block's confidence (nodata counted as 0), the sum over the pixels a ring encloses is the sum, over its
    edges ``(x, y0) -> (x, y1)`` (they lie on pixel edges), of ``S[y1, x] - S[y0, x]`` (horizontal edges add
    nothing), signed by the ring's orientation: a discrete Green's theorem, one look-up per vertex. A piece
    is its outer rings less its holes; the pixel count is the same with ones for values. Integers
    throughout, and sums and counts rather than means, so that pieces joined across seams add up exactly.
    """
    n = len(geoms) - 1
    out = np.zeros((n + 1, 2), dtype=np.float64)
    if n == 0:
        return out
    assert plan.confidence is not None
    with gdal_env(), open_scene(plan.confidence) as ds:
        conf = ds.read(1, window=win)
    rows, cols = conf.shape
    has = conf != 255
    dtype = np.int32 if rows * cols < 2**31 // 255 else np.int64
    prefix = np.zeros((2, rows + 1, cols + 1), dtype=dtype)
    np.cumsum(np.where(has, conf, 0), axis=1, dtype=dtype, out=prefix[0, 1:, 1:])
    np.cumsum(has, axis=1, dtype=dtype, out=prefix[1, 1:, 1:])
    for r in range(2, rows + 1):  # down the rows: ~10x faster than numpy's cumsum along axis 0
        prefix[:, r] += prefix[:, r - 1]
    parts, part_piece = shapely.get_parts(geoms[1:], return_index=True)  # (8-connected pieces are multi)
    rings, ring_part = shapely.get_rings(parts, return_index=True)  # each part's shell first, then its holes
    xy, ring = shapely.get_coordinates(rings, return_index=True)
    x = xy[:, 0].astype(np.int64) - int(win.col_off)
    y = xy[:, 1].astype(np.int64) - int(win.row_off)
    same = ring[1:] == ring[:-1]  # edges inside one ring (rings are closed: last vertex = first)
    edge = (prefix[:, y[1:], x[:-1]] - prefix[:, y[:-1], x[:-1]]).astype(np.float64)  # (2, vertices - 1)
    enclosed = np.abs(np.stack([np.bincount(ring[:-1][same], weights=e[same], minlength=len(rings))
                                for e in edge], axis=1))  # (rings, 2): what each ring encloses
    shell = np.ones(len(rings), dtype=bool)
    shell[1:] = ring_part[1:] != ring_part[:-1]
    signed = np.where(shell[:, None], enclosed, -enclosed)
    piece = part_piece[ring_part] + 1
    for k in range(2):
        out[:, k] = np.bincount(piece, weights=signed[:, k], minlength=n + 1)
    return out


def iter_blocks(plan: Plan, workers: int) -> Generator[Block, None, None]:
    """Polygonised blocks in row-major order, ``2 * workers`` computing ahead of the caller's merge.

    A sliding window on a pool (worker processes, or threads for small rasters: :func:`.pool.block_executor`):
    a slow block holds back only its own hand-over, never a whole wave of others. The pool is shut down
    before the last block is handed over, so its workers are gone while the caller merges the last row.
    """
    order = iter([(r, c) for r in range(plan.rows) for c in range(plan.cols)])
    ahead = max(1, 2 * workers)
    last: Block | None = None
    with block_executor(plan, workers) as ex:
        window: deque[Future[Block]] = deque(
            ex.submit(process_block, plan, r, c) for r, c in itertools.islice(order, ahead))
        while window:
            blk = ex.result(window.popleft())
            nxt = next(order, None)
            if nxt is not None:
                window.append(ex.submit(process_block, plan, *nxt))
            if not window:
                last = blk
                break
            yield blk  # the caller's reference is the only one left
    if last is not None:
        yield last
