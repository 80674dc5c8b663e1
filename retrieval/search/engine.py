"""The query engine: turns texts, images and photo ids into vectors, ranks a library.

It is handed a :class:`~indexer.store.library.Library` and an encoder (or a zero-argument
callable that builds one, so a query by photo id never loads a model). Its one query method,
:meth:`SearchEngine.search`, ranks the library for a vector under
:class:`~retrieval.search.options.SearchOptions` and returns a :class:`SearchPage`; the
front door (:mod:`retrieval.collection`) makes the vector, the interfaces format the page.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from indexer.errors import NotFound
from indexer.model.identity import Encoder
from indexer.store.library import Library
from retrieval.search.cutoff import Cutoff
from retrieval.search.errors import QueryError
from retrieval.search.fusion import add_snippets, rank_fused, restrict, word_query
from retrieval.search.options import MAX_K, SearchOptions
from retrieval.search.pairs import RawPairs
from retrieval.search.query import Term, combine, parse_query, photo_terms
from retrieval.search.ranking import Ranking, rank
from retrieval.search.text import check_text


@dataclass
class SearchResult:
    """One hit with the metadata every interface shows."""

    id: int
    path: str
    score: float
    width: int
    height: int
    taken_at: str | None
    tags: list[dict] | None = None  # [{"label", "score"}] once `clipdex tag` has run
    kind: str = "photo"
    frame_time: float | None = None  # videos: seconds into the video of the best frame
    duration: float | None = None  # videos: seconds
    raw: dict | None = None  # {"id", "path"} of the RAW shot with this photo (pairs.py)
    matched: dict | None = None  # fused searches: why it matched (retrieval.search.fusion)

    def as_dict(self) -> dict:
        """The result as JSON; a video's carries ``kind``, ``frame_time`` and ``duration``;
        a result of a search that also read words carries ``matched``."""
        document = asdict(self)
        for optional in ("tags", "raw", "matched"):
            if document[optional] is None:
                del document[optional]
        if self.kind == "photo":  # photos keep their original shape
            for key in ("kind", "frame_time", "duration"):
                del document[key]
        return document


@dataclass
class SearchPage:
    """One page of results, with the size of the kept list and the cut-off that made it."""

    results: list[SearchResult]
    total: int | None  # how many passed the cut-off (None: no cut-off, the list is top-k)
    cutoff: Cutoff | None
    options: SearchOptions
    terms: list[Term] | None = None  # the parsed query, when the page answers one
    fusion: str | None = None  # how meaning and words were fused; None: meaning only

    def as_dict(self) -> dict:
        return {
            "results": [r.as_dict() for r in self.results],
            "total": self.total,
            "offset": self.options.offset,
            "k": self.options.k,
            "sort": self.options.sort,
            "cutoff": self.cutoff.as_dict() if self.cutoff else None,
            **({"terms": [t.as_dict() for t in self.terms]} if self.terms is not None else {}),
            **({"fusion": self.fusion} if self.fusion is not None else {}),
        }


class SearchEngine:
    """Answers queries over one library with one model."""

    def __init__(
        self,
        library: Library,
        encoder: Encoder | Callable[[], Encoder],
        max_megapixels: float | None = None,
    ) -> None:
        """``max_megapixels`` bounds the images a query decodes (None: the decoder's
        default)."""
        self.library = library
        self._encoder = encoder
        self.max_megapixels = max_megapixels
        self.pairs = RawPairs()  # RAW+JPEG pairs, kept until the catalog changes

    @property
    def encoder(self) -> Encoder:
        """The encoder, built on first use and checked against the library's model."""
        if callable(self._encoder) and not isinstance(self._encoder, Encoder):
            self._encoder = self._encoder()
        self.library.check_model(self._encoder.identity)
        return self._encoder

    # -- query vectors ------------------------------------------------------------------
    def embed_image(self, source: str | os.PathLike | bytes) -> np.ndarray:
        """The unit vector of an image file or its bytes (checked against the library)."""
        return embed_image(self.encoder, source, self.max_megapixels)

    def vector_of(self, image_id: int) -> np.ndarray:
        """The stored vector of an indexed photo; of a video, the mean of its frames'."""
        times, frames = self.library.catalog.video_frames(image_id)
        if len(times) > 1:
            mean = frames.mean(axis=0)
            return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
        ids, vectors = self.library.catalog.vectors([image_id])
        if not len(ids):
            raise NotFound(f"no photo with id {image_id} in the library: see `clipdex search`")
        return vectors[0]

    def resolve_photo(self, ref: str | int) -> int | None:
        """The id of an indexed photo given as an id or a path; None for an unindexed file.
        An ``int`` is always an id; a string of digits is one unless such a file exists."""
        if isinstance(ref, int):
            return ref
        text = str(ref)
        if text.isdigit() and not Path(text).exists():
            return int(text)
        if "://" in text:  # a photo indexed from object storage, by its URI as stored
            image_id = self.library.catalog.id_for_path(text.rstrip("/"))
            if image_id is None:
                raise NotFound(f"{text} is not a photo in the library: index it first")
            return image_id
        image_id = self.library.catalog.id_for_path(os.path.abspath(os.path.expanduser(text)))
        if image_id is None and not Path(text).exists():
            raise NotFound(f"{text} is neither a photo id in the library nor an existing file")
        return image_id

    def photo_vector(self, ref: str | int) -> np.ndarray:
        """The vector of an indexed photo (id or path; no model call) or of any image file."""
        image_id = self.resolve_photo(ref)
        return self.vector_of(image_id) if image_id is not None else self.embed_image(str(ref))

    def query_vector(
        self, text: str | None, like: Sequence[str] = (), unlike: Sequence[str] = ()
    ) -> tuple[np.ndarray | None, list[Term]]:
        """One re-normalised vector for a query in the grammar of :mod:`retrieval.search.query`
        plus ``--like``/``--unlike`` photos; also returns the parsed terms. The vector is None
        for a query of word terms only (``name:italy``): nothing to encode."""
        terms = (parse_query(text) if text is not None else []) + photo_terms(like, unlike)
        if not terms:
            raise QueryError(
                "nothing to search for: give a text query or a photo to search like",
                setting="like",
            )
        encoded_terms = [t for t in terms if t.encoded]
        if not any(t.weight > 0 for t in encoded_terms) and any(
            t.weight > 0 for t in terms if not t.encoded
        ):
            return None, terms
        texts = list(dict.fromkeys(t.text for t in encoded_terms if t.kind == "text"))
        encoded = dict(zip(texts, self.encoder.encode_texts(texts))) if texts else {}
        vectors = [
            encoded[t.text] if t.kind == "text" else self.photo_vector(t.text)
            for t in encoded_terms
        ]
        if not vectors:
            combine(np.zeros((0, 1), np.float32), [])  # raises: nothing positive
        return combine(np.vstack(vectors), [t.weight for t in encoded_terms]), terms

    # -- the query ----------------------------------------------------------------------
    def search(
        self,
        vector: np.ndarray | None,
        options: SearchOptions,
        terms: Sequence[Term] | None = None,
        fusion: str = "calibrated",
    ) -> SearchPage:
        """One page of photos for a query vector under filters, cut-off, sort and offset.

        With the parsed ``terms`` of a text query and a library that stores words, the
        words are searched too and fused with the vector's ranking (:mod:`.fusion`);
        ``vector`` may then be None (a query of ``text:``/``name:`` terms only)."""
        self.library.refresh()
        ranking, used = self._rank(vector, options, terms, fusion)
        catalog = self.library.catalog
        rows = ranking.rows if ranking.rows is not None else catalog.get_images(ranking.ids)
        tags = catalog.tags_for(ranking.ids) if catalog.has_tags() else None
        times = ranking.frame_times or {}
        matched = ranking.matched or {}
        results = [
            _result(
                rows[i],
                score,
                None if tags is None else _tag_list(tags.get(i, [])),
                times.get(i),
                matched.get(i),
            )
            for i, score in zip(ranking.ids, ranking.scores)
            if i in rows
        ]
        _note_raws(results, ranking.raws or {}, catalog)
        return SearchPage(results, ranking.total, ranking.cutoff, options, fusion=used)

    def _rank(
        self, vector: np.ndarray | None, options: SearchOptions, terms, fusion: str
    ) -> tuple[Ranking, str | None]:
        """Today's ranking when there are no words to read; else the fused one."""
        words = word_query(terms) if terms else None
        if words is None or words.is_empty() or not self.library.catalog.has_text():
            if vector is None:
                raise QueryError(
                    "text: and name: look in the words stored with the photos, and this "
                    "library has none yet: index the photos again with this clipdex to "
                    "store them, or search without the prefix",
                    setting="query",
                )
            return rank(self.library, vector, options, MAX_K, self.pairs), None
        allowed = restrict(self.library, words, options)
        ranking = rank_fused(
            self.library, vector, words, options, MAX_K, allowed, fusion, self.pairs
        )
        add_snippets(self.library, ranking, words)
        return ranking, fusion


