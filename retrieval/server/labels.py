"""Label vectors for ``/api/classify``, prepared once per label set in the background.

A label set's vectors cost one text-tower pass per (label, template) prompt: a few for
``labels=cat,dog``, hundreds for the default label set (a minute or more on a small CPU).
The route asks here only for the default set, the server's own (a request's own labels are
its own cost, capped and stopped with the request). Small sets (at most
:data:`INLINE_PROMPTS` prompts) are computed inside the request, like a query. A larger set
that is neither in memory nor in the library's label cache starts one
background job (a daemon thread feeding the model :data:`LABEL_BATCH` prompts at a time, so
queries interleave and wait for one batch at most); the request waits up to ``wait``
seconds for it and otherwise gets ``503 preparing`` with the job's progress and a
``Retry-After``. Concurrent requests for the same set (same labels, templates and model)
share that one job; once it is done its vectors are kept in memory (a few label sets) and
in the library's label cache, so every later request answers at once.

After an index job the server starts the default label set's job the same way
(:meth:`LabelPreparer.prepare`): it needs no writer lock (the cache is a separate file
written atomically), and by the time someone classifies, the vectors are usually ready.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.errors import ClipdexError
from indexer.model.identity import Encoder
from retrieval.search.classify import (
    LABEL_BATCH,
    LabelSet,
    cached_label_vectors,
    label_vectors,
    prompt_count,
)
from retrieval.server.errors import Busy

log = logging.getLogger("clipdex.server")

INLINE_PROMPTS = 4 * LABEL_BATCH  # at most this many prompts: computed inside the request
KEEP_IN_MEMORY = 8  # label sets whose vectors stay in memory (~0.7 MB for 335 labels)
MAX_RUNNING = 4  # label jobs at once; more distinct large label sets are refused (429)
RETRY_AFTER_S = 5


class _Stopped(Exception):
    """Raised through the progress hook when the server shuts down."""


@dataclass
class LabelJob:
    """One label set being prepared, and how far it got (in prompts)."""

    labelset: LabelSet
    total: int
    done: int = 0
    state: str = "running"  # running | done | failed
    error: str | None = None
    vectors: np.ndarray | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def progress(self) -> dict:
        return {"done": self.done, "total": self.total}


class LabelPreparer:
    """Label vectors from memory, the library's cache, or one shared background job.

    ``encoder`` and ``cache_dir`` are called when needed (the model and the library load
    after the server starts); ``encoder()`` must not time out (the job waits behind queries).
    """

    def __init__(
        self,
        encoder: Callable[[], Encoder],
        cache_dir: Callable[[], Path | None],
        wait: float = 2.0,
    ) -> None:
        self._encoder, self._cache_dir, self.wait = encoder, cache_dir, wait
        self._jobs: dict[str, LabelJob] = {}
        self._ready: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def vectors(self, labelset: LabelSet) -> np.ndarray | LabelJob | None:
        """The label set's vectors; or the running job preparing them (after waiting up to
        ``wait`` seconds for it); or None for a small set, which the request computes like
        a query. A failed job raises its error once and is forgotten: the next request
        starts afresh."""
        if prompt_count(labelset) <= INLINE_PROMPTS:
            return None
        job = self._find_or_start(self._encoder(), labelset)
        if isinstance(job, np.ndarray):
            return job
        job.finished.wait(self.wait)
        if job.state == "done" and job.vectors is not None:
            return job.vectors
        if job.state == "failed":
            raise LabelsFailed(f"preparing the labels failed: {job.error}; retry")
        return job

    def prepare(self, labelset: LabelSet) -> LabelJob | None:
        """Start preparing ``labelset`` in the background unless it is ready; no waiting."""
        found = self._find_or_start(self._encoder(), labelset)
        return None if isinstance(found, np.ndarray) else found

    def running(self) -> list[LabelJob]:
        """The label sets being prepared now."""
        with self._lock:
            return list(self._jobs.values())

    def shutdown(self) -> None:
        """Stop running jobs at their next batch."""
        self._stopped.set()

    def _find_or_start(self, encoder: Encoder, labelset: LabelSet) -> np.ndarray | LabelJob:
        digest = labelset.digest(encoder.identity)
        with self._lock:
            if digest in self._ready:
                self._ready.move_to_end(digest)
                return self._ready[digest]
            if digest in self._jobs:
                return self._jobs[digest]
        cached = cached_label_vectors(encoder.identity, labelset, self._cache_dir())
        with self._lock:
            if cached is not None:
                self._remember(digest, cached)
                return cached
            if digest in self._jobs:  # started meanwhile by another request
                return self._jobs[digest]
            if len(self._jobs) >= MAX_RUNNING:
                raise Busy(
                    f"{len(self._jobs)} label sets are being prepared already: "
                    "retry when they are done, or send fewer labels"
                )
            job = self._jobs[digest] = LabelJob(labelset, prompt_count(labelset))
        threading.Thread(
            target=self._run, args=(digest, job, encoder), name="clipdex-labels", daemon=True
        ).start()
        return job

    def _run(self, digest: str, job: LabelJob, encoder: Encoder) -> None:
        def progress(done: int, total: int) -> None:
            if self._stopped.is_set():
                raise _Stopped
            job.done = done

        try:
            job.vectors = label_vectors(encoder, job.labelset, self._cache_dir(), progress)
            job.state = "done"
        except _Stopped:
            job.state, job.error = "failed", "the server is stopping"
        except Exception as exc:  # reported to the requests that wait for it
            if not self._stopped.is_set():
                log.exception("preparing %d labels failed", len(job.labelset.labels))
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}"
        with self._lock:
            self._jobs.pop(digest, None)
            if job.vectors is not None:
                self._remember(digest, job.vectors)
        job.finished.set()

    def _remember(self, digest: str, vectors: np.ndarray) -> None:
        """Keep ``vectors`` in memory (the caller holds the lock)."""
        self._ready[digest] = vectors
        self._ready.move_to_end(digest)
        while len(self._ready) > KEEP_IN_MEMORY:
            self._ready.popitem(last=False)


class LabelsFailed(ClipdexError):
    """The background job failed (e.g. the model errored); the next request retries."""

    code = "labels_failed"
    http_status = 503


def preparing_message(job: LabelJob) -> str:
    """What a client is told while ``job`` runs."""
    return (
        f"preparing {len(job.labelset.labels)} labels once for this model "
        f"({job.done} of {job.total} prompts done): retry in a few seconds"
    )
