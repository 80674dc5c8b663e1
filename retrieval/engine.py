"""The query engine: text, image and photo-id queries against a library.

It is handed a :class:`~indexer.library.Library` and an encoder (or a zero-argument
callable that builds one, so a query by photo id never loads a model) and returns
:class:`SearchResult` objects; the CLI and the REST app only format them.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from indexer.decode import DEFAULT_MAX_MEGAPIXELS, decode_for_model
from indexer.errors import ConfigError, NotFound, QueryError
from indexer.library import Library
from indexer.model import Encoder

MAX_K = 10_000


@dataclass
class SearchResult:
    """One hit with the metadata every interface shows."""

    id: int
    path: str
    score: float
    width: int
    height: int
    taken_at: str | None

    def as_dict(self) -> dict:
        return asdict(self)


class SearchEngine:
    """Answers queries over one library with one model."""

    def __init__(
        self,
        library: Library,
        encoder: Encoder | Callable[[], Encoder],
        max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    ) -> None:
        self.library = library
        self._encoder = encoder
        self.max_megapixels = max_megapixels

    @property
    def encoder(self) -> Encoder:
        """The encoder, built on first use and checked against the library's model."""
        if callable(self._encoder) and not isinstance(self._encoder, Encoder):
            self._encoder = self._encoder()
        self.library.check_model(self._encoder.identity)
        return self._encoder

    # -- embeddings ---------------------------------------------------------------------
    def embed_text(self, text: str) -> np.ndarray:
        return embed_text(self.encoder, text)

    def embed_image(self, source: str | os.PathLike | bytes) -> np.ndarray:
        return embed_image(self.encoder, source, self.max_megapixels)

    def vector_of(self, image_id: int) -> np.ndarray:
        """The stored vector of an indexed photo."""
        ids, vectors = self.library.catalog.vectors([image_id])
        if not len(ids):
            raise NotFound(f"no photo with id {image_id} in the library: see `clipdex search`")
        return vectors[0]

    def resolve_photo(self, ref: str | int) -> int | None:
        """The id of an indexed photo given as an id or a path; None for an unindexed file."""
        text = str(ref)
        if text.isdigit() and not Path(text).exists():
            return int(text)
        image_id = self.library.catalog.id_for_path(os.path.abspath(os.path.expanduser(text)))
        if image_id is None and not Path(text).exists():
            raise NotFound(f"{text} is neither a photo id in the library nor an existing file")
        return image_id

    # -- queries ------------------------------------------------------------------------
    def search_text(self, text: str, k: int = 20) -> list[SearchResult]:
        return self.search_vector(self.embed_text(text), k)

    def search_image(self, source: str | os.PathLike | bytes, k: int = 20) -> list[SearchResult]:
        return self.search_vector(self.embed_image(source), k)

    def similar(self, ref: str | int, k: int = 20) -> list[SearchResult]:
        """Photos like an indexed photo (by id or path) or like any image file."""
        image_id = self.resolve_photo(ref)
        vector = self.vector_of(image_id) if image_id is not None else self.embed_image(str(ref))
        return self.search_vector(vector, k)

    def search_vector(
        self, vector: np.ndarray, k: int = 20, allowed_ids: np.ndarray | None = None
    ) -> list[SearchResult]:
        """The k nearest photos to a unit vector, best first, with their metadata."""
        check_k(k)
        self.library.refresh()
        if len(self.library.index) == 0:
            return []
        scores, ids = self.library.index.search(vector[None], k, allowed_ids)
        pairs = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
        rows = self.library.catalog.get_images(i for i, _ in pairs)
        return [_result(rows[i], score) for i, score in pairs if i in rows]


def embed_text(encoder: Encoder, text: str) -> np.ndarray:
    """Unit vector of a text query."""
    if not text or not text.strip():
        raise QueryError("the text query is empty: type what the photo shows")
    return encoder.encode_texts([text])[0]


def embed_image(
    encoder: Encoder,
    source: str | os.PathLike | bytes,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
) -> np.ndarray:
    """Unit vector of an image file or its bytes (decode errors are DecodeError)."""
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise NotFound(f"no image file at {source}: pass an existing file or a photo id")
    pixels, _ = decode_for_model(source, max_megapixels=max_megapixels)
    return encoder.encode_images(pixels[None])[0]


def check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1 or k > MAX_K:
        raise QueryError(f"k must be between 1 and {MAX_K}, got {k}")


def _result(row: dict, score: float) -> SearchResult:
    taken = row.get("taken_at")
    return SearchResult(
        id=row["id"],
        path=row["path"],
        score=round(score, 6),
        width=row["width"],
        height=row["height"],
        taken_at=taken.isoformat() if isinstance(taken, dt.datetime) else None,
    )


def default_library_dir() -> Path:
    """Where a library lives when neither --library nor CLIPDEX_LIBRARY says."""
    import platformdirs

    return Path(platformdirs.user_data_dir("clipdex")) / "library"


def parse_positive(name: str, value: int) -> int:
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}")
    return value
