"""From a query vector to one page of ranked ids: filters, cut-off, sort order, paging.

The order is total and stable: by score (best first), ties by id; with ``sort="date"`` by
capture time (newest first; ``"date-asc"``: oldest first), ties by score then id. So
``offset`` pages through one fixed list: page 2 never repeats or skips an item of page 1.

- Without a cut-off the ranked list is the top ``offset + k`` (FAISS top-k, restricted to
  the filtered ids during the scan).
- With a cut-off (``auto``, ``min_score``, or implied by a date sort) it is every photo
  above the threshold (FAISS range search, same restriction), however many; ``total``
  says how many.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from indexer.store.library import Library
from retrieval.search.cutoff import (
    Cutoff,
    auto_cutoff,
    background_ids,
    combine_cutoffs,
    resolve_cutoff,
)
from retrieval.search.errors import QueryError
from retrieval.search.filters import allowed_ids, capture_time
from retrieval.search.options import SearchOptions


@dataclass
class Ranking:
    """One page of (id, score), the size of the whole kept list, and the cut-off used."""

    ids: list[int]
    scores: list[float]
    total: int | None
    cutoff: Cutoff | None
    rows: dict[int, dict] | None = None  # metadata already read (date sort)


def rank(library: Library, vector: np.ndarray, options: SearchOptions, max_k: int) -> Ranking:
    """Rank the library for ``vector`` under ``options`` and cut out the requested page."""
    allowed = allowed_ids(library.catalog, options.filter)
    auto, min_score = resolve_cutoff(options.cutoff, options.min_score, options.sort)
    if allowed is not None and not len(allowed):
        return Ranking([], [], 0 if auto or min_score is not None else None, None)
    population = len(allowed) if allowed is not None else len(library.index)
    cut = combine_cutoffs(_auto(library, vector, population) if auto else None, min_score)
    if cut is None:
        if options.offset + options.k > max_k:
            raise QueryError(
                f"offset + k must be at most {max_k} without a cut-off, got "
                f"{options.offset + options.k}"
            )
        ids, scores = _top(library, vector, options.offset + options.k, allowed)
    else:
        ids, scores = _above(library, vector, cut.threshold, allowed)
    ids, scores, rows = _order(library, ids, scores, options.sort)
    page = slice(options.offset, options.offset + options.k)
    total = len(ids) if cut is not None else None
    return Ranking(ids[page].tolist(), scores[page].tolist(), total, cut, rows)


def _auto(library: Library, vector: np.ndarray, population: int) -> Cutoff:
    """The auto cut-off from the query's scores over the library (or a fixed sample)."""
    sample = background_ids(library.index.ids())
    _, scores, _ = library.index.range_search(vector[None], -np.inf, sample)
    return auto_cutoff(scores, population)


def _top(library: Library, vector: np.ndarray, n: int, allowed) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = library.index.search(vector[None], n, allowed)
    keep = ids[0] >= 0
    return ids[0][keep], scores[0][keep]


def _above(library: Library, vector: np.ndarray, threshold: float, allowed):
    _, scores, ids = library.index.range_search(vector[None], threshold, allowed)
    return ids, scores


def _order(library: Library, ids: np.ndarray, scores: np.ndarray, sort: str):
    """Stable total order: score desc, id asc; or capture time, then score, then id."""
    order = np.lexsort((ids, -scores))
    ids, scores = ids[order], scores[order]
    if sort == "score":
        return ids, scores, None
    rows = library.catalog.get_images(ids.tolist())
    ids_scores = [(i, s) for i, s in zip(ids.tolist(), scores.tolist()) if i in rows]
    sign = -1 if sort == "date" else 1
    # Python's sort is stable: equal times keep the (score desc, id asc) order from above.
    ids_scores.sort(key=lambda pair: sign * capture_time(rows[pair[0]]).timestamp())
    out_ids = np.asarray([i for i, _ in ids_scores], dtype=np.int64)
    out_scores = np.asarray([s for _, s in ids_scores], dtype=np.float32)
    return out_ids, out_scores, rows
