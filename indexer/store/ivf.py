"""The ``ivf`` vector store: FAISS IVF with compact codes and an exact re-rank.

What it holds: ``nlist`` centroids (spherical k-means over a sample of the library) and, per
photo, its id and a code of its residual to its list's centroid. Two codes (``CODES``):
``rabitq4`` (the default for new indexes: FAISS's RaBitQ with 4 bits a dimension, 276 bytes
a photo; its scan is ~1.7x faster than ``sq8`` at the same recall after re-rank, measured by
``bench/bench_scale.py``, which prints both) and ``sq8`` (8-bit scalar quantisation, 512
bytes a photo; indexes built before RaBitQ keep working). Against 2 KB a photo for the
``exact`` kind. What it answers:

- **top-k**: the ``nprobe`` lists nearest to the query are scanned on the codes for
  ``k + max(k, RERANK_EXTRA)`` candidates; their *full-precision* vectors are read from the
  vector source (the catalog, which holds every vector as float32: see
  :meth:`IVFIndex.attach_source`) and the candidates re-ranked exactly. Returned scores are
  exact cosines, so the adaptive cut-off and ``--min-score`` see the same numbers as with the
  exact kind; only a true neighbour outside the probed lists can be missed. ``nprobe`` is
  tuned when the index is built: the smallest that reaches ``RECALL_TARGET`` recall@10
  against an exact search on the library's own vectors (held-out queries), and the recall
  measured is kept with the index (``clipdex info`` shows it).
- **filters**: a selective filter (at most ``EXACT_FILTER_LIMIT`` allowed photos) is
  answered exactly, by brute force over the allowed photos' full vectors; a broad one
  filters *inside* the IVF scan (a FAISS ``IDSelector``) with ``nprobe`` scaled by
  1 / (allowed fraction), so as many allowed codes are scanned as without a filter.
- **range search** (cut-offs, a delta's duplicates): the probed lists are searched on the codes down
  to ``radius - margin`` (``margin`` bounds the code's score error, measured at build time),
  then the candidates are re-scored exactly and kept above ``radius``. A request for every
  score (``radius`` below -1: the auto cut-off's estimate of the bulk of a query's scores
  over a sample) is answered from the codes of the whole (allowed) set, within
  ``score_error`` of the exact scores: a robust median and MAD do not move at that scale.
- **near pairs** (duplicates of the whole library): each list's full vectors (read from the
  source one list at a time) against themselves and against the vectors whose nearest other
  centroids include the list; exact scores, nothing from the codes (:meth:`near_pairs`).

Without a vector source (a bare store, as in the protocol tests) scores come from the codes.

Building: :meth:`IVFIndex.build` samples the source for training, adds every vector and tunes
``nprobe``; ``open_store("ivf")`` then :meth:`add` also works: an untrained store trains
itself on its first batch (sized and tuned on that batch alone). The file is FAISS's own
serialisation of the IVF index (``nprobe`` included); the build report (nlist, nprobe,
measured recall, score error, how many vectors it was trained on) travels in the file's
stamp, which is checked like every kind's.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import faiss
import numpy as np

from indexer.errors import LibraryDamaged
from indexer.model.identity import EMBED_DIM
from indexer.store.vectors import check_count, read_faiss_index, save_faiss_index
from indexer.store.vectorstore import (
    damage_message,
    make_stamp,
    stamp_path,
)

# (ids) -> (found ids, their float32 vectors); ids it does not know are left out.
VectorFetch = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]

CODES = ("rabitq4", "sq8")  # code kinds; the first is what new indexes use
DEFAULT_CODES = CODES[0]
RECALL_TARGET = 0.98  # recall@10 vs exact search that nprobe is tuned to reach
TUNE_MARGIN = 0.005  # tuned to the target plus this: the held-out queries are a sample
TUNE_QUERIES = 200  # held-out queries per query type (image-like, text-like)
RERANK_EXTRA = 32  # candidates beyond k that are re-ranked exactly
EXACT_FILTER_LIMIT = 20_000  # allowed photos up to which a filtered search is brute force
SAMPLE_LIMIT = 50_000  # whole-distribution requests up to this size are kept in memory
MIN_MARGIN = 0.02  # lowest code-score margin for range searches
# Lists per sqrt(n) photos. Measured at 1M (bench/bench_scale.py, RaBitQ codes, recall@10
# after re-rank): 1000 lists need nprobe 96 (~96k codes a query) for 0.99, 2000 lists
# nprobe 96 (~48k codes) for 0.989: about 1.5x faster queries for a build that stays within
# minutes (4000 lists: k-means on 160k vectors took 3 min alone here, for little more).
LISTS_PER_ROOT = 2
TRAIN_PER_LIST = 40  # training vectors per centroid (FAISS warns below 39)
MIN_TRAIN = 20_000  # ... but at least this many when the library has them
FETCH_BATCH = 5_000
# Near-copies in different lists: each vector is also compared with the lists of its this
# many nearest other centroids. At 100k CLIP-like vectors (bench/bench_scale.py's), the
# pairs above 0.95 missed: 12 of 5,323 with one (11 of them in the third-nearest list), 1
# with two.
NEIGHBOUR_LISTS = 2
PAIR_BLOCK = 2_048  # rows of a list compared at once (a 2,048 x 50k block is 400 MB)
PAD_SCORE = np.float32(-3.4028235e38)  # what FAISS pads a short inner-product result with
SEED = 1234


@dataclass(frozen=True)
class PartJob:
    """What every part of a sharded build needs: the trained, empty index (FAISS's
    serialisation) and the tuning queries whose exact top-10 each part also computes."""

    trained: np.ndarray  # uint8: faiss.serialize_index of the trained empty index
    queries: np.ndarray
    exclude: np.ndarray


@dataclass(frozen=True)
class Part:
    """One batch of vectors encoded against the trained index: per non-empty list, its
    number, ids and codes (in the batch's order), and the batch's exact top-10 per query."""

    lists: list[tuple[int, np.ndarray, np.ndarray]]
    top_scores: np.ndarray
    top_ids: np.ndarray

    @property
    def count(self) -> int:
        return sum(len(ids) for _, ids, _ in self.lists)


# (job, batches of (ids, vectors)) -> the batches' parts, in the batches' order.
PartEncoder = Callable[[PartJob, Iterator[tuple[np.ndarray, np.ndarray]]], Iterator[Part]]


def encode_part(job: PartJob, ids: np.ndarray, vectors: np.ndarray) -> Part:
    """Assign ``vectors`` to their lists and quantise them, against the trained index in
    ``job`` (what a local build's ``add`` does for the batch), and their exact top-10 for
    the tuning queries. Pure: a cluster task runs it where the vectors are."""
    index = faiss.deserialize_index(np.ascontiguousarray(job.trained, np.uint8))
    ids = np.ascontiguousarray(ids, np.int64)
    rows = _rows(vectors, index.d).reshape(len(ids), index.d)
    index.add_with_ids(rows, ids)
    lists = []
    for number in range(index.nlist):
        size = index.invlists.list_size(number)
        if size:
            list_ids = faiss.rev_swig_ptr(index.invlists.get_ids(number), size).copy()
            codes = faiss.rev_swig_ptr(
                index.invlists.get_codes(number), size * index.code_size
            ).copy()
            lists.append((number, list_ids, codes))
    top = _TopK(job.queries, job.exclude, 10)
    top.update(ids, rows)
    return Part(lists, top.scores, top.ids)


def serial_parts(job: PartJob, batches) -> Iterator[Part]:
    """The :class:`PartEncoder` that encodes every batch here, one after the other (what a
    cluster's tasks do in parallel; the same parts)."""
    for ids, vectors in batches:
        yield encode_part(job, ids, vectors)


class VectorSource(Protocol):
    """What a build reads: the catalog (either kind) has these."""

    def count(self) -> int: ...
    def ids(self) -> np.ndarray: ...
    def vectors(self, ids) -> tuple[np.ndarray, np.ndarray]: ...
    def iter_vectors(self, batch: int = ...) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


def nlist_for(count: int) -> int:
    """Lists for ``count`` vectors: about ``LISTS_PER_ROOT`` * sqrt(n), 1 when tiny."""
    if count < 2_000:
        return 1
    return int(min(round(LISTS_PER_ROOT * math.sqrt(count)), count // TRAIN_PER_LIST))


class IVFIndex:
    """Approximate cosine search on compact codes, re-ranked exactly (the ``ivf`` kind)."""

    kind: ClassVar[str] = "ivf"

    def __init__(
        self,
        dim: int = EMBED_DIM,
        index: faiss.IndexIVF | None = None,
        params: dict | None = None,
        codes: str = DEFAULT_CODES,
    ) -> None:
        if codes not in CODES:
            raise ValueError(f"unknown ivf codes {codes!r} (one of {', '.join(CODES)})")
        self.dim = dim
        self.codes = _codes_of(index) if index is not None else codes
        self.index = index  # None until trained
        self.params: dict = dict(params or {})
        self._fetch: VectorFetch | None = None
        self.mmapped = False  # lists mapped from the file (read-only) instead of read in
        self._ids: np.ndarray | None = None  # cache of ids(), dropped on every change
        self._sample: tuple[bytes, np.ndarray, np.ndarray] | None = None  # see _sample_vectors
        self._excluded: tuple | None = None  # see _exclusion

    # -- the re-rank source ---------------------------------------------------------------
    def attach_source(self, fetch: VectorFetch | None) -> None:
        """Where full-precision vectors come from for the exact re-rank (the catalog's
        ``vectors``); without one, scores are the codes' approximations."""
        self._fetch = fetch

    def describe(self) -> dict:
        """What ``clipdex info`` shows: kind, size, lists, probes and the measured recall."""
        return {"kind": self.kind, "count": len(self), **self.params}

    @property
    def nlist(self) -> int:
        return int(self.index.nlist) if self.index is not None else 0

    @property
    def nprobe(self) -> int:
        return int(self.index.nprobe) if self.index is not None else 0

    @property
    def margin(self) -> float:
        return float(self.params.get("margin", MIN_MARGIN))

    # -- building -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        source: VectorSource,
        dim: int = EMBED_DIM,
        parts: PartEncoder | None = None,
        codes: str = DEFAULT_CODES,
    ) -> IVFIndex:
        """An index of every vector of ``source``: trained on a sample, nprobe tuned on
        held-out vectors against an exact search over all of them.

        ``parts`` (see :class:`PartEncoder`) encodes the batches elsewhere (a cluster's
        tasks: :mod:`indexer.ingest.cluster`): this process trains once, merges each
        batch's lists and exact top-10s in the source's order, and tunes. The result is the
        same index as without it (same ids in the same lists, same codes, same nprobe).
        ``codes``: one of :data:`CODES`.
        """
        store = cls(dim, codes=codes)
        store.attach_source(source.vectors)
        all_ids = source.ids()
        if not len(all_ids):
            return store
        rng = np.random.default_rng(SEED)
        nlist = nlist_for(len(all_ids))
        train_ids = _sample(rng, all_ids, max(MIN_TRAIN, TRAIN_PER_LIST * nlist))
        _, train = source.vectors(train_ids)
        store.train(train, nlist)
        store.params["built_for"] = len(all_ids)
        queries, exclude = _tuning_queries(rng, source, all_ids)
        truth = _TopK(queries, exclude, 10)
        if parts is None:
            for ids, vectors in source.iter_vectors():
                store.add(ids, vectors)
                truth.update(ids, vectors)
        else:
            job = PartJob(faiss.serialize_index(store.index), queries, exclude)
            for part in parts(job, source.iter_vectors()):
                store.merge_part(part)
                truth.merge(part.top_scores, part.top_ids)
        store.tune(queries, exclude, truth.result(), source.vectors)
        return store

    def merge_part(self, part: Part) -> None:
        """Append a part's list entries (encoded by :func:`encode_part` against this very
        trained index) to the lists: a copy of codes, nothing encoded again."""
        self._make_writable()
        lists = self.index.invlists
        for number, ids, codes in part.lists:
            ids = np.ascontiguousarray(ids, np.int64)
            codes = np.ascontiguousarray(codes, np.uint8)
            lists.add_entries(int(number), len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
            self.index.ntotal += len(ids)
        self._ids = self._sample = None

    def train(self, sample: np.ndarray, nlist: int) -> None:
        """Train ``nlist`` centroids (and the codes' quantiser) on ``sample`` (unit rows)."""
        sample = _rows(sample, self.dim)
        nlist = max(1, min(int(nlist), len(sample)))
        index = _new_index(self.dim, nlist, self.codes)
        index.cp.seed = SEED
        index.train(sample)
        index.nprobe = nlist  # until tuned: scan everything
        self.index = index
        self.params = {
            "nlist": nlist,
            "nprobe": nlist,
            "trained_on": len(sample),
            "codes": self.codes,
        }

    def tune(
        self, queries: np.ndarray, exclude: np.ndarray, truth: np.ndarray, fetch: VectorFetch
    ) -> None:
        """Set nprobe to the smallest that reaches RECALL_TARGET (+ TUNE_MARGIN) recall@10
        vs ``truth``.

        ``truth`` holds each query's exact top-10 ids; ``exclude`` the id each query may not
        return (a held-out library vector is not its own neighbour), -1 for none.
        """
        if self.index is None or not len(queries):
            return
        fetch = _memo(fetch)
        chosen = None
        for nprobe in _probe_ladder(self.nlist):
            found, approx_error = self._tuning_search(queries, exclude, nprobe, fetch)
            recall10 = _recall(found, truth, 10)
            chosen = (nprobe, recall10, _recall(found, truth, 1), approx_error)
            if recall10 >= RECALL_TARGET + TUNE_MARGIN:
                break
        nprobe, recall10, recall1, error = chosen
        self.index.nprobe = nprobe
        self.params.update(
            nprobe=nprobe,
            recall_at_10=round(recall10, 4),
            recall_at_1=round(recall1, 4),
            recall_target=RECALL_TARGET,
            recall_queries=len(queries),
            score_error=round(error, 5),
            margin=round(max(MIN_MARGIN, 2 * error), 4),
        )

    def _tuning_search(self, queries, exclude, nprobe, fetch) -> tuple[np.ndarray, float]:
        """Top-10 ids per query through the real pipeline at ``nprobe`` (own id dropped),
        and the largest |code score - exact score| seen among the candidates."""
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        approx, cand = self.index.search(queries, 11 + RERANK_EXTRA, params=params)
        exact = _exact_scores(queries, cand, fetch, self.dim)
        known = np.isfinite(exact) & (cand >= 0)
        error = float(np.max(np.abs(approx[known] - exact[known]))) if known.any() else 0.0
        exact[cand == exclude[:, None]] = -np.inf
        _, ids = _top_rows(exact, cand, 10)
        return ids, error

    # -- persistence ----------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, *, mmap: bool = False, verify: bool = True) -> IVFIndex:
        """Read an index file; ``mmap`` maps its lists read-only (a query then reads only
        the lists it probes), else they are read in. See the protocol."""
        path = Path(path)
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index, stamp = read_faiss_index(path, cls.kind, flags, verify)
        params = _stamp_params(path) if stamp is not None else {}
        # read_index returns the concrete class (downcast_index would hand back a proxy that
        # does not own the index, freed with the one that does).
        if not isinstance(index, _INDEX_CLASSES):
            raise LibraryDamaged(damage_message(path, "not an IVF index of a known code"))
        check_count(path, index, stamp)
        if not index.is_trained:
            return cls(index.d, codes=_codes_of(index))
        if mmap:
            _no_prefetch(index)
        loaded = cls(index.d, index, params)
        loaded.mmapped = mmap
        return loaded

    def save(self, path: Path) -> None:
        """Write atomically with a stamp (which carries the build report); see the protocol."""
        # An untrained store is written as an untrained one-list index: loads back empty.
        index = self.index if self.index is not None else _new_index(self.dim, 1, self.codes)
        save_faiss_index(
            path,
            index,
            lambda size, crc: {
                **make_stamp(self.kind, len(self), self.dim, size, crc),
                "params": self.params,
            },
        )

    def in_memory(self) -> IVFIndex:
        """A writable copy of a mapped index (self when not mapped): FAISS cannot change
        mapped lists, so they are copied into memory."""
        if not self.mmapped:
            return self
        copy = IVFIndex(self.dim, _writable_copy(self.index), self.params, self.codes)
        copy.attach_source(self._fetch)
        return copy

    def folded(
        self, add_ids: np.ndarray, add_vectors: np.ndarray, dead_ids: np.ndarray
    ) -> IVFIndex:
        """A new store: this one's lists (copied: this one is left as it is, and searches
        on it go on) without ``dead_ids`` and with the vectors added, encoded against the
        same centroids. No training, no tuning: the cost follows the change (a compaction
        of a big library; re-training is :func:`~indexer.store.kindchoice.needs_retraining`'s
        call, which reads ``built_for``, kept here like the rest of the build report)."""
        if self.index is None:
            copy = IVFIndex(self.dim, codes=self.codes)
        else:
            copy = IVFIndex(self.dim, _writable_copy(self.index), self.params, self.codes)
        copy.attach_source(self._fetch)
        copy.remove(np.asarray(dead_ids, np.int64))
        copy.add(np.asarray(add_ids, np.int64), add_vectors)
        return copy

    def _make_writable(self) -> None:
        if self.mmapped:
            self.index, self.mmapped = _writable_copy(self.index), False

    # -- contents -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.index.ntotal) if self.index is not None else 0

    def ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = _list_ids(self.index) if self.index is not None else np.zeros(0, np.int64)
        return self._ids

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors; an untrained store first trains on this batch and tunes on it."""
        if len(ids) == 0:
            return
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = _rows(vectors, self.dim).reshape(len(ids), self.dim)
        self._make_writable()
        first = self.index is None
        if first:
            self.train(vectors, nlist_for(len(ids)))
            self.params["built_for"] = len(ids)
        self.index.add_with_ids(vectors, ids)
        self._ids = self._sample = None
        if first:
            self._tune_on_batch(ids, vectors)

    def _tune_on_batch(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Tune nprobe when the store trained itself on its first batch: the batch is all
        it holds, so the exact truth comes from the batch itself."""
        rng = np.random.default_rng(SEED)
        source = _ArraySource(ids, vectors)
        queries, exclude = _tuning_queries(rng, source, ids)
        truth = _TopK(queries, exclude, 10)
        truth.update(ids, vectors)
        self.tune(queries, exclude, truth.result(), source.vectors)

    def remove(self, ids: np.ndarray) -> int:
        if len(ids) == 0 or self.index is None:
            return 0
        self._make_writable()
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        removed = int(self.index.remove_ids(selector))
        self._ids = self._sample = None
        return removed

    # -- search ---------------------------------------------------------------------------
    # A caller that hides ids (the segments' tombstones) passes them as ``excluded_ids``: they
    # are skipped inside the scan, instead of asking for k + len(hidden) hits and re-ranking
    # (reading from the catalog) that many candidates per query.
    excludes: ClassVar[bool] = True

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed_ids: np.ndarray | None = None,
        excluded_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row, exact scores; see the module docstring.
        ``excluded_ids`` (only without ``allowed_ids``): ids never returned."""
        queries = _rows(queries, self.dim)
        if len(self) == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        k = max(1, min(int(k), len(self)))
        if allowed_ids is not None:
            allowed_ids = np.ascontiguousarray(allowed_ids, dtype=np.int64)
            if len(allowed_ids) <= EXACT_FILTER_LIMIT and self._fetch is not None:
                return self._brute_force(queries, k, allowed_ids)
        params = self._params(allowed_ids, excluded=excluded_ids)
        approx, cand = self.index.search(queries, k + max(k, RERANK_EXTRA), params=params)
        if self._fetch is None:
            return approx[:, :k], cand[:, :k]
        exact = _exact_scores(queries, cand, self._fetch, self.dim)
        return _top_rows(exact, cand, k)

    def _brute_force(self, queries, k, allowed) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the full vectors of a small allowed set."""
        found, vectors = _fetch_all(self._fetch, allowed, self.dim)
        if not len(found):
            pad = np.full((len(queries), k), PAD_SCORE, np.float32)
            return pad, np.full((len(queries), k), -1, np.int64)
        scores = queries @ vectors.T
        cand = np.broadcast_to(found, scores.shape)
        return _top_rows(scores, cand, k)

    def range_search(
        self, queries: np.ndarray, radius: float, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (allowed) vector scoring above ``radius``, exact scores; see the module
        docstring (a radius below -1 returns every allowed vector with its code score)."""
        queries = _rows(queries, self.dim)
        if len(self) == 0:
            empty = np.zeros(0, np.float32), np.zeros(0, np.int64)
            return np.zeros(len(queries) + 1, np.int64), *empty
        radius = float(radius)
        if allowed_ids is not None:
            allowed_ids = np.ascontiguousarray(allowed_ids, dtype=np.int64)
        if radius < -1.0 and allowed_ids is not None and len(allowed_ids) <= SAMPLE_LIMIT:
            found, vectors = self._sample_vectors(allowed_ids)
            scores = queries @ vectors.T
            lims = np.arange(len(queries) + 1, dtype=np.int64) * len(found)
            return lims, scores.ravel().astype(np.float32), np.tile(found, len(queries))
        if radius < -1.0:  # every score: from the codes of the whole (allowed) set
            params = self._params(allowed_ids, nprobe=self.nlist)
            lims, scores, ids = self.index.range_search(queries, -3.0, params=params)
            return lims.astype(np.int64), scores, ids.astype(np.int64)
        if self._fetch is None:
            params = self._params(allowed_ids)
            lims, scores, ids = self.index.range_search(queries, radius, params=params)
            return lims.astype(np.int64), scores, ids.astype(np.int64)
        if allowed_ids is not None and len(allowed_ids) <= EXACT_FILTER_LIMIT:
            return self._brute_force_range(queries, radius, allowed_ids)
        params = self._params(allowed_ids)
        lims, _, cand = self.index.range_search(queries, radius - self.margin, params=params)
        return self._rescore_range(queries, radius, lims.astype(np.int64), cand.astype(np.int64))

    def near_pairs(
        self, radius: float, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair of (allowed) stored vectors scoring above ``radius`` (a high one: near-
        copies), as (ids a, ids b, exact scores), each pair once or twice, never (x, x).

        Through the lists, not all pairs: each vector is compared with the vectors of its
        own list and with those whose nearest other centroids (``NEIGHBOUR_LISTS``) include
        that list (near-copies fall in one list or in neighbouring ones), with BLAS: pairs
        within each list, then each list against its guests (the vectors whose nearest
        other centroids include it). The comparisons and the neighbouring lists are on the
        source's full vectors, read one list at a time (memory: a list, not the library;
        each list is read twice, each vector once more per neighbouring list). Without a
        source, on vectors decoded from the codes, held in memory: approximate scores,
        close for sq8 codes, coarse for RaBitQ's (made for estimating scores to a query,
        not for decoding).
        """
        if self.index is None or len(self) < 2:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        fetch = self._fetch
        if fetch is None:
            fetch = _ArraySource(*_decode_ids(self.index, allowed_ids)).vectors
        members = [ids for ids, _ in _list_members(self.index, allowed_ids)]
        centroids = _centroids(self.index)
        guests: list[list[np.ndarray]] = [[] for _ in members]
        found: list[tuple] = []
        for number, ids in enumerate(members):
            ids, vectors = _fetch_all(fetch, ids, self.dim)
            members[number] = ids  # those the source knows, in the order it gave them
            if not len(ids):
                continue
            found.append(_pairs_within(ids, vectors, radius))
            for target, rows in _neighbour_list_rows(vectors, centroids, number):
                guests[target].append(ids[rows])
        for number, ids in enumerate(members):
            if not len(ids) or not guests[number]:
                continue
            _, vectors = _fetch_all(fetch, ids, self.dim)
            guest_ids, guest_vectors = _fetch_all(fetch, np.concatenate(guests[number]), self.dim)
            found.append(_pairs_across(ids, vectors, guest_ids, guest_vectors, radius))
        return _joined(found)

    def _exclusion(self, excluded: np.ndarray):
        """A selector of every id but ``excluded``, kept while the same ids are asked for
        (the tombstones change at a checkpoint, not per query)."""
        excluded = np.ascontiguousarray(excluded, dtype=np.int64)
        key = len(excluded).to_bytes(8, "little") + zlib.crc32(excluded.tobytes()).to_bytes(
            4, "little"
        )
        if self._excluded is None or self._excluded[0] != key:
            batch = faiss.IDSelectorBatch(excluded)
            self._excluded = (key, batch, faiss.IDSelectorNot(batch))
        return self._excluded[1], self._excluded[2]

    def _sample_vectors(self, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Full vectors of a set asked for whole again and again (the auto cut-off's fixed
        background sample), read once (from the source, else decoded) and kept."""
        key = len(allowed).to_bytes(8, "little") + zlib.crc32(allowed.tobytes()).to_bytes(
            4, "little"
        )
        if self._sample is None or self._sample[0] != key:
            if self._fetch is not None:
                found, vectors = _fetch_all(self._fetch, allowed, self.dim)
            else:
                found, vectors = _decode_ids(self.index, allowed)
            self._sample = (key, found, vectors)
        return self._sample[1], self._sample[2]

    def _brute_force_range(self, queries, radius, allowed):
        found, vectors = _fetch_all(self._fetch, allowed, self.dim)
        scores = queries @ vectors.T if len(found) else np.zeros((len(queries), 0), np.float32)
        keep = scores > radius
        lims = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)
        rows, cols = np.nonzero(keep)
        return lims, scores[rows, cols].astype(np.float32), found[cols].astype(np.int64)

    def _rescore_range(self, queries, radius, lims, cand):
        """Exact scores for range candidates (row i: ``cand[lims[i]:lims[i+1]]``)."""
        rows = np.repeat(np.arange(len(queries)), np.diff(lims))
        found, vectors = _fetch_all(self._fetch, np.unique(cand), self.dim)
        position = _positions(found, cand)
        known = position >= 0
        rows, cand, position = rows[known], cand[known], position[known]
        scores = np.einsum("ij,ij->i", queries[rows], vectors[position]).astype(np.float32)
        keep = scores > radius
        rows, cand, scores = rows[keep], cand[keep], scores[keep]
        counts = np.bincount(rows, minlength=len(queries))
        lims = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return lims, scores, cand

    def _params(
        self,
        allowed: np.ndarray | None,
        nprobe: int | None = None,
        excluded: np.ndarray | None = None,
    ):
        """Search parameters: nprobe (scaled up by a filter's selectivity) and the filter
        (the allowed ids, else every id but the excluded ones)."""
        nprobe = nprobe or self.nprobe
        if allowed is None and excluded is not None and len(excluded):
            batch, selector = self._exclusion(excluded)
            params = faiss.SearchParametersIVF(nprobe=nprobe, sel=selector)
            params._selector = (batch, selector)  # the parameters do not own them
            return params
        if allowed is None:
            return faiss.SearchParametersIVF(nprobe=nprobe)
        fraction = max(len(allowed), 1) / max(len(self), 1)
        nprobe = min(self.nlist, math.ceil(nprobe / min(1.0, fraction)))
        selector = faiss.IDSelectorBatch(allowed)
        params = faiss.SearchParametersIVF(nprobe=nprobe, sel=selector)
        params._selector = selector  # the parameters do not own it: keep it alive
        return params


# -- helpers ------------------------------------------------------------------------------
_INDEX_CLASSES = (faiss.IndexIVFRaBitQ, faiss.IndexIVFScalarQuantizer)
RABITQ_BITS = 4  # bits a dimension: 3 loses recall after re-rank, 4 matches sq8's


def _no_prefetch(index: faiss.IndexIVF) -> None:
    """Stop a mapped index from starting prefetch threads on every search.

    FAISS maps an IVF file's lists as ``OnDiskInvertedLists``, whose searches first start
    ``prefetch_nthread`` (32) threads that read the probed lists ahead: meant for lists on
    a slow disk, here it cost a single query ~3.5 ms of thread start-ups on 2 cores at 1M
    (bench/bench_warm_query.py), while the lists are in the page cache and read by the scan
    itself anyway. Answers are the same (only the read-ahead is skipped)."""
    lists = faiss.downcast_InvertedLists(index.invlists)
    if isinstance(lists, faiss.OnDiskInvertedLists):
        lists.prefetch_nthread = 0


def _codes_of(index: faiss.IndexIVF) -> str:
    return "rabitq4" if isinstance(index, faiss.IndexIVFRaBitQ) else "sq8"


def _new_index(dim: int, nlist: int, codes: str = DEFAULT_CODES) -> faiss.IndexIVF:
    quantizer = faiss.IndexFlatIP(dim)
    if codes == "rabitq4":
        index = faiss.IndexIVFRaBitQ(
            quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT, True, RABITQ_BITS
        )
    else:
        index = faiss.IndexIVFScalarQuantizer(
            quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
    index.own_fields = True
    quantizer.this.disown()  # owned by the IVF index now
    index.cp.spherical = True  # unit centroids: inner product is cosine
    index.cp.min_points_per_centroid = 1  # a small library gets few lists: no FAISS warning
    index.cp.niter = 12  # k-means iterations (FAISS: 25); recall is measured after anyway
    return index


def _rows(array: np.ndarray, dim: int) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float32).reshape(-1, dim)


def _sample(rng: np.random.Generator, ids: np.ndarray, size: int) -> np.ndarray:
    if len(ids) <= size:
        return ids
    return np.sort(rng.choice(ids, size=size, replace=False))


def _list_ids(index: faiss.IndexIVF) -> np.ndarray:
    """Every id stored in the inverted lists."""
    lists = index.invlists
    parts = []
    for number in range(index.nlist):
        size = lists.list_size(number)
        if size:
            parts.append(faiss.rev_swig_ptr(lists.get_ids(number), size).copy())
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _list_members(index: faiss.IndexIVF, allowed: np.ndarray | None):
    """Per list: (ids, codes) of its entries, only allowed ids if restricted."""
    out = []
    for number in range(index.nlist):
        size = index.invlists.list_size(number)
        if not size:
            out.append((np.zeros(0, np.int64), np.zeros((0, index.code_size), np.uint8)))
            continue
        ids = faiss.rev_swig_ptr(index.invlists.get_ids(number), size).astype(np.int64)
        codes = faiss.rev_swig_ptr(index.invlists.get_codes(number), size * index.code_size)
        codes = np.asarray(codes).reshape(size, index.code_size)
        if allowed is not None:
            keep = np.isin(ids, allowed)
            ids, codes = ids[keep], codes[keep]
        out.append((ids, codes))
    return out


def _decode(index: faiss.IndexIVF, number: int, codes: np.ndarray) -> np.ndarray:
    """Vectors decoded from the codes of list ``number`` (centroid added back): FAISS's
    ``sa_decode`` takes each code behind its list number, so that is put in front."""
    if not len(codes):
        return np.zeros((0, index.d), np.float32)
    width = index.coarse_code_size()
    prefix = np.frombuffer(int(number).to_bytes(8, "little")[:width], np.uint8)
    full = np.hstack([np.broadcast_to(prefix, (len(codes), width)), codes])
    return index.sa_decode(np.ascontiguousarray(full, dtype=np.uint8))


def _writable_copy(index: faiss.IndexIVF) -> faiss.IndexIVF:
    """An in-memory copy of an IVF index whose lists are mapped from its file (FAISS's
    clone_index does not copy mapped lists)."""
    copy = _new_index(index.d, index.nlist, _codes_of(index))
    copy.quantizer.add(np.ascontiguousarray(_centroids(index)))
    if isinstance(index, faiss.IndexIVFScalarQuantizer):
        copy.sq.trained = index.sq.trained
    else:  # RaBitQ codes hold no trained state beyond the centroids
        copy.qb = index.qb
    copy.by_residual = index.by_residual
    copy.is_trained = True
    copy.nprobe = index.nprobe
    lists = index.invlists
    for number in range(index.nlist):
        size = lists.list_size(number)
        if size:
            copy.invlists.add_entries(number, size, lists.get_ids(number), lists.get_codes(number))
    copy.ntotal = index.ntotal
    return copy


def _decode_ids(index: faiss.IndexIVF, wanted: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors decoded from the codes) of the stored ids among ``wanted`` (None: all)."""
    lists = [
        (ids, _decode(index, number, codes))
        for number, (ids, codes) in enumerate(_list_members(index, wanted))
        if len(ids)
    ]
    if not lists:
        return np.zeros(0, np.int64), np.zeros((0, index.d), np.float32)
    return np.concatenate([ids for ids, _ in lists]), np.vstack([v for _, v in lists])


def _centroids(index: faiss.IndexIVF) -> np.ndarray:
    flat = faiss.downcast_index(index.quantizer)
    return faiss.rev_swig_ptr(flat.get_xb(), index.nlist * index.d).reshape(index.nlist, index.d)


def _neighbour_list_rows(vectors: np.ndarray, centroids: np.ndarray, number: int):
    """(other list, rows of ``vectors``) for the rows of list ``number`` whose nearest
    ``NEIGHBOUR_LISTS`` other centroids include that list."""
    count = min(NEIGHBOUR_LISTS, len(centroids) - 1)
    if count < 1 or not len(vectors):
        return []
    scores = vectors @ centroids.T  # numpy's BLAS: many small FAISS calls cost more
    scores[:, number] = -np.inf  # the own list is not a neighbour
    nearest = np.argpartition(-scores, count - 1, axis=1)[:, :count]
    rows = np.repeat(np.arange(len(vectors)), count)
    targets = nearest.ravel()
    return [(int(target), rows[targets == target]) for target in np.unique(targets)]


def _pairs_within(ids: np.ndarray, vectors: np.ndarray, floor: float):
    """(a, b, score) of the pairs of one list's vectors scoring above ``floor``, once each;
    in blocks of rows, so a crowded list never needs its whole Gram matrix at once."""
    found = []
    for start in range(0, len(ids), PAIR_BLOCK):
        scores = vectors[start : start + PAIR_BLOCK] @ vectors[start:].T
        rows, cols = np.nonzero(scores > floor)
        later = cols > rows  # the block's own diagonal and below: (x, x) and repeats
        rows, cols = rows[later], cols[later]
        found.append((ids[start + rows], ids[start + cols], scores[rows, cols]))
    return _joined(found)


def _pairs_across(ids, vectors, other_ids, other_vectors, floor: float):
    """(a, b, score) of the pairs (one of ``ids``, one of ``other_ids``) above ``floor``."""
    found = []
    for start in range(0, len(ids), PAIR_BLOCK):
        scores = vectors[start : start + PAIR_BLOCK] @ other_vectors.T
        rows, cols = np.nonzero(scores > floor)
        found.append((ids[start + rows], other_ids[cols], scores[rows, cols]))
    return _joined(found)


def _joined(found: list[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a, b, scores = (np.concatenate(column) for column in zip(*found))
    return a, b, scores.astype(np.float32)


def _positions(found: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row of each ``wanted`` id in ``found`` (-1 where absent)."""
    if not len(found):
        return np.full(wanted.shape, -1, np.int64)
    order = np.argsort(found)
    where = np.searchsorted(found, wanted, sorter=order)
    where = np.minimum(where, len(found) - 1)
    position = order[where]
    return np.where(found[position] == wanted, position, -1)


def _fetch_all(fetch: VectorFetch, ids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Full vectors of ``ids`` (those the source knows), in batches."""
    found_parts, vector_parts = [], []
    for start in range(0, len(ids), FETCH_BATCH):
        found, vectors = fetch(ids[start : start + FETCH_BATCH])
        if len(found):
            found_parts.append(np.asarray(found, np.int64))
            vector_parts.append(_rows(vectors, dim))
    if not found_parts:
        return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    return np.concatenate(found_parts), np.vstack(vector_parts)


def _exact_scores(queries: np.ndarray, cand: np.ndarray, fetch: VectorFetch, dim: int):
    """Exact scores of the candidate ids per row; -inf where the id is padding or unknown."""
    valid = cand[cand >= 0]
    found, vectors = _fetch_all(fetch, np.unique(valid), dim)
    position = _positions(found, cand)
    scores = np.full(cand.shape, -np.inf, np.float32)
    rows, cols = np.nonzero(position >= 0)
    scores[rows, cols] = np.einsum("ij,ij->i", queries[rows], vectors[position[rows, cols]])
    return scores


def _top_rows(scores: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k best (score desc, id asc), padded like FAISS (-FLT_MAX, id -1)."""
    cand = np.broadcast_to(cand, scores.shape)
    out_scores = np.full((len(scores), k), PAD_SCORE, np.float32)
    out_ids = np.full((len(scores), k), -1, np.int64)
    for row in range(len(scores)):
        keep = np.isfinite(scores[row]) & (cand[row] >= 0)
        row_scores, row_ids = scores[row][keep], cand[row][keep]
        if len(row_scores) > 4 * k:
            part = np.argpartition(-row_scores, k)[: k + 1]
            row_scores, row_ids = row_scores[part], row_ids[part]
        order = np.lexsort((row_ids, -row_scores))[:k]
        out_scores[row, : len(order)] = row_scores[order]
        out_ids[row, : len(order)] = row_ids[order]
    return out_scores, out_ids


def _memo(fetch: VectorFetch) -> VectorFetch:
    """``fetch`` with a cache: tuning asks for the same candidates at every nprobe."""
    cache: dict[int, np.ndarray] = {}

    def cached(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        missing = np.asarray([i for i in ids.tolist() if i not in cache], np.int64)
        if len(missing):
            found, vectors = fetch(missing)
            cache.update(zip(np.asarray(found).tolist(), np.asarray(vectors)))
        known = [i for i in ids.tolist() if i in cache]
        if not known:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        return np.asarray(known, np.int64), np.vstack([cache[i] for i in known])

    return cached


class _ArraySource:
    """Vectors held in memory, looked up by id (tuning on an in-memory batch; a bare store's
    decoded vectors for near pairs); the ids are sorted once, not per lookup."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._ids, self._vectors = np.asarray(ids, np.int64), vectors
        self._order = np.argsort(self._ids, kind="stable")
        self._sorted = self._ids[self._order]

    def vectors(self, wanted) -> tuple[np.ndarray, np.ndarray]:
        wanted = np.asarray(wanted, np.int64)
        if not len(self._ids):
            return wanted[:0], self._vectors[:0]
        where = np.minimum(np.searchsorted(self._sorted, wanted), len(self._ids) - 1)
        held = self._sorted[where] == wanted
        return wanted[held], self._vectors[self._order[where[held]]]


def _tuning_queries(rng, source, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Held-out queries: library vectors (leave-one-out: not their own neighbour) and
    text-like ones (a library vector under heavy isotropic noise, cosine ~0.5 to it: their
    neighbours are spread like a CLIP text query's, the harder case for IVF)."""
    picked = _sample(rng, ids, TUNE_QUERIES)
    found, vectors = source.vectors(picked)
    if not len(found):
        return np.zeros((0, EMBED_DIM), np.float32), np.zeros(0, np.int64)
    vectors = _rows(vectors, vectors.shape[1])
    noise = rng.standard_normal(vectors.shape).astype(np.float32)
    noise *= np.sqrt(3.0) / np.linalg.norm(noise, axis=1, keepdims=True)  # cos = 1/2
    text_like = vectors + noise
    text_like /= np.linalg.norm(text_like, axis=1, keepdims=True)
    queries = np.vstack([vectors, text_like]).astype(np.float32)
    exclude = np.concatenate([found, np.full(len(found), -1, np.int64)])
    return queries, exclude


class _TopK:
    """Exact top-k ids per query over vectors streamed in batches (the tuning truth)."""

    def __init__(self, queries: np.ndarray, exclude: np.ndarray, k: int) -> None:
        self.queries, self.exclude, self.k = queries, exclude, k
        self.scores = np.full((len(queries), 0), -np.inf, np.float32)
        self.ids = np.zeros((len(queries), 0), np.int64)

    def update(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(self.queries):
            return
        scores = self.queries @ _rows(vectors, self.queries.shape[1]).T
        scores[ids[None, :] == self.exclude[:, None]] = -np.inf
        scores = np.hstack([self.scores, scores])
        all_ids = np.hstack([self.ids, np.broadcast_to(ids, (len(self.queries), len(ids)))])
        keep = min(self.k, scores.shape[1])
        part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        self.scores = np.take_along_axis(scores, part, axis=1)
        self.ids = np.take_along_axis(all_ids, part, axis=1)

    def merge(self, scores: np.ndarray, ids: np.ndarray) -> None:
        """Fold in another batch's top-k (its ``scores``/``ids``, as :meth:`update` keeps
        them): the same top-k as updating with that batch's vectors."""
        if not len(self.queries):
            return
        scores = np.hstack([self.scores, scores])
        all_ids = np.hstack([self.ids, ids])
        keep = min(self.k, scores.shape[1])
        if keep == 0:
            return
        part = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        self.scores = np.take_along_axis(scores, part, axis=1)
        self.ids = np.take_along_axis(all_ids, part, axis=1)

    def result(self) -> np.ndarray:
        """Each query's top-k ids, best first."""
        order = np.argsort(-self.scores, axis=1, kind="stable")
        return np.take_along_axis(self.ids, order, axis=1)


def _recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of each query's exact top-k (by score) found in its returned top-k."""
    if not len(truth):
        return 1.0
    hits = [
        len(set(f[:k].tolist()) & set(t[:k].tolist())) / min(k, len(t))
        for f, t in zip(found, truth)
    ]
    return float(np.mean(hits))


PROBES = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128)
PROBES_WIDE = (160, 192, 256, 320, 384, 512)


def _probe_ladder(nlist: int) -> list[int]:
    """The nprobe values tuning tries, in order (steps of ~1/8 near the usual choice)."""
    return sorted({p for p in (*PROBES, *PROBES_WIDE) if p < nlist} | {nlist})


def _stamp_params(path: Path) -> dict:
    """The build report saved in the stamp (empty if absent or unreadable)."""
    try:
        params = json.loads(stamp_path(path).read_bytes()).get("params", {})
    except (OSError, ValueError):
        return {}
    return params if isinstance(params, dict) else {}
