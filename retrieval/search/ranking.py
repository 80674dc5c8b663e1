"""From a query vector to one page of ranked ids: filters, cut-off, sort order, paging.

The order is total and stable: by score (best first), ties by id; with ``sort="date"`` by
capture time (newest first; ``"date-asc"``: oldest first), ties by score then id. So
``offset`` pages through one fixed list: page 2 never repeats or skips an item of page 1.

- Without a cut-off the ranked list is the top ``offset + k`` (FAISS top-k, restricted to
  the filtered ids during the scan).
- With a cut-off (``auto``, ``min_score``, or implied by a date sort) it is every photo
  above the threshold (FAISS range search, same restriction), however many; ``total``
  says how many.

A video is in the index as several frames (its row's id and its other frames' ids, see
:mod:`indexer.store.catalog`): hits are collapsed so each video appears once, at its best
frame, with that frame's score; ``Ranking.frame_times`` says which frame it was.

A camera RAW and a JPEG of one shot are folded into one entry, the JPEG, at the better
of their two places (:mod:`retrieval.search.pairs`); ``Ranking.raws`` names the RAW.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from indexer.store.library import Library
from retrieval.search.cutoff import (
    Cutoff,
    auto_cutoff,
    background_scores,
    combine_cutoffs,
    resolve_cutoff,
)
from retrieval.search.errors import QueryError
from retrieval.search.filters import allowed_ids, capture_time, with_frames
from retrieval.search.options import SearchOptions
from retrieval.search.pairs import RawPairs, fold_pairs


@dataclass
class Ranking:
    """One page of (id, score), the size of the whole kept list, and the cut-off used."""

    ids: list[int]
    scores: list[float]
    total: int | None
    cutoff: Cutoff | None
    rows: dict[int, dict] | None = None  # metadata already read (date sort)
    frame_times: dict[int, float] | None = None  # video id -> time of its best frame, when
    # that frame is not the one its row holds (whose time is the row's "frame_time")
    raws: dict[int, int] | None = None  # face id -> the RAW folded into it (pairs.py)
    matched: dict[int, dict] | None = None  # fused pages: id -> why it matched (.fusion)


_FILTERS = object()  # rank()'s default: the ids the options' filters allow


def rank(
    library: Library,
    vector: np.ndarray,
    options: SearchOptions,
    max_k: int,
    pairs: RawPairs | None = None,
    allowed: np.ndarray | object | None = _FILTERS,
) -> Ranking:
    """Rank the library for ``vector`` under ``options`` and cut out the requested page.

    With ``pairs`` (and not ``options.raw_pairs``) a RAW+JPEG pair counts as one photo.
    ``allowed``: the ids that may be returned, when the caller already knows them (None:
    all); by default those of the options' filters.
    """
    if allowed is _FILTERS:
        allowed = allowed_ids(library.catalog, options.filter)
    auto, min_score = resolve_cutoff(options.cutoff, options.min_score, options.sort)
    if allowed is not None and not len(allowed):
        return Ranking([], [], 0 if auto or min_score is not None else None, None)
    population = len(allowed) if allowed is not None else len(library.index)
    if allowed is not None:  # an allowed video brings its frames
        allowed = with_frames(library.catalog, allowed)
    faces = pairs.faces(library.catalog) if pairs is not None and not options.raw_pairs else {}
    cut = combine_cutoffs(_auto(library, vector, population) if auto else None, min_score)
    if cut is None:
        if options.offset + options.k > max_k:
            raise QueryError(
                f"offset + k must be at most {max_k} without a cut-off, got "
                f"{options.offset + options.k}"
            )
        # Folding pairs can halve the list: fetch twice as many when there are pairs.
        wanted = (options.offset + options.k) * (2 if faces else 1)
        ids, scores, times = top_hits(library, vector, wanted, allowed)
    else:
        ids, scores = _above(library, vector, cut.threshold, allowed)
        ids, scores, times = collapse_frames(library, ids, scores)
    ids, scores, rows = order_ranked(library, ids, scores, options.sort)
    ids, scores, raws = fold_pairs(ids, scores, faces, allowed)
    page = slice(options.offset, options.offset + options.k)
    total = len(ids) if cut is not None else None
    page_ids = ids[page].tolist()
    if rows is not None:  # a face shown for its RAW may not have been read yet
        rows.update(library.catalog.get_images([i for i in page_ids if i not in rows]))
    page_raws = {i: raws[i] for i in page_ids if i in raws}
    return Ranking(page_ids, scores[page].tolist(), total, cut, rows, times, page_raws)


def collapse_frames(
    library: Library, ids: np.ndarray, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """Hits with every video frame turned into its video, each video once at its best
    score (ties: lower id); returns (ids, scores, video id -> best frame time) where the
    time is given for frames other than the one the video's row holds."""
    owners = library.catalog.frame_owners(ids.tolist()) if len(ids) else {}
    if not owners:
        return ids, scores, {}
    order = np.lexsort((ids, -scores))
    out_ids: list[int] = []
    out_scores: list[float] = []
    times: dict[int, float] = {}
    seen: set[int] = set()
    for i, score in zip(ids[order].tolist(), scores[order].tolist()):
        owner, at = owners.get(i, (i, None))
        if owner in seen:
            continue
        seen.add(owner)
        out_ids.append(owner)
        out_scores.append(score)
        if at is not None:
            times[owner] = at
    return np.asarray(out_ids, np.int64), np.asarray(out_scores, np.float32), times


def _auto(library: Library, vector: np.ndarray, population: int) -> Cutoff:
    """The auto cut-off from the query's scores over the library (or a fixed sample)."""
    return auto_cutoff(background_scores(library.index, vector), population)


def top_hits(library: Library, vector: np.ndarray, n: int, allowed):
    """The best ``n`` photos and videos: asks the index for more hits while frames of the
    same videos fill the list (at most until the whole library was asked for)."""
    want = n
    while True:
        scores, ids = library.index.search(vector[None], want, allowed)
        keep = ids[0] >= 0
        found = int(keep.sum())
        ids, scores, times = collapse_frames(library, ids[0][keep], scores[0][keep])
        if len(ids) >= n or found < want or want >= len(library.index):
            return ids[:n], scores[:n], times
        want *= 4


def _above(library: Library, vector: np.ndarray, threshold: float, allowed):
    _, scores, ids = library.index.range_search(vector[None], threshold, allowed)
    return ids, scores


def order_ranked(library: Library, ids: np.ndarray, scores: np.ndarray, sort: str):
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