def embed_text(encoder: Encoder, text: str) -> np.ndarray:
    """Unit vector of a text query."""
    if not text or not text.strip():
        raise QueryError("the text query is empty: type what the photo shows")
    return encoder.encode_texts([check_text(text, "the text")])[0]


def embed_image(
    encoder: Encoder,
    source: str | os.PathLike | bytes,
    max_megapixels: float | None = None,
) -> np.ndarray:
    """Unit vector of an image file or its bytes (decode errors are DecodeError).

    ``max_megapixels``: None is the decoder's default. The decoder (Pillow) is imported
    here, not with this module: a text query never needs it.
    """
    from indexer.ingest.decode import DEFAULT_MAX_MEGAPIXELS, decode_for_model

    if not isinstance(source, bytes) and not Path(source).is_file():
        raise NotFound(f"no image file at {source}: pass an existing file or a photo id")
    limit = DEFAULT_MAX_MEGAPIXELS if max_megapixels is None else max_megapixels
    pixels, _ = decode_for_model(source, max_megapixels=limit)
    return encoder.encode_images(pixels[None])[0]


def _note_raws(results: list[SearchResult], raws: dict[int, int], catalog) -> None:
    """Name the RAW folded into each photo that stands for a RAW+JPEG pair."""
    rows = catalog.get_images(raws.values()) if raws else {}
    for result in results:
        raw_id = raws.get(result.id)
        if raw_id in rows:
            result.raw = {"id": raw_id, "path": rows[raw_id]["path"]}


def _tag_list(pairs: list[tuple[str, float]]) -> list[dict]:
    return [{"label": label, "score": round(score, 4)} for label, score in pairs]


def _result(
    row: dict,
    score: float,
    tags: list[dict] | None = None,
    frame_time: float | None = None,
    matched: dict | None = None,
) -> SearchResult:
    taken = row.get("taken_at")
    kind = row.get("kind") or "photo"
    if kind == "video" and frame_time is None:
        frame_time = row.get("frame_time")
    return SearchResult(
        id=row["id"],
        path=row["path"],
        score=round(score, 6),
        width=row["width"],
        height=row["height"],
        taken_at=taken.isoformat() if isinstance(taken, dt.datetime) else None,
        tags=tags,
        kind=kind,
        frame_time=frame_time if kind == "video" else None,
        duration=row.get("duration") if kind == "video" else None,
        matched=matched,
    )
