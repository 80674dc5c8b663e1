"""The front door for Python: one library folder, one model, every operation clipdex has.

The CLI, the server and the tests use it as any Python program would::

    from retrieval import Collection, SearchOptions

    with Collection.open("~/photo-library", create=True) as photos:
        photos.index(["~/Pictures"], progress=lambda done, total: print(done, "/", total))
        for hit in photos.search("a dog on a beach", options=SearchOptions(k=5)).results:
            print(hit.score, hit.path)

Nothing is read until a call needs it: the library opens on first use (memory-mapped with
``read_only=True``, the cheap way for queries), and the model loads only when a call has
to encode something; a query by photo id, ``info()`` or ``duplicates()`` never loads it.
Configuration arrives as plain arguments: environment variables (``CLIPDEX_LIBRARY``,
``CLIPDEX_CACHE``, ...) are read by the CLI and the server, never here.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.search.options import SearchOptions

if TYPE_CHECKING:
    import numpy as np

    from indexer.ingest.cluster import ClusterOptions
    from indexer.ingest.pipeline import IndexOptions, IndexReport, Progress
    from indexer.ingest.repair import RepairReport
    from indexer.ingest.sync import BatchRecord, Syncer, SyncOptions
    from indexer.model.identity import Encoder
    from indexer.store.catalog import Repage
    from indexer.store.library import Library
    from retrieval.search.classify import LabelSet, Prediction, TagReport
    from retrieval.search.duplicates import DuplicateGroup
    from retrieval.search.engine import SearchEngine, SearchPage
    from retrieval.search.query import Term

ProgressCallback = Callable[[int, int], None]  # (done, total)
PhotoRef = str | int | os.PathLike


def default_library_dir() -> Path:
    """Where a library lives when the caller names none: under the user's data folder."""
    import platformdirs

    return Path(platformdirs.user_data_dir("clipdex")) / "library"


