"""One query, two rankings: the photos' meaning (vectors) and their words (FTS5), fused.

A library that stores words (file and folder names, keywords and captions, text read in the
photos: the catalog's ``image_text``, see :mod:`indexer.store.textsearch`) answers a text
query twice: by the cosine of each photo's vector to the query vector, and by the words of
the query found in each photo's text (bm25). Without stored words nothing here runs and a
search costs exactly what it did before.

**Fusion by calibrated scores** (the default; ``FUSIONS``). Both sides are put on one scale,
"how far out of the bulk of the library is this photo for this query", the scale of the
adaptive cut-off (:mod:`.cutoff`): with ``median`` and ``sigma`` the robust centre and
spread of the query's ``atanh(cosine)`` over (a sample of) the library and ``z`` the
universal threshold for its size,

    fused = tanh( atanh(cosine) + evidence * (z + 1) * sigma )

where ``evidence`` in [0, 1] is the share of the query's words the photo's text holds
(weighted by the terms' weights; a handful of filler words such as "a", "of", "photo" do not
count) times ``0.9 + 0.1 * bm25 / best bm25`` (so among photos holding every word the better
bm25 comes first). So:

- a photo without matching words keeps its cosine: the score stays a cosine and the
  ranking is today's;
- a photo holding every word of the query moves ``z + 1`` sigmas up: one sigma beyond the
  universal threshold even if its cosine is the bulk's median. An exact word match thus
  passes the auto cut-off on its own and outranks semantic noise (random weights), while
  with a real model a photo both about the query and holding its words comes first;
- the adaptive cut-off keeps its meaning on the fused list: its threshold is the same
  cosine, ``tanh(median + z sigma)``, applied to the fused score: "stands out for this
  query", by its look, by its words, or by both. ``--min-score`` applies to it too.

**Reciprocal-rank fusion** (``fusion="rrf"``, Cormack et al. 2009: ``sum 1 / (60 + rank)``
over the two lists) is kept for comparison: bench/bench_fusion.py measures both. It needs no
calibration but throws away how far apart the scores are, and its scores are not cosines, so
a cut-off can only be applied as "passes the semantic threshold or holds every word".

Every result of a fused page carries ``matched``: ``{"semantic": cosine, "text": [the query
words and phrases found], "sources": [where: name, folder, ocr, description, keywords]}``
(with ``"snippets"`` marking the words in their text for the first results of a page).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from indexer.model.identity import EMBED_DIM
from indexer.store.library import Library
from indexer.store.textsearch import TextHit, TextTerm
from retrieval.search.cutoff import (
    FISHER_CLIP,
    MAD_TO_SIGMA,
    MIN_POPULATION,
    Cutoff,
    background_ids,
    background_scores,
    combine_cutoffs,
    resolve_cutoff,
    universal_z,
)
from retrieval.search.errors import QueryError
from retrieval.search.filters import allowed_ids, with_frames
from retrieval.search.options import SearchOptions
from retrieval.search.pairs import RawPairs, fold_pairs
from retrieval.search.query import Term
from retrieval.search.ranking import Ranking, collapse_frames, order_ranked, top_hits

FUSIONS = ("calibrated", "rrf")
TEXT_SOURCES = frozenset({"ocr", "description", "keywords"})  # text:
NAME_SOURCES = frozenset({"name", "folder"})  # name:
FIELD_SOURCES = {"text": TEXT_SOURCES, "name": NAME_SOURCES}
WORD_POOL = 200  # word hits considered for a top-k page (more when the page is deeper)
MAX_WORD_HITS = 10_000  # word hits considered under a cut-off
SNIPPETS_PER_PAGE = 50
RRF_K = 60
CALIBRATION_SAMPLE = 2048
MIN_SIGMA = 0.01  # a library too small to measure its spread: an atanh-cosine spread
# Words that say nothing about a photo's text ("a photo of the beach"): not counted.
FILLER = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "on",
        "in",
        "at",
        "to",
        "and",
        "or",
        "with",
        "for",
        "by",
        "is",
        "are",
        "this",
        "that",
        "photo",
        "picture",
        "image",
    ]
)


# Per open library: ((index identity, size), sample vectors) for _bulk without a cut-off.
_SAMPLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class WordQuery:
    """The word side of a parsed query.

    ``scoring``: the terms whose words rank (phrases as a whole); ``required``: quoted
    phrases every result must hold; ``excluded``: quoted or field terms no result may hold;
    ``weights``: each scoring word's (or phrase's) weight, for the share of words matched.
    """

    scoring: tuple[TextTerm, ...]
    required: tuple[TextTerm, ...]
    excluded: tuple[TextTerm, ...]
    weights: dict[str, float]

    def is_empty(self) -> bool:
        return not (self.scoring or self.required or self.excluded)


def word_query(terms: Sequence[Term]) -> WordQuery:
    """The word side of parsed terms (see :mod:`.query`): positive text terms rank by
    their words, quoted ones are also required, subtracted quoted/field ones excluded."""
    scoring: list[TextTerm] = []
    required: list[TextTerm] = []
    excluded: list[TextTerm] = []
    weights: dict[str, float] = {}
    for term in terms:
        if term.kind != "text":
            continue
        sources = FIELD_SOURCES.get(term.field) if term.field else None
        text_term = TextTerm(term.text, phrase=term.quoted, sources=sources)
        if not text_term.targets():  # no letter or digit ("€", "*"): nothing to look up
            continue
        if term.weight < 0:
            if term.quoted or term.field:
                excluded.append(text_term)
            continue
        if term.quoted:
            scoring.append(text_term)
            required.append(text_term)
            weights[term.text] = weights.get(term.text, 0.0) + term.weight
            continue
        kept = [w for w in text_term.words() if w not in FILLER or term.field]
        if kept:  # "a photo of the beach" looks for "beach" only
            scoring.append(TextTerm(" ".join(kept), sources=sources))
        for word in kept:
            weights[word] = weights.get(word, 0.0) + term.weight
    return WordQuery(tuple(scoring), tuple(required), tuple(excluded), weights)


@dataclass(frozen=True)
class Bulk:
    """The bulk of a query's scores over the library (``atanh`` scale) and its cut-off."""

    median: float
    sigma: float
    z: float
    cutoff: Cutoff | None  # the cut-off to apply (auto and/or min-score), or None


