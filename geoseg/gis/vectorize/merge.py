"""Join open pieces across block seams (union-find); hand over each group once no unseen block can
extend it."""

from __future__ import annotations

from typing import Any

import numpy as np

from geoseg.gis.vectorize.blocks import Block
from geoseg.gis.vectorize.plan import Plan
from geoseg.gis.vectorize.stitch import stitch


class Merger:
    """Union-find over open pieces; emits a group's merged polygon when no unseen block can extend it."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.parent: dict[int, int] = {}
        self.geom: dict[int, Any] = {}
        self.cls: dict[int, int] = {}
        self.row: dict[int, int] = {}
        self.bottom: dict[int, bool] = {}
        self.conf: dict[int, np.ndarray] = {}  # [confidence sum, pixels]: added up over a group's pieces
        self.base = 0
        self.edges: dict[tuple[int, int], dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def _find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def _join(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in {(int(p), int(q)) for p, q in zip(a, b, strict=True)}:
            rx, ry = self._find(x), self._find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def _match(self, la: np.ndarray, ca: np.ndarray, lb: np.ndarray, cb: np.ndarray) -> None:
        """Join pieces facing each other across a seam (arrays run along it, side a vs side b)."""
        pairs = [(slice(None), slice(None))]
        if self.plan.connectivity == 8 and len(la) > 1:
            pairs += [(slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))]
        for sa, sb in pairs:
            xa, xb, ka, kb = la[sa], lb[sb], ca[sa], cb[sb]
            hit = (xa > 0) & (xb > 0) & (ka == kb)
            if hit.any():
                self._join(xa[hit], xb[hit])

    def add(self, blk: Block) -> None:
        base = self.base
        self.base += blk.n
        gids = blk.open_labels + base
        for g, geom, k, bot in zip(gids.tolist(), blk.open_geoms, blk.open_classes.tolist(),
                                   blk.open_bottom.tolist(), strict=True):
            self.parent[g] = g
            self.geom[g] = geom
            self.cls[g] = k
            self.row[g] = blk.r
            self.bottom[g] = bot
        if blk.open_conf is not None:
            for g, conf in zip(gids.tolist(), blk.open_conf, strict=True):
                self.conf[g] = conf
        edges = {k: (np.where(lab > 0, lab + base, 0), cls) for k, (lab, cls) in blk.edges.items()}
        r, c = blk.r, blk.c
        left = self.edges.get((r, c - 1))
        if left is not None:
            self._match(*left["right"], *edges["left"])
        up = self.edges.get((r - 1, c))
        if up is not None:
            self._match(*up["bottom"], *edges["top"])
        if self.plan.connectivity == 8:
            ul = self.edges.get((r - 1, c - 1))  # diagonal across the corner of four blocks
            if ul is not None:
                self._match(ul["bottom"][0][-1:], ul["bottom"][1][-1:], edges["top"][0][:1], edges["top"][1][:1])
            ur = self.edges.get((r - 1, c + 1))
            if ur is not None:
                self._match(ur["bottom"][0][:1], ur["bottom"][1][:1], edges["top"][0][-1:], edges["top"][1][-1:])
        self.edges[(r, c)] = edges
        if c == self.plan.cols - 1:  # the previous row of blocks is no longer a neighbour of anything
            for cc in range(self.plan.cols):
                self.edges.pop((r - 1, cc), None)

    def complete(self, r: int, last: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """After row ``r`` of blocks: merge and drop every group that cannot grow; ``(geoms_px, classes, conf)``
        with ``conf`` the ``(n, 2)`` [confidence sum, pixels] of each group (``None`` without a confidence map)."""
        groups: dict[int, list[int]] = {}
        for g in self.parent:
            groups.setdefault(self._find(g), []).append(g)
        done: list[list[Any]] = []
        done_cls: list[int] = []
        done_conf: list[np.ndarray] = []
        with_conf = self.plan.confidence is not None
        for root, members in groups.items():
            if not last and any(self.row[m] == r and self.bottom[m] for m in members):
                continue
            done.append([self.geom[m] for m in members])
            done_cls.append(self.cls[root])
            if with_conf:  # sums and counts add up; the mean is taken once, of the whole polygon
                done_conf.append(np.sum([self.conf.pop(m) for m in members], axis=0))
            for m in members:
                del self.parent[m], self.geom[m], self.cls[m], self.row[m], self.bottom[m]
        geoms = np.empty(len(done), dtype=object)
        multi = [i for i, parts in enumerate(done) if len(parts) > 1]
        for i, parts in enumerate(done):
            if len(parts) == 1:
                geoms[i] = parts[0]
        if multi:
            p = self.plan
            geoms[multi] = stitch([done[i] for i in multi], p.connectivity, p.block, p.width, p.height)
        conf = np.asarray(done_conf, dtype=np.float64).reshape(-1, 2) if with_conf else None
        return geoms, np.asarray(done_cls, dtype=np.int64), conf

    @property
    def open_count(self) -> int:
        return len(self.parent)