def default_cache_dir() -> Path:
    """Where exported ONNX models are cached when the caller names no folder."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("clipdex"))


@dataclass(frozen=True)
class CollectionInfo:
    """What a library holds and which model made it."""

    library: str
    model: dict | None  # the model identity's fields; None before anything was indexed
    model_name: str | None
    images: int
    failed: int
    bytes_on_disk: int
    reindex_queued: int = 0  # photos the server found changed: the next index reads them
    index: dict = field(default_factory=dict)  # vector index: kind, choice, ivf's recall...
    # ``images`` = photos + videos; a video's searchable frames (its row's one included)
    photos: int = 0
    videos: int = 0
    video_frames: int = 0

    def as_dict(self) -> dict:
        """The ``clipdex info --json`` document."""
        return {
            "library": self.library,
            "model": self.model,
            "images": self.images,
            "photos": self.photos,
            "videos": self.videos,
            "video_frames": self.video_frames,
            "failed": self.failed,
            "bytes_on_disk": self.bytes_on_disk,
            "reindex_queued": self.reindex_queued,
            "index": self.index,
        }


@dataclass(frozen=True)
class OptimizeReport:
    """What :meth:`Collection.optimize` did."""

    photos: int  # vectors in the new base file
    folded_vectors: int  # delta rows folded in (added since the previous base)
    folded_removals: int  # tombstones folded in (removed since)
    kind: str  # the new base's index kind
    seconds: float
    catalog: Repage | None = None  # the catalog rebuilt with larger pages, or why not

    def as_dict(self) -> dict:
        """The ``clipdex optimize --json`` document."""
        return {
            "photos": self.photos,
            "folded_vectors": self.folded_vectors,
            "folded_removals": self.folded_removals,
            "kind": self.kind,
            "seconds": round(self.seconds, 3),
            "catalog": None if self.catalog is None else {
                "rebuilt": self.catalog.done,
                "page_size": self.catalog.page_size,
                "bytes_before": self.catalog.bytes_before,
                "bytes_after": self.catalog.bytes_after,
                "seconds": round(self.catalog.seconds, 3),
                "not_rebuilt_because": self.catalog.reason,
            },
        }


class Collection:
    """A photo library and the model that searches it; see the module docstring."""

    def __init__(
        self,
        root: str | os.PathLike,
        encoder: Encoder | Callable[[], Encoder],
        *,
        read_only: bool = False,
        max_megapixels: float | None = None,
        library: Library | None = None,
    ) -> None:
        """Prefer :meth:`open`. ``encoder`` is an encoder or a zero-argument callable that
        builds one on first need; ``library`` an already open library to use (not closed
        by :meth:`close` then)."""
        self.root = Path(root).expanduser()
        self.read_only = read_only
        self.max_megapixels = max_megapixels
        self._encoder_source = encoder
        self._encoder: Encoder | None = None
        self._library = library
        self._owns_library = library is None
        self._engine: SearchEngine | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike | None = None,
        *,
        weights: str | os.PathLike | None = None,
        device: str = "auto",
        backend: str = "auto",
        create: bool = False,
        read_only: bool = False,
        encoder: Encoder | Callable[[], Encoder] | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_megapixels: float | None = None,
    ) -> Collection:
        """A collection over the library at ``path`` (default: the user's data folder).

        The model is MobileCLIP-S2 with ``weights`` (a local checkpoint; None: the hub's
        datacompdr) on ``device`` (auto | cpu | cuda | mps) through ``backend`` (auto |
        torch | onnx), exported ONNX models cached in ``cache_dir``; or pass a ready
        ``encoder`` (any object with ``identity``, ``logit_scale``, ``encode_images`` and
        ``encode_texts``). ``create`` makes the library folder now if it is missing;
        ``read_only`` (for queries) reads the catalog without SQLAlchemy and memory-maps
        the vector index instead of reading it in;
        ``max_megapixels`` bounds the images a query decodes (None: the decoder's default).
        """
        root = Path(path).expanduser() if path is not None else default_library_dir()
        if encoder is None:
            encoder = EncoderLoader(weights, device, backend, cache_dir)
        collection = cls(root, encoder, read_only=read_only, max_megapixels=max_megapixels)
        if create:
            collection._open_library(create=True)
        return collection

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Close the library (the collection opens it again if used afterwards)."""
        if self._library is not None and self._owns_library:
            self._library.close()
        if self._owns_library:
            self._library = None
        self._engine = None

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def library(self) -> Library:
        """The open library (opened on first use; LibraryError if there is none)."""
        return self._open_library()

    @property
    def encoder(self) -> Encoder:
        """The model, loaded on first use."""
        if self._encoder is None:
            source = self._encoder_source
            self._encoder = source() if _is_factory(source) else source
        return self._encoder

    @property
    def engine(self) -> SearchEngine:
        """The query engine over this library and model."""
        if self._engine is None:
            from retrieval.search.engine import SearchEngine

            self._engine = SearchEngine(self.library, lambda: self.encoder, **self._limits())
        return self._engine

    def _open_library(self, create: bool = False) -> Library:
        if self._library is None:
            from indexer.store.library import Library

            self._library = Library.open(self.root, create=create, read_only=self.read_only)
        return self._library

    def _writable_library(self, create: bool = False) -> Library:
        """The library, for a call that writes: refused at once on a read-only collection."""
        if self.read_only:
            from indexer.errors import ConfigError

            raise ConfigError(
                f"this collection of {self.root} was opened read-only (for queries): open it "
                "without read_only=True to index, tag or change it"
            )
        return self._open_library(create=create)

    # -- indexing -----------------------------------------------------------------------
    def index(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        options: IndexOptions | None = None,
        progress: Progress | ProgressCallback | None = None,
        cluster: ClusterOptions | None = None,
    ) -> IndexReport:
        """Index folders or image files (recursively, incrementally), creating the library
        if needed. ``progress`` is a :class:`~indexer.ingest.pipeline.Progress` or a
        callable ``(done, total)``; files that fail are in the report's ``failures``.
        ``cluster``: decode and encode on a Ray cluster (:mod:`indexer.ingest.cluster`;
        Ray is imported only then), this process planning and committing."""
        library = self._writable_library(create=True)
        held = library.locked
        library.acquire_lock()  # a second writer is refused now, not after loading the model
        try:
            roots = [_root_arg(p) for p in _as_list(paths)]
            if cluster is not None:
                from indexer.ingest.cluster import index_on_cluster

                # Each Ray actor builds its own model from this (once per actor).
                source = cluster.encoder_source or self._encoder_source
                return index_on_cluster(
                    library, self.encoder, source, roots, options, cluster, _progress(progress)
                )
            from indexer.ingest.pipeline import index_paths

            return index_paths(library, self.encoder, roots, options, _progress(progress))
        finally:
            if not held:
                library.release_lock()

    def sync(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        options: IndexOptions | None = None,
        sync_options: SyncOptions | None = None,
        *,
        stop: threading.Event | None = None,
        on_batch: Callable[[BatchRecord, IndexReport], None] | None = None,
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        """Keep the library in step with folders until ``stop`` is set (or Ctrl-C):
        new, changed, moved and deleted photos are indexed in debounced batches (see
        :mod:`indexer.ingest.sync`). Blocks; run it in a thread to do something else."""
        self.syncer(paths, options, sync_options, on_batch=on_batch, on_note=on_note).run(stop)

    def syncer(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        options: IndexOptions | None = None,
        sync_options: SyncOptions | None = None,
        *,
        on_batch: Callable[[BatchRecord, IndexReport], None] | None = None,
        on_note: Callable[[str], None] | None = None,
        guard: Callable[[], AbstractContextManager] | None = None,
        progress: Progress | None = None,
    ) -> Syncer:
        """The :class:`~indexer.ingest.sync.Syncer` :meth:`sync` runs, to run it yourself
        (``.run(stop)``) and read its ``.status()`` meanwhile. Each batch holds the
        library's writer lock while it runs (and ``guard()``, when given, around it);
        ``progress`` hears each batch's files (and may raise to cut a batch short)."""
        from indexer.ingest.pipeline import IndexOptions, index_changes
        from indexer.ingest.sync import Syncer

        options = options or IndexOptions()
        library = self._writable_library(create=True)

        def run_batch(changed: list[Path]) -> IndexReport:
            with guard() if guard is not None else contextlib.nullcontext():
                roots = syncer.roots
                return index_changes(library, self.encoder, changed, options, progress, roots)

        syncer = Syncer(
            _as_list(paths),
            run_batch,
            sync_options,
            excludes=options.excludes,
            on_batch=on_batch,
            on_note=on_note,
        )
        return syncer

    def repair(
        self,
        paths: Sequence[str | os.PathLike] = (),
        options: IndexOptions | None = None,
        progress: Progress | ProgressCallback | None = None,
    ) -> RepairReport:
        """Check the library; salvage a damaged catalog, rebuild the vector index and encode
        lost rows again from ``paths`` (the model loads only if something needs it)."""
        from indexer.ingest.repair import repair_library

        self.close()  # repair opens the library its own way (the catalog may be damaged)
        roots = [_root_arg(p) for p in _as_list(paths)]
        return repair_library(
            self.root, lambda: self.encoder, roots, options, _progress(progress) if roots else None
        )

    def optimize(self, kind: str | None = None) -> OptimizeReport:
        """Fold the vector index's delta (photos added since) and tombstones (photos
        removed since) into one new base file now, built (an ivf index trained) again from
        the catalog's vectors, of ``kind`` (default: the index's own). Checkpoints compact by
        themselves past a threshold (an ivf base by folding: no training); searches in
        other processes go on meanwhile. Holds the writer lock.

        Then a catalog made with SQLite's smaller pages (before 32 KiB pages were the
        default) is rebuilt with 32 KiB ones, ~40 % smaller
        (:meth:`~indexer.store.catalog.Catalog.repage`): once, and only when no other
        process has it open and the disk has room; ``catalog`` in the report says which."""
        import time

        library = self._writable_library()
        started = time.monotonic()
        with library.writing():
            manifest = library.index.manifest
            photos = library.compact(kind, retrain=True)
            repage = getattr(library.catalog, "repage", None)
            catalog = repage() if repage is not None else None
        return OptimizeReport(
            photos=photos,
            folded_vectors=manifest.rows,
            folded_removals=manifest.deleted,
            kind=library.index.kind,
            seconds=time.monotonic() - started,
            catalog=catalog,
        )

    # -- search -------------------------------------------------------------------------
    def search(
        self,
        text: str | None = None,
        *,
        like: Sequence[PhotoRef] = (),
        unlike: Sequence[PhotoRef] = (),
        options: SearchOptions | None = None,
        fusion: str = "calibrated",
    ) -> SearchPage:
        """Photos matching a text in clipdex's query grammar ("beach + sunset - people",
        "2:dog + cat", '"out of order"', "name:italy") plus or minus photos (ids, indexed
        paths or image files). Where the library stores words (names, keywords, text in
        the photos) they are searched too and fused (``fusion``: calibrated | rrf); each
        result then says why it matched (``matched``)."""
        vector, terms = self.query_vector(text, like=like, unlike=unlike)
        page = self.search_vector(vector, options, terms=terms, fusion=fusion)
        page.terms = terms
        return page

    def search_image(
        self, source: str | os.PathLike | bytes, options: SearchOptions | None = None
    ) -> SearchPage:
        """Photos that look like an image file or image bytes."""
        return self.search_vector(self.embed_image(source), options)

    def search_vector(
        self,
        vector: np.ndarray | None,
        options: SearchOptions | None = None,
        *,
        terms: Sequence[Term] | None = None,
        fusion: str = "calibrated",
    ) -> SearchPage:
        """Photos nearest to a unit vector (e.g. from :meth:`embed_text`); with the
        ``terms`` it was made from (:meth:`query_vector`), their words are searched too
        (``vector`` may then be None: a query of ``text:``/``name:`` terms only)."""
        import numpy as np

        query = None if vector is None else np.asarray(vector, dtype=np.float32).reshape(-1)
        return self.engine.search(query, options or SearchOptions(), terms, fusion)

    def similar(self, photo: PhotoRef, options: SearchOptions | None = None) -> SearchPage:
        """Photos like an indexed photo (id or path: no model call) or any image file."""
        return self.search_vector(self.engine.photo_vector(photo), options)

    def query_vector(
        self,
        text: str | None = None,
        *,
        like: Sequence[PhotoRef] = (),
        unlike: Sequence[PhotoRef] = (),
    ) -> tuple[np.ndarray | None, list[Term]]:
        """The one unit vector a :meth:`search` ranks by, and the terms it parsed (the
        vector is None for a query of ``text:``/``name:`` terms only)."""
        return self.engine.query_vector(
            text, [str(p) for p in _as_list(like)], [str(p) for p in _as_list(unlike)]
        )

    # -- classification -----------------------------------------------------------------
    def classify(
        self,
        photo: PhotoRef | bytes | np.ndarray,
        labels: str | Sequence[str] | LabelSet | None = None,
        *,
        labels_file: str | os.PathLike | None = None,
        templates: Sequence[str] = (),
        top: int = 5,
        progress: ProgressCallback | None = None,
        label_vectors: np.ndarray | None = None,
    ) -> list[Prediction]:
        """Zero-shot labels of a photo (id, indexed path, image file, bytes or a vector),
        best first: softmax over ``labels`` ("cat,dog", a list or a LabelSet; default:
        ``labels_file``, else data/labels.txt) with prompt ``templates``. Label vectors
        are cached in the library; computing them calls ``progress(done, total)`` (prompts)
        once per batch. ``label_vectors``: from :meth:`label_vectors`, when at hand."""
        from retrieval.search.classify import classify_vector

        labelset = _labelset(labels, labels_file, templates)
        vector, cache = self._photo_vector(photo)
        return classify_vector(
            vector, self.encoder, labelset, top, cache, progress, matrix=label_vectors
        )

    def label_vectors(
        self,
        labels: str | Sequence[str] | LabelSet | None = None,
        *,
        labels_file: str | os.PathLike | None = None,
        templates: Sequence[str] = (),
        progress: ProgressCallback | None = None,
    ) -> np.ndarray:
        """The (labels, dim) vectors :meth:`classify` and :meth:`tag` compare photos with
        (default: the default label set), computed in batches (``progress(done, total)``
        per batch) and cached in the library, or read from that cache (no progress)."""
        from retrieval.search.classify import label_vectors

        labelset = _labelset(labels, labels_file, templates)
        return label_vectors(self.encoder, labelset, self._label_cache(), progress)

    def labels_prepared(
        self,
        labels: str | Sequence[str] | LabelSet | None = None,
        *,
        labels_file: str | os.PathLike | None = None,
        templates: Sequence[str] = (),
    ) -> bool:
        """Whether :meth:`label_vectors` would come from the cache (no model work)."""
        from retrieval.search.classify import cached_label_vectors

        labelset = _labelset(labels, labels_file, templates)
        cached = cached_label_vectors(self.encoder.identity, labelset, self._label_cache())
        return cached is not None

    def _photo_vector(self, photo: PhotoRef | bytes | np.ndarray) -> tuple[np.ndarray, Path | None]:
        """A photo's vector and the label-vector cache folder (None without a library)."""
        import numpy as np

        if isinstance(photo, np.ndarray):
            return photo.astype(np.float32).reshape(-1), self._label_cache()
        if isinstance(photo, bytes):
            return self.embed_image(photo), self._label_cache()
        plain_file = not isinstance(photo, int) and Path(photo).is_file()
        if self._library is None and plain_file and not self._library_exists():
            return self.embed_image(photo), None  # a plain file, no library: nothing to cache
        return self.engine.photo_vector(photo), self._label_cache()

    def _library_exists(self) -> bool:
        from indexer.store.library import Library

        return Library.exists(self.root)

    def _label_cache(self) -> Path | None:
        if self._library is None and not self._library_exists():
            return None
        return self.library.label_cache_dir

    def tag(
        self,
        labels: str | Sequence[str] | LabelSet | None = None,
        *,
        labels_file: str | os.PathLike | None = None,
        templates: Sequence[str] = (),
        top: int = 3,
        min_probability: float = 0.1,
        force: bool = False,
        progress: ProgressCallback | None = None,
    ) -> TagReport:
        """Store every photo's top labels (for ``SearchOptions(tags=...)``); incremental.
        ``progress(done, total)``: as for :meth:`label_vectors`."""
        from retrieval.search.classify import tag_library

        labelset = _labelset(labels, labels_file, templates)
        library = self._writable_library()
        return tag_library(
            library, self.encoder, labelset, top, min_probability, force, progress=progress
        )

    def duplicates(
        self, threshold: float = 0.95, folders: str | Sequence[str] = ()
    ) -> list[DuplicateGroup]:
        """Groups of near-duplicate photos (cosine >= ``threshold``), largest first."""
        from retrieval.search.duplicates import find_duplicates

        spec = SearchOptions(folders=tuple(_as_list(folders))).filter
        return find_duplicates(self.library, threshold, spec)

    # -- facts and embeddings -----------------------------------------------------------
    def failures(self) -> list[dict]:
        """The files that could not be indexed: ``{"path", "error"}`` each."""
        return self.library.catalog.list_failures()

    def info(self) -> CollectionInfo:
        """What the library holds and which model made it."""
        import json

        from indexer.store.kindchoice import index_facts

        library = self.library
        identity = library.identity
        counts = library.catalog.kind_counts()
        return CollectionInfo(
            library=str(library.root),
            model=json.loads(identity.to_json()) if identity else None,
            model_name=identity.name if identity else None,
            images=counts["photos"] + counts["videos"],
            photos=counts["photos"],
            videos=counts["videos"],
            video_frames=counts["video_frames"],
            failed=library.catalog.failure_count(),
            bytes_on_disk=library.bytes_on_disk(),
            reindex_queued=library.catalog.reindex_count(),
            index=index_facts(library),
        )

    def embed_text(self, text: str) -> np.ndarray:
        """The unit vector of a text (no library needed)."""
        from retrieval.search.engine import embed_text

        return embed_text(self.encoder, text)

    def embed_image(self, source: str | os.PathLike | bytes) -> np.ndarray:
        """The unit vector of an image file or image bytes (no library needed)."""
        from retrieval.search.engine import embed_image

        return embed_image(self.encoder, source, **self._limits())

    def _limits(self) -> dict:
        """The decode limit to pass on, when the caller set one."""
        return {} if self.max_megapixels is None else {"max_megapixels": self.max_megapixels}


class EncoderLoader:
    """A zero-argument callable that loads MobileCLIP-S2 as the arguments say (the model
    loads when it is called, which the collection does on first need)."""

    def __init__(
        self, weights, device: str, backend: str, cache_dir, *, single_query: bool = False
    ) -> None:
        """``single_query``: the process embeds one text and exits (``clipdex search``);
        the ONNX text session is then built to start fast rather than to run many times."""
        self.weights = Path(weights).expanduser() if weights is not None else None
        self.device, self.backend = device, backend
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.single_query = single_query

    def __call__(self) -> Encoder:
        from indexer.model import encoders  # looked up at call time: tests swap load_encoder

        extra = {"single_query": True} if self.single_query else {}
        return encoders.load_encoder(
            self.weights, self.device, self.backend, cache_dir=self.cache_dir, **extra
        )


def _labelset(labels, labels_file, templates: Sequence[str]) -> LabelSet:
    """A LabelSet as given, or made from labels ("a,b" or a list) / a labels file."""
    from retrieval.search.classify import LabelSet, make_labelset

    if isinstance(labels, LabelSet):
        return labels
    return make_labelset(labels, labels_file, templates)


def _is_factory(source: Any) -> bool:
    """A zero-argument callable that builds an encoder, rather than an encoder."""
    return callable(source) and not hasattr(source, "encode_texts")


def _as_list(values: Any) -> list:
    """One value or a sequence of them as a list (a lone string is one value)."""
    if isinstance(values, str | bytes | os.PathLike | int):
        return [values]
    return list(values or ())


def _root_arg(path: str | os.PathLike) -> str | Path:
    """A folder or file to index; a URI (``s3://bucket/prefix``) stays as written (a Path
    would fold its ``//``): :func:`indexer.ingest.discover.resolve_root` reads it."""
    if isinstance(path, str) and "://" in path:
        return path
    return Path(path).expanduser()


def _progress(progress: Progress | ProgressCallback | None) -> Progress | None:
    """A pipeline Progress from a Progress or a ``(done, total)`` callable."""
    if progress is None or hasattr(progress, "advance"):
        return progress
    return _CallbackProgress(progress)


class _CallbackProgress:
    """A pipeline Progress that calls ``callback(done, total)`` at the start and per file."""

    def __init__(self, callback: ProgressCallback) -> None:
        self.callback, self.done, self.total = callback, 0, 0

    def start(self, total: int) -> None:
        self.total = total
        self.callback(0, total)

    def advance(self, count: int = 1) -> None:
        self.done += count
        self.callback(self.done, self.total)

    def fail(self, path: str, reason: str) -> None:
        """Failures are in the report; the callback sees only counts."""