def restrict(library: Library, words: WordQuery, options: SearchOptions) -> np.ndarray | None:
    """The ids a query may return: the filters', then only photos holding every required
    phrase and none of the excluded ones (None: every photo)."""
    catalog = library.catalog
    allowed = allowed_ids(catalog, options.filter)
    for term in words.required:
        allowed = catalog.text_ids(term, allowed)
    for term in words.excluded:
        gone = catalog.text_ids(term, allowed)
        if not len(gone):
            continue
        if allowed is None:
            allowed = catalog.ids_where("1")
        allowed = np.setdiff1d(allowed, gone)
    return allowed


def rank_fused(
    library: Library,
    vector: np.ndarray | None,
    words: WordQuery,
    options: SearchOptions,
    max_k: int,
    allowed: np.ndarray | None,
    fusion: str = "calibrated",
    pairs: RawPairs | None = None,
) -> Ranking:
    """Rank by meaning and words together (see the module notes). ``allowed``: from
    :func:`restrict`; ``vector`` None: words only (the score is the word evidence);
    ``pairs``: RAW+JPEG pairs listed once (as :func:`~.ranking.rank` does)."""
    if fusion not in FUSIONS:
        raise QueryError(f"fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    auto, min_score = resolve_cutoff(options.cutoff, options.min_score, options.sort)
    if allowed is not None and not len(allowed):
        return Ranking([], [], 0 if auto or min_score is not None else None, None, matched={})
    cutting = auto or min_score is not None
    pool = options.offset + options.k
    if not cutting and pool > max_k:
        raise QueryError(f"offset + k must be at most {max_k} without a cut-off, got {pool}")
    limit = MAX_WORD_HITS if cutting else max(pool, WORD_POOL)
    hits = library.catalog.text_search(words.scoring, limit, allowed)
    faces = pairs.faces(library.catalog) if pairs is not None and not options.raw_pairs else {}
    if vector is None:
        return _words_only(library, hits, words, options, cutting, faces, allowed)
    population = len(allowed) if allowed is not None else len(library.index)
    if allowed is not None:  # an allowed video brings its frames
        allowed = with_frames(library.catalog, allowed)
    bulk = _bulk(library, vector, population, auto, min_score)
    ids, cosines, times = _semantic(library, vector, bulk, pool, allowed)
    cosine = dict(zip(ids.tolist(), cosines.tolist()))
    cosine.update(_cosines(library, vector, [h.image_id for h in hits], cosine))
    evidence = _evidence(hits, words)
    if fusion == "rrf":
        fused = _rrf(cosine, hits)
        keep = _rrf_keep(cosine, evidence, bulk.cutoff)
    else:
        fused = _calibrated(cosine, evidence, bulk)
        keep = _calibrated_keep(fused, bulk.cutoff)
    kept = [i for i in fused if keep(i)]
    ranked_ids = np.asarray(kept, dtype=np.int64)
    ranked = np.asarray([fused[i] for i in kept], dtype=np.float64)
    ranked_ids, ranked, rows = order_ranked(library, ranked_ids, ranked, options.sort)
    ranked_ids, ranked, raws = fold_pairs(ranked_ids, ranked, faces, allowed)
    page = slice(options.offset, options.offset + options.k)
    total = len(ranked_ids) if cutting else None
    page_ids = ranked_ids[page].tolist()
    matched = _page_matched(page_ids, cosine, hits, raws)
    if rows is not None:  # a face shown for its RAW may not have been read yet
        rows.update(library.catalog.get_images([i for i in page_ids if i not in rows]))
    page_raws = {i: raws[i] for i in page_ids if i in raws}
    return Ranking(
        page_ids, ranked[page].tolist(), total, bulk.cutoff, rows, times, page_raws, matched
    )


def _page_matched(
    page_ids: list[int], cosine: dict[int, float], hits: list[TextHit], raws: dict[int, int]
) -> dict[int, dict]:
    """The explanation of each photo of a page; a RAW+JPEG pair's joins both files'."""
    by_id = {h.image_id: h for h in hits}
    matched = {}
    for image_id in page_ids:
        explanation = _explain(cosine.get(image_id), by_id.get(image_id))
        raw = raws.get(image_id)
        if raw is not None:
            other = _explain(cosine.get(raw), by_id.get(raw))
            for key in ("text", "sources"):
                explanation[key] = list(dict.fromkeys(explanation[key] + other[key]))
            if (
                other["semantic"] is not None
                and (explanation["semantic"] or -2) < other["semantic"]
            ):
                explanation["semantic"] = other["semantic"]
        matched[image_id] = explanation
    return matched


def add_snippets(library: Library, ranking: Ranking, words: WordQuery) -> None:
    """Put where the words matched (``[[word]]`` marked) into the first results' matched."""
    matched = ranking.matched or {}
    ids = [i for i in ranking.ids[:SNIPPETS_PER_PAGE] if matched.get(i, {}).get("text")]
    if not ids:
        return
    found = library.catalog.text_snippets(ids, words.scoring)
    for image_id in ids:
        matched[image_id]["snippets"] = found.get(image_id, [])


# -- the two sides ---------------------------------------------------------------------------
def _bulk(
    library: Library, vector: np.ndarray, population: int, auto: bool, min_score: float | None
) -> Bulk:
    """Median and spread of the query's atanh-cosines over (a sample of) the library.

    Under the auto cut-off they come from the very sample the cut-off uses (so its threshold
    is today's); otherwise from a smaller fixed sample whose vectors are kept in memory
    (``CALIBRATION_SAMPLE``: the spread of 2,048 scores is known to a few percent)."""
    if auto:
        scores = background_scores(library.index, vector)
    else:
        scores = _dot(_sample_matrix(library), vector)
    z = universal_z(population)
    fisher = np.arctanh(np.clip(np.asarray(scores, np.float64), -FISHER_CLIP, FISHER_CLIP))
    if len(fisher):
        median = float(np.median(fisher))
        sigma = MAD_TO_SIGMA * float(np.median(np.abs(fisher - median)))
    else:
        median, sigma = 0.0, 0.0
    sigma = max(sigma, MIN_SIGMA)
    auto_cut = None
    if auto:
        threshold = math.tanh(median + z * sigma) if len(scores) >= MIN_POPULATION else -math.inf
        auto_cut = Cutoff("auto", threshold, median, sigma, z, population)
    return Bulk(median, sigma, z, combine_cutoffs(auto_cut, min_score))


def _sample_matrix(library: Library) -> np.ndarray:
    """The vectors of a fixed random sample of the library, read once per index state."""
    index = library.index
    key = (id(index), len(index))
    cached = _SAMPLES.get(library)
    if cached is not None and cached[0] == key:
        return cached[1]
    stored = index.background(CALIBRATION_SAMPLE) if hasattr(index, "background") else None
    if stored is not None:  # the index's stored sample: one read of 2 MB
        vectors = stored[1]
    else:
        ids = background_ids(index.ids(), CALIBRATION_SAMPLE)
        if ids is None:
            ids = index.ids()
        _, vectors = library.catalog.vectors(ids.tolist())
    matrix = vectors if len(vectors) else np.zeros((0, EMBED_DIM), np.float32)
    _SAMPLES[library] = (key, matrix)
    return matrix


def _semantic(library: Library, vector: np.ndarray, bulk: Bulk, pool: int, allowed):
    """The semantic candidates: the top ``pool`` (no cut-off) or every photo above the
    cut-off's threshold (a photo below it can only pass with words, found on that side)."""
    if bulk.cutoff is None:
        return top_hits(library, vector, pool, allowed)
    _, scores, ids = library.index.range_search(vector[None], bulk.cutoff.threshold, allowed)
    return collapse_frames(library, ids, scores)


def _cosines(library: Library, vector: np.ndarray, ids: list[int], known: dict) -> dict:
    """The cosine of the word hits not among the semantic candidates (their stored vector)."""
    missing = [i for i in ids if i not in known]
    if not missing:
        return {}
    found, vectors = library.catalog.vectors(missing)
    if not len(found):
        return {}
    return dict(zip(found.tolist(), _dot(vectors, vector).astype(np.float64).tolist()))


def _dot(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``matrix @ vector`` without BLAS threads: for a few thousand rows their start-up
    and hand-over cost more than the sums (measured: 30 ms instead of 0.5 ms on 2 busy
    cores)."""
    return np.einsum("ij,j->i", matrix, vector.astype(matrix.dtype, copy=False))


def _evidence(hits: list[TextHit], words: WordQuery) -> dict[int, float]:
    """Per word hit, 0..1: the weighted share of the query's words found, times
    0.9 + 0.1 * its bm25 relative to the best hit's."""
    total = sum(w for w in words.weights.values() if w > 0)
    if not hits or total <= 0:
        return {}
    best = max(h.score for h in hits) or 1.0
    evidence = {}
    for hit in hits:
        share = sum(words.weights.get(t, 0.0) for t in set(hit.terms)) / total
        evidence[hit.image_id] = min(1.0, share) * (0.9 + 0.1 * max(hit.score, 0.0) / best)
    return evidence


def _calibrated(cosine: dict[int, float], evidence: dict[int, float], bulk: Bulk) -> dict:
    shift = (bulk.z + 1.0) * bulk.sigma
    fused = {}
    for image_id, cos in cosine.items():
        f = math.atanh(min(max(cos, -FISHER_CLIP), FISHER_CLIP))
        fused[image_id] = math.tanh(f + evidence.get(image_id, 0.0) * shift)
    return fused


def _calibrated_keep(fused: dict[int, float], cutoff: Cutoff | None):
    if cutoff is None:
        return lambda image_id: True
    return lambda image_id: fused[image_id] >= cutoff.threshold


def _rrf(cosine: dict[int, float], hits: list[TextHit]) -> dict[int, float]:
    semantic_order = sorted(cosine, key=lambda i: (-cosine[i], i))
    fused = {i: 1.0 / (RRF_K + rank) for rank, i in enumerate(semantic_order, 1)}
    for rank, hit in enumerate(hits, 1):
        if hit.image_id in fused:
            fused[hit.image_id] += 1.0 / (RRF_K + rank)
    return fused


def _rrf_keep(cosine: dict[int, float], evidence: dict[int, float], cutoff: Cutoff | None):
    if cutoff is None:
        return lambda image_id: True
    return lambda i: cosine[i] >= cutoff.threshold or evidence.get(i, 0.0) >= 0.9


def _words_only(
    library: Library,
    hits: list[TextHit],
    words: WordQuery,
    options: SearchOptions,
    cutting: bool,
    faces: dict[int, int],
    allowed: np.ndarray | None,
) -> Ranking:
    """A query of word terms only: the word hits, scored by their evidence (0..1)."""
    evidence = _evidence(hits, words)
    ids = np.asarray([h.image_id for h in hits], dtype=np.int64)
    scores = np.asarray([evidence.get(h.image_id, 0.0) for h in hits], dtype=np.float64)
    ids, scores, rows = order_ranked(library, ids, scores, options.sort)
    ids, scores, raws = fold_pairs(ids, scores, faces, allowed)
    page = slice(options.offset, options.offset + options.k)
    page_ids = ids[page].tolist()
    matched = _page_matched(page_ids, {}, hits, raws)
    if rows is not None:
        rows.update(library.catalog.get_images([i for i in page_ids if i not in rows]))
    total = len(ids) if cutting else None
    page_raws = {i: raws[i] for i in page_ids if i in raws}
    return Ranking(page_ids, scores[page].tolist(), total, None, rows, None, page_raws, matched)


def _explain(cosine: float | None, hit: TextHit | None) -> dict:
    return {
        "semantic": None if cosine is None else round(float(cosine), 4),
        "text": list(hit.terms) if hit else [],
        "sources": list(hit.sources) if hit else [],
    }
