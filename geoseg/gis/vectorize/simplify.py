"""``--simplify TOL``: Douglas-Peucker on the coverage's shared edges, so the tolerance is a distance.

As ``ogr2ogr -simplify`` and ``shapely.simplify`` mean it: every simplified boundary lies within ``TOL`` of
the raw one (the Hausdorff distance of each edge to its simplification is at most ``TOL``), so pixel
staircases of 1-pixel steps (at most 0.71 px from their diagonal) vanish at a tolerance of one pixel.
Neighbours keep shared edges: the polygons' boundaries are cut into *arcs* between the points where three
or more polygons (or the coverage's outline) meet, every arc is simplified once with its end points fixed,
and the faces the simplified arcs enclose are the output polygons, each taking the class and the identity
of the raw polygon it overlaps most. A polygon whose simplification would cross another arc, collapse or
fold keeps that arc raw (the check is on the result: every raw polygon must come back as one valid face
of nearly its area); so the output is always a valid coverage with no gaps and no overlaps.
"""

from __future__ import annotations

import logging

import numpy as np
import shapely

log = logging.getLogger(__name__)


def _arcs(geoms: np.ndarray) -> np.ndarray:
    """The coverage's boundary cut at every node into maximal arcs (each shared edge once), and at the
    corners of its bounding box, so the map's frame keeps its corners."""
    edges = shapely.union_all(shapely.boundary(geoms))  # noded: shared edges once, split where lines meet
    merged = shapely.line_merge(edges)  # joined through degree-2 points only: nodes stay arc ends
    x0, y0, x1, y1 = shapely.total_bounds(geoms)
    corners = {(x0, y0), (x0, y1), (x1, y0), (x1, y1)}
    out = []
    for arc in shapely.get_parts(merged):
        xy = shapely.get_coordinates(arc)
        cut = [i for i in range(1, len(xy) - 1) if (xy[i, 0], xy[i, 1]) in corners]
        if not cut:
            out.append(arc)
            continue
        bounds = [0, *cut, len(xy) - 1]
        out += [shapely.LineString(xy[i:j + 1]) for i, j in zip(bounds[:-1], bounds[1:], strict=True)]
    return np.asarray(out, dtype=object)


def _split_simplify(arc: shapely.LineString, tolerance: float) -> shapely.LineString:
    """DP of the arc forced to keep its raw vertex farthest from the chord (each half simplified alone, so
    every raw vertex stays within the tolerance)."""
    xy = shapely.get_coordinates(arc)
    a, b = xy[0], xy[-1]
    d = b - a
    n = float(np.hypot(*d))
    dist = np.abs(d[0] * (xy[:, 1] - a[1]) - d[1] * (xy[:, 0] - a[0])) / n if n else np.hypot(*(xy - a).T)
    k = int(np.argmax(dist[1:-1])) + 1
    halves = [shapely.simplify(shapely.LineString(part), tolerance, preserve_topology=False)
              for part in (xy[: k + 1], xy[k:])]
    first, second = (shapely.get_coordinates(h) for h in halves)
    return shapely.LineString(np.vstack([first, second[1:]]))


def _from_corner(ring: np.ndarray) -> np.ndarray:
    """A closed ring's coordinates rotated to start (and end) at its top-left vertex (least row, then column),
    running clockwise on the screen (rows down), as GDAL traces outer rings: DP's result depends on both."""
    if shapely.LinearRing(ring).is_ccw:
        ring = ring[::-1]
    body = ring[:-1]
    k = int(np.lexsort((body[:, 0], body[:, 1]))[0])  # the first row, then the first column
    body = np.roll(body, -k, axis=0)
    return np.vstack([body, body[:1]])


def _simplify_arcs(arcs: np.ndarray, tolerance: float) -> np.ndarray:
    out = np.asarray(shapely.simplify(arcs, tolerance, preserve_topology=False))
    closed = shapely.is_closed(arcs)
    if closed.any():  # an island's whole ring: simplified as a ring (its start point may go, as for a polygon)
        # each ring starts at its top-left vertex, a corner of its hull that DP keeps anyway (a start in
        # the middle of a staircase would keep a step there), as GDAL starts the rings it traces
        polys = np.array([shapely.Polygon(_from_corner(shapely.get_coordinates(a))) for a in arcs[closed]],
                         dtype=object)
        rings = shapely.simplify(polys, tolerance, preserve_topology=False)
        rings_ok = ~shapely.is_empty(rings)
        simplified = np.where(rings_ok, shapely.get_exterior_ring(rings), arcs[closed])
        out[closed] = [shapely.LineString(shapely.get_coordinates(r)) for r in simplified]
    bad = shapely.is_empty(out) | (closed & (shapely.get_num_coordinates(out) < 4))  # collapsed: stays raw
    out[bad] = arcs[bad]
    # two arcs between the same two nodes (a small polygon's two sides) both straightened would coincide and
    # the polygon vanish: each keeps its farthest vertex
    ends = shapely.get_coordinates(shapely.points(np.column_stack([
        shapely.get_coordinates(shapely.get_point(arcs, 0)), shapely.get_coordinates(shapely.get_point(arcs, -1))
    ]).reshape(-1, 2)))
    pairs: dict[tuple[float, ...], list[int]] = {}
    for i in np.flatnonzero(~closed).tolist():
        a, b = tuple(ends[2 * i]), tuple(ends[2 * i + 1])
        pairs.setdefault((*min(a, b), *max(a, b)), []).append(i)
    for idx in pairs.values():
        if len(idx) > 1:
            for i in idx:
                if shapely.get_num_coordinates(out[i]) == 2 and shapely.get_num_coordinates(arcs[i]) > 2:
                    out[i] = _split_simplify(arcs[i], tolerance)
    return out


