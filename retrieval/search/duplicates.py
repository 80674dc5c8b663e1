"""Near-duplicate groups: bursts, resized, re-encoded and lightly cropped copies.

Every photo's vector is range-searched against the index (FAISS ``range_search``: all
photos with cosine >= ``threshold``); each such pair is an edge, and groups are the
connected components with two or more photos (single linkage: A~B and B~C put A, B, C in
one group even if A and C are a little further apart, which is what a burst looks like).
The suggested keeper of a group is its largest image (pixels); among equally large ones
the oldest (capture time, else mtime: copies are made after the original, and a
re-encoded copy can even be the bigger file), then the largest file, then the earliest
indexed. Each member's ``score`` is its cosine to the keeper.

A video takes part through all of its frames (two clips of the same scene group together
even when they open differently) and is one member of its group.

Cost: one range search of the index per photo, and no model call (the vectors are in the
library). With the ``exact`` kind that is a scan of the library per photo, O(n^2 d): about a
minute for 100k photos on two cores. With the ``ivf`` kind each photo is compared with the
photos of its own list and of the lists of its two nearest other centroids
(:meth:`~indexer.store.ivf.IVFIndex.near_pairs`: near-copies share a list, or a neighbouring
one) on its full vector read from the catalog, so scores and the threshold are exact: about
three minutes for a million photos (``bench/bench_scale.py`` measures the pairs' recall).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from indexer.store.library import Library
from retrieval.search.errors import QueryError
from retrieval.search.filters import ImageFilter, allowed_ids, capture_time, with_frames

DEFAULT_THRESHOLD = 0.95
QUERY_BATCH = 1024
GROUP_BATCH = 2_000  # groups whose rows and vectors are read together


@dataclass
class Member:
    id: int
    path: str
    width: int
    height: int
    size: int
    score: float  # cosine to the keeper (1.0 for the keeper itself)

    def as_dict(self) -> dict:
        return {**self.__dict__, "score": round(self.score, 6)}


@dataclass
class DuplicateGroup:
    """Photos that are near-copies of each other; ``members[0]`` is the keeper."""

    members: list[Member]

    @property
    def keeper(self) -> Member:
        return self.members[0]

    def as_dict(self) -> dict:
        return {
            "keeper": self.keeper.id,
            "keeper_path": self.keeper.path,
            "members": [m.as_dict() for m in self.members],
        }


class _UnionFind:
    """Disjoint sets over positions 0..n-1 (path halving, union by size)."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)
        self.size = np.ones(n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return int(x)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]


def find_duplicates(
    library: Library,
    threshold: float = DEFAULT_THRESHOLD,
    spec: ImageFilter | None = None,
) -> list[DuplicateGroup]:
    """Groups of near-duplicate photos (cosine >= ``threshold``), largest groups first."""
    if not 0.0 < threshold <= 1.0:
        raise QueryError(
            f"the duplicate threshold must be in (0, 1], got {threshold}", setting="threshold"
        )
    library.refresh()
    allowed = allowed_ids(library.catalog, spec or ImageFilter())
    if allowed is not None:  # an allowed video brings its frames
        allowed = with_frames(library.catalog, allowed)
    ids = library.index.ids() if allowed is None else np.intersect1d(allowed, library.index.ids())
    ids = np.sort(ids)
    if len(ids) < 2:
        return []
    sets = _UnionFind(len(ids))
    near_pairs = getattr(library.index, "near_pairs", None)
    if near_pairs is not None:  # a kind that finds near pairs through its own structure
        _link_pairs(near_pairs, ids, threshold, allowed, sets)
    for start in range(0 if near_pairs is None else len(ids), len(ids), QUERY_BATCH):
        chunk = ids[start : start + QUERY_BATCH]
        _link(library, chunk, ids, threshold, allowed, sets)
    # A video's frames are its video: a group needs two different photos or videos.
    owners = library.catalog.frame_owners(ids.tolist())
    components: dict[int, dict[int, None]] = {}
    for position in range(len(ids)):
        owner = owners.get(int(ids[position]), (int(ids[position]), 0.0))[0]
        components.setdefault(sets.find(position), {})[owner] = None
    groups = _groups(library, [list(m) for m in components.values() if len(m) > 1])
    return sorted(groups, key=lambda g: (-len(g.members), g.keeper.path))


def _link(library, chunk, ids, threshold, allowed, sets: _UnionFind) -> None:
    """Union every pair (query in ``chunk``, hit) scoring >= ``threshold``."""
    found, vectors = library.catalog.vectors(chunk)
    if not len(found):
        return
    # FAISS keeps score > radius; the epsilon makes the threshold inclusive.
    lims, _, hits = library.index.range_search(vectors, threshold - 1e-6, allowed)
    query_pos = np.repeat(np.searchsorted(ids, found), np.diff(lims))
    hit_pos = np.minimum(np.searchsorted(ids, hits), len(ids) - 1)
    pairs = (ids[hit_pos] == hits) & (hit_pos != query_pos)
    for a, b in zip(query_pos[pairs].tolist(), hit_pos[pairs].tolist()):
        sets.union(a, b)


def _link_pairs(near_pairs, ids, threshold, allowed, sets: _UnionFind) -> None:
    """Union every pair the index reports above ``threshold`` (inclusive)."""
    a, b, _ = near_pairs(threshold - 1e-6, allowed)
    pos_a = np.minimum(np.searchsorted(ids, a), len(ids) - 1)
    pos_b = np.minimum(np.searchsorted(ids, b), len(ids) - 1)
    known = (ids[pos_a] == a) & (ids[pos_b] == b)
    for x, y in zip(pos_a[known].tolist(), pos_b[known].tolist()):
        sets.union(x, y)


def _groups(library: Library, member_lists: list[list[int]]) -> list[DuplicateGroup]:
    """The groups of these member ids, their rows and vectors read for many groups at a
    time (a million-photo library has tens of thousands of groups)."""
    groups = []
    for start in range(0, len(member_lists), GROUP_BATCH):
        chunk = member_lists[start : start + GROUP_BATCH]
        wanted = [i for members in chunk for i in members]
        rows = library.catalog.get_images(wanted)
        found, vectors = library.catalog.vectors([i for i in wanted if i in rows])
        by_id = dict(zip(found.tolist(), vectors))
        groups += [_group(present, rows, by_id) for present in _present(chunk, rows, by_id)]
    return groups


def _present(member_lists: list[list[int]], rows: dict, by_id: dict) -> list[list[int]]:
    """Each group's members still in the catalog (a concurrent delete may remove some),
    the groups that still have two."""
    kept = [[i for i in members if i in rows and i in by_id] for members in member_lists]
    return [members for members in kept if len(members) > 1]


def _group(present: list[int], rows: dict, by_id: dict) -> DuplicateGroup:
    keeper = max(present, key=lambda i: _keeper_rank(rows[i]))
    others = [i for i in present if i != keeper]
    ordered = [keeper, *sorted(others, key=lambda i: (-float(by_id[i] @ by_id[keeper]), i))]
    members = [
        Member(
            id=i,
            path=rows[i]["path"],
            width=rows[i]["width"],
            height=rows[i]["height"],
            size=rows[i]["size"],
            score=float(by_id[i] @ by_id[keeper]),
        )
        for i in ordered
    ]
    return DuplicateGroup(members)


def _keeper_rank(row: dict) -> tuple[int, float, int, int]:
    """Largest resolution, then oldest, then largest file, then earliest indexed."""
    return row["width"] * row["height"], -capture_time(row).timestamp(), row["size"], -row["id"]
