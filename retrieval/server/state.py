"""What the server keeps warm: the collection (library + model), jobs, thumbnails.

Routers stay thin: they validate the request, call one method here and format the answer;
the methods here add the server's concerns (readiness, threads, a text-vector cache, decode
slots) around the front door, :class:`~retrieval.collection.Collection`.
The library and the model load in a background thread when the app starts, so ``/healthz``
answers at once and ``/readyz`` says when queries can be served; until then (or if loading
failed) the routes that need them answer 503 with the reason.

Threads: FastAPI runs the (sync) routes in a thread pool. Model calls are serialised (the
model already uses every core). Refresh + vector search run on one dedicated thread: a
refresh may change the in-memory index that a concurrent search would read, and that
thread's FAISS runs single-threaded (OpenMP's thread count is per calling thread), which
keeps a 10k-image query at ~1 ms instead of ~20 ms of OpenMP teams spinning per request
thread on a 2-core machine.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata

import numpy as np

from indexer.errors import ClipdexError, NotFound
from indexer.ingest.ocr import check_mode
from indexer.ingest.pipeline import IndexOptions, IndexReport, Progress
from indexer.ingest.sync import Syncer, SyncOptions
from indexer.model.identity import Encoder
from indexer.store.catalog import Catalog
from indexer.store.kindchoice import check_choice, index_facts
from indexer.store.library import Library
from indexer.store.vectors import set_search_threads
from retrieval.collection import Collection, EncoderLoader
from retrieval.search.engine import SearchPage
from retrieval.search.errors import QueryError
from retrieval.search.options import SearchOptions
from retrieval.search.query import Term
from retrieval.server.errors import NotReady
from retrieval.server.jobs import IndexJob, IndexJobs, JobCancelled
from retrieval.server.labels import LabelJob, LabelPreparer
from retrieval.server.paths import confine
from retrieval.server.settings import Settings
from retrieval.server.thumbnails import ThumbnailCache
from retrieval.server.workload import (
    TRIM_AFTER_PIXELS,
    RequestWork,
    SerialEncoder,
    current_work,
    release_memory,
)

log = logging.getLogger("clipdex.server")

EncoderSource = Encoder | Callable[[], Encoder]


class ServerState:
    """The app's long-lived objects and the operations the routers call."""

    def __init__(
        self,
        settings: Settings,
        encoder: EncoderSource | None = None,
        library: Library | None = None,
    ) -> None:
        self.settings = settings
        self._encoder_source = encoder or EncoderLoader(
            settings.weights, settings.device, settings.backend, settings.cache_dir
        )
        self.library = library
        self.encoder: SerialEncoder | None = None
        self.collection: Collection | None = None
        self.thumbnails: ThumbnailCache | None = None
        self.library_state, self.model_state = "loading", "loading"
        self.library_error: str | None = None
        self.model_error: str | None = None
        self.loaded = threading.Event()
        self.jobs = IndexJobs(self._run_index)
        # Label sets for /api/classify, prepared once in the background (see .labels).
        self.labels = LabelPreparer(
            lambda: self.require_encoder().without_timeout(),
            lambda: self.require_library().label_cache_dir,
        )
        self._searcher = ThreadPoolExecutor(
            1, "clipdex-search", initializer=set_search_threads, initargs=(settings.search_threads,)
        )
        # Decoding an upload or a photo for a thumbnail can take ~3 bytes per pixel of
        # memory (89 MP: ~270 MB); at most this many run at once, whatever the load.
        slots = max(2, min(8, os.cpu_count() or 2))
        self._decode_slots = threading.BoundedSemaphore(slots)
        # Uploads take all but one of them: a thumbnail never waits behind a burst of bombs.
        self._upload_slots = threading.BoundedSemaphore(slots - 1)
        self._text_cache: OrderedDict[str, tuple] = OrderedDict()  # text -> (vector, terms)
        self._text_cache_lock = threading.Lock()
        self._queued: set[int] = set()  # photos this run queued for re-indexing
        # One writer at a time within this process: index jobs and sync batches take turns
        # (each also takes the library's writer lock, which keeps other processes out).
        self._writer = threading.Lock()
        self.sync = ServerSync(self) if settings.watch_paths else None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Load library and model in the background (the server answers meanwhile), then
        start following the --watch folders, if any."""
        threading.Thread(target=self.load, name="clipdex-load", daemon=True).start()
        if self.sync is not None:
            self.sync.start()

    def load(self) -> None:
        try:
            self._load_library()
            self._load_encoder()
        finally:
            self.loaded.set()

    def _load_library(self) -> None:
        try:
            if self.library is None:
                self.library = Library.open(self.settings.library, create=True)
            self.thumbnails = ThumbnailCache(
                self.library.thumbnail_dir,
                self.settings.max_megapixels,
                self._decode_slots,
                on_changed=self.queue_reindex,
            )
            self.collection = Collection(
                self.library.root,
                self.require_encoder,  # the model is asked for when a query needs it
                library=self.library,
                max_megapixels=self.settings.max_megapixels,
            )
            self.library_state = "ready"
        except ClipdexError as exc:
            self.library_state, self.library_error = "failed", str(exc)
        except Exception as exc:  # keep serving /healthz and say why
            log.exception("could not open the library")
            self.library_state = "failed"
            self.library_error = f"could not open the library: {type(exc).__name__}: {exc}"

    def _load_encoder(self) -> None:
        try:
            source = self._encoder_source
            encoder = source if isinstance(source, Encoder) else source()
            serial = SerialEncoder(encoder, self.settings.request_timeout)
            # Warm up: the first call loads weights and kernels, not the first user query.
            serial.warm_up()
            self.encoder = serial
            self.model_state = "ready"
        except ClipdexError as exc:
            self.model_state, self.model_error = "failed", str(exc)
        except Exception as exc:  # keep serving what needs no model
            log.exception("could not load the model")
            self.model_state = "failed"
            self.model_error = f"could not load the model: {type(exc).__name__}: {exc}"

    def close(self, close_library: bool = True) -> None:
        """Stop jobs and the search thread; close the library unless the caller owns it."""
        self.labels.shutdown()
        if self.sync is not None:
            self.sync.stop()
        self.jobs.shutdown()
        self._searcher.shutdown()
        if self.encoder is not None:
            self.encoder.close()
        if close_library and self.library is not None:
            self.library.close()

    # -- readiness ----------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.library_state == "ready" and self.model_state == "ready"

    def require_library(self) -> Library:
        if self.library_state != "ready" or self.library is None:
            raise NotReady(self.library_error or "the library is still opening: retry shortly")
        return self.library

    def require_collection(self) -> Collection:
        self.require_library()
        assert self.collection is not None
        return self.collection

    def require_encoder(self) -> SerialEncoder:
        if self.model_state != "ready" or self.encoder is None:
            raise NotReady(self.model_error or "the model is still loading: retry shortly")
        return self.encoder

    # -- queries ------------------------------------------------------------------------
    def search_text(self, text: str, options: SearchOptions) -> SearchPage:
        """Photos for a text in the query grammar ("beach + sunset - people"); its words are
        searched too where the library stores words (names, keywords, text in photos)."""
        collection = self.require_collection()
        vector, terms = self._text_vector(collection, text)
        return self.in_search_thread(lambda: collection.search_vector(vector, options, terms=terms))

    def search_image(self, data: bytes, options: SearchOptions) -> SearchPage:
        """Photos that look like uploaded image bytes."""
        self.require_collection()
        return self._search(self.embed_upload(data), options)

    def embed_upload(self, data: bytes) -> np.ndarray:
        """The unit vector of uploaded image bytes. Decoding holds a decode slot (memory);
        the model call waits outside it, so uploads decode while the model is busy."""
        encoder = self.require_encoder()
        return encoder.encode_images(self._decode_upload(data)[None])[0]

    def _decode_upload(self, data: bytes) -> np.ndarray:
        """Model input from uploaded bytes, decoded in a slot and charged to the request's
        pixel budget (checked from the header, before decoding; see .workload). After a
        large decode, freed memory goes back to the system, so a burst of bombs does not
        leave the server at its peak size."""
        work = current_work() or RequestWork()
        decoded = 0.0
        try:
            with self._upload_slots, self._decode_slots:
                work.check()  # its client may have left while it waited for a slot
                pixels, info = work.decode(data, self.settings.max_megapixels)
                decoded = info.width * info.height
        finally:
            if decoded == 0.0 or decoded >= TRIM_AFTER_PIXELS:  # large, or failed midway
                release_memory()
        return pixels

    def similar(self, image_id: int, options: SearchOptions) -> SearchPage:
        """Photos like an indexed photo; needs no model (its vector is in the catalog)."""
        self.image_row(image_id)
        return self.in_search_thread(self.require_collection().similar, image_id, options)

    def in_search_thread(self, fn: Callable, *args):
        """Run ``fn(*args)`` where searches run: one at a time, never beside an index refresh."""
        return self._searcher.submit(fn, *args).result()

    def _search(self, vector: np.ndarray, options: SearchOptions) -> SearchPage:
        """One page for a query vector under ``options`` (filters, cut-off, sort, paging)."""
        collection = self.require_collection()
        return self.in_search_thread(collection.search_vector, vector, options)

    def _text_vector(
        self, collection: Collection, text: str
    ) -> tuple[np.ndarray | None, list[Term]]:
        """A text's vector and parsed terms, from a small LRU cache so paging does not
        re-run the model."""
        with self._text_cache_lock:
            if text in self._text_cache:
                self._text_cache.move_to_end(text)
                return self._text_cache[text]
        parsed = collection.query_vector(text)  # the query grammar: "beach + sunset - people"
        with self._text_cache_lock:
            self._text_cache[text] = parsed
            while len(self._text_cache) > self.settings.text_cache_size:
                self._text_cache.popitem(last=False)
        return parsed

    def image_row(self, image_id: int) -> dict:
        """The catalog row (no vector) of one photo; NotFound for an unknown id."""
        row = self.require_library().catalog.get_images([image_id]).get(image_id)
        if row is None:
            raise NotFound(f"no photo with id {image_id} in this library")
        return row

    def queue_reindex(self, row: dict, reason: str) -> None:
        """Queue a photo whose file changed (the server refused to serve it) for re-indexing.

        One committed row in the catalog's ``reindex`` table, so the next ``clipdex index``
        of its folder reads the file again; best effort: a read-only or busy catalog costs
        the mark (logged), never the 404 answer. Each photo is marked once per server run.
        """
        image_id = int(row["id"])
        if image_id in self._queued:
            return
        try:
            self.require_library().catalog.queue_reindex(image_id, reason)
        except Exception as exc:  # any storage failure: the answer stands
            log.warning("photo %s not queued for re-indexing: %s", image_id, exc)
            return
        self._queued.add(image_id)
        log.warning("photo %s queued for re-indexing: %s", image_id, reason)

    # -- embeddings ---------------------------------------------------------------------
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        for text in texts:
            if not text.strip():
                raise QueryError("an input text is empty: send what the photo shows")
        return self.require_encoder().encode_texts(texts)

    def embed_images(self, images: list[bytes]) -> np.ndarray:
        encoder = self.require_encoder()
        pixels = [self._decode_upload(data) for data in images]  # the request checked each
        return encoder.encode_images(np.stack(pixels))

    # -- indexing -----------------------------------------------------------------------
    def submit_index(
        self, paths: list[str], index_kind: str | None = None, ocr: str | None = None
    ) -> IndexJob:
        """Queue an index job for paths confined to the --index-root folders; ``index_kind``
        (auto | exact | ivf) switches the library's vector index kind afterwards; ``ocr``
        (auto | always | never) overrides the server's --ocr for this job."""
        if not paths:
            raise QueryError("give at least one path to index")
        confined = [confine(path, self.settings.index_roots) for path in paths]
        self.require_library()
        self.require_encoder()
        return self.jobs.submit(
            confined, check_choice(index_kind), check_mode(ocr) if ocr is not None else None
        )

    def _run_index(
        self,
        paths: list[str],
        progress: Progress,
        index_kind: str | None = None,
        ocr: str | None = None,
    ) -> IndexReport:
        encoder = self.require_encoder().without_timeout()
        roots = [os.path.realpath(root) for root in self.settings.index_roots]
        # Symlinks met while walking may not lead out of the roots either.
        options = IndexOptions(
            max_megapixels=self.settings.max_megapixels,
            within=roots,
            index_kind=index_kind,
            ocr=ocr or self.settings.ocr,
        )
        root = self.require_library().root
        with self._writer, Collection.open(root, create=True, encoder=encoder) as collection:
            report = collection.index(paths, options, progress, self._cluster_options())
        if self.settings.prepare_labels:
            self._prepare_default_labels()
        return report

    def _cluster_options(self):
        """Where index jobs encode: this process (None), or the Ray cluster of ``serve
        --cluster``, whose actors build their own model from the server's encoder source."""
        if self.settings.cluster is None:
            return None
        from indexer.ingest.cluster import ClusterOptions

        return ClusterOptions(self.settings.cluster, encoder_source=self._encoder_source)

    def _prepare_default_labels(self) -> None:
        """Start computing the default label set's vectors in the background, if missing,
        so the first /api/classify after indexing answers at once. The index job's report
        does not wait for it, and it takes no writer lock."""
        from retrieval.search.classify import make_labelset

        try:
            self.labels.prepare(make_labelset())
        except ClipdexError as exc:  # e.g. busy preparing others: classify will do it
            log.info("not preparing the default labels now: %s", exc)

    def label_vectors(self, labelset) -> np.ndarray | LabelJob | None:
        """A label set's vectors for /api/classify, or the job still preparing them, or
        None when the set is small enough to compute within the request (see .labels)."""
        return self.labels.vectors(labelset)

    # -- facts --------------------------------------------------------------------------
    def info(self) -> dict:
        """What /api/info and the page's status line show."""
        document = {
            "version": _version(),
            "ready": self.ready,
            "library_state": self.library_state,
            "model_state": self.model_state,
            "errors": {"library": self.library_error, "model": self.model_error},
            "library": str(self.settings.library),
            "images": None,  # photos + videos
            "photos": None,
            "videos": None,
            "video_frames": None,  # the videos' searchable frames (each row's own included)
            "failed": None,
            "reindex_queued": None,  # photos whose file changed, read again by the next index
            "index": None,  # the vector index: kind, choice; ivf: nlist, nprobe, recall
            "model": None,
            "encoder": self.encoder.identity.name if self.encoder else None,
            "max_upload_mb": self.settings.max_upload_mb,
            "max_megapixels": self.settings.max_megapixels,
            "indexing_enabled": bool(self.settings.index_roots),
            "index_roots": [str(root) for root in self.settings.index_roots],
            "auth": self.settings.token is not None,
            "jobs": [job.as_dict() for job in self.jobs.active()],
            "sync": self.sync.status() if self.sync is not None else None,
        }
        if self.library_state == "ready" and self.library is not None:
            catalog: Catalog = self.library.catalog
            identity = self.library.identity
            counts = catalog.kind_counts()
            document.update(
                library=str(self.library.root),
                images=counts["photos"] + counts["videos"],
                photos=counts["photos"],
                videos=counts["videos"],
                video_frames=counts["video_frames"],
                failed=catalog.failure_count(),
                reindex_queued=catalog.reindex_count(),
                index=index_facts(self.library),
                model=identity.name if identity else None,
            )
        return document