def _faces(arcs: np.ndarray) -> np.ndarray:
    return np.asarray(shapely.get_parts(shapely.polygonize(arcs)))


def _match(faces: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """For each face, the raw polygon it overlaps most (-1: none, e.g. a nodata hole)."""
    tree = shapely.STRtree(raw)
    f_idx, r_idx = tree.query(faces, predicate="intersects")
    best = np.full(len(faces), -1)
    best_area = np.zeros(len(faces))
    if len(f_idx):
        inter = shapely.area(shapely.intersection(faces[f_idx], raw[r_idx]))
        for f, r, a in zip(f_idx.tolist(), r_idx.tolist(), inter.tolist(), strict=True):
            if a > best_area[f]:
                best[f], best_area[f] = r, a
    return best


def _own_arcs(arcs: np.ndarray, polygons: np.ndarray) -> np.ndarray:
    """Indexes of the arcs that lie on the boundaries of ``polygons``."""
    if not len(polygons):
        return np.zeros(0, dtype=np.int64)
    tree = shapely.STRtree(arcs)
    return np.unique(tree.query(shapely.boundary(polygons), predicate="covers")[1])


def _assemble(simple: np.ndarray, raw: np.ndarray) -> np.ndarray:
    faces = _faces(simple)
    owner = _match(faces, raw)
    out = np.empty(len(raw), dtype=object)
    groups: dict[int, list[int]] = {}
    for f, r in enumerate(owner.tolist()):
        if r >= 0:
            groups.setdefault(r, []).append(f)
    for r, fs in groups.items():
        out[r] = faces[fs[0]] if len(fs) == 1 else shapely.union_all(faces[fs])
    return out


def simplify_coverage(geoms: np.ndarray, tolerance: float) -> np.ndarray:
    """The polygons of a valid coverage ``geoms`` simplified by ``tolerance`` (same order, same count)."""
    if not len(geoms) or tolerance <= 0:
        return geoms
    arcs = _arcs(geoms)
    simple = _simplify_arcs(arcs, tolerance)
    # polygons too small to keep a shape at this tolerance keep their edges raw
    small = shapely.area(geoms) < 4 * tolerance * tolerance
    keep = _own_arcs(arcs, geoms[small])
    simple[keep] = arcs[keep]
    for _ in range(3):  # simplified arcs that cross or overlap another one go back to their raw form
        tree = shapely.STRtree(simple)
        hits = [tree.query(simple, predicate=p) for p in ("crosses", "overlaps")]
        clash = np.unique(np.concatenate([np.concatenate(h) for h in hits]))
        clash = clash[shapely.get_num_coordinates(simple[clash]) != shapely.get_num_coordinates(arcs[clash])]
        if not len(clash):
            break
        simple[clash] = arcs[clash]
    for attempt in range(5):
        out = _assemble(simple, geoms)
        broken = _broken(geoms, out)
        if not broken.any():
            return out
        restore = _own_arcs(arcs, geoms[broken])  # the broken polygons' own edges go back to raw
        simple[restore] = arcs[restore]
        log.debug("simplify: %d polygon(s) keep their raw edges (attempt %d)", int(broken.sum()), attempt + 1)
    log.warning("simplify: the coverage could not be simplified by %g px without breaking polygons; "
                "written unsimplified", tolerance)
    return geoms


def _broken(raw: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Polygons whose simplification is missing, invalid, or lost or gained more than half their area; all
    of them when the faces overlap or leave gaps (the sum of the areas differs from the raw coverage's)."""
    missing = np.array([g is None for g in out], dtype=bool)
    bad = missing.copy()
    ok = ~missing
    if ok.any():
        got = out[ok]
        a_raw, a_got = shapely.area(raw[ok]), shapely.area(got)
        bad[ok] = ~shapely.is_valid(got) | (np.abs(a_got - a_raw) > 0.5 * a_raw)
        if not bad.any() and not shapely.coverage_is_valid(out):
            bad[:] = ~shapely.is_valid(shapely.coverage_invalid_edges(out)) | ~shapely.is_empty(
                shapely.coverage_invalid_edges(out))
    return bad


__all__ = ["simplify_coverage"]