class ServerSync:
    """``serve --watch``: a :class:`~indexer.ingest.sync.Syncer` in a background thread.

    It starts once the library and the model are loaded, on its own library handle (as an
    index job does: the searching side picks its checkpoints up through
    ``Library.refresh``), and its batches take turns with index jobs. Stopping the server
    stops it at its next step, or inside a batch at the batch's next progress step.
    """

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._syncer: Syncer | None = None
        self._error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="clipdex-sync", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        state = self._state
        state.loaded.wait()
        if not state.ready:
            self._error = "not started: " + (state.library_error or state.model_error or "?")
            return
        try:
            self._follow()
        except JobCancelled:
            pass  # the server is stopping
        except ClipdexError as exc:
            self._error = str(exc)
        except Exception as exc:  # say why on /api/info; the server goes on serving
            log.exception("the sync of the --watch folders stopped")
            self._error = f"internal error: {type(exc).__name__}: {exc}"

    def _follow(self) -> None:
        state, settings = self._state, self._state.settings
        encoder = state.require_encoder().without_timeout()
        options = IndexOptions(max_megapixels=settings.max_megapixels, ocr=settings.ocr)
        sync_options = SyncOptions(
            quiet_seconds=settings.watch_debounce,
            settle_seconds=settings.watch_settle,
            poll_seconds=settings.watch_poll,
        )
        root = state.require_library().root
        with Collection.open(root, create=True, encoder=encoder) as collection:
            self._syncer = collection.syncer(
                settings.watch_paths,
                options,
                sync_options,
                guard=lambda: state._writer,
                progress=_StopProgress(self._stop),
            )
            self._syncer.run(self._stop)

    def status(self) -> dict:
        """The sync's part of /api/info: folders, state, mode, counts, last batch, pending."""
        if self._syncer is not None:
            status = self._syncer.status()
            if self._error:
                status.update(state="failed", error=self._error)
            return status
        return {
            "paths": [str(path) for path in self._state.settings.watch_paths],
            "state": "failed" if self._error else "starting",
            "error": self._error,
        }


class _StopProgress(Progress):
    """Ends a sync batch at its next step once the server is stopping."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop

    def advance(self, count: int = 1) -> None:
        if self._stop.is_set():
            raise JobCancelled


def _version() -> str:
    try:
        return metadata.version("clipdex")
    except metadata.PackageNotFoundError:
        return "dev"
