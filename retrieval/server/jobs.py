"""Background indexing jobs: one at a time, in order, each with live progress.

A job runs :func:`indexer.ingest.pipeline.index_paths` in a worker thread on its own
:class:`~indexer.store.library.Library` handle, exactly like a separate ``clipdex index``
process: it takes the library's writer lock and checkpoints, and the searching side picks
the new checkpoints up through ``Library.refresh``. Stopping the server cancels the
running job at its next progress step; the library keeps its last checkpoint.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from indexer.errors import ClipdexError, NotFound
from indexer.ingest.pipeline import IndexReport, Progress
from retrieval.server.errors import Busy

log = logging.getLogger("clipdex.server")

MAX_KEPT_JOBS = 100
MAX_ACTIVE_JOBS = 16


class JobCancelled(Exception):
    """Raised inside the pipeline (through the progress hook) when the server stops."""


@dataclass
class IndexJob:
    """One request to index some paths, and how far it got."""

    id: str
    paths: list[str]
    state: str = "queued"  # queued | running | done | failed | cancelled
    total: int | None = None
    done: int = 0
    failed: int = 0
    error: str | None = None
    report: dict | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    index_kind: str | None = None  # auto | exact | ivf asked for (None: keep the library's)
    ocr: str | None = None  # auto | always | never asked for (None: the server's setting)

    def as_dict(self) -> dict:
        end = self.finished_at or time.time()
        elapsed = end - self.started_at if self.started_at else 0.0
        return {
            "id": self.id,
            "paths": self.paths,
            "state": self.state,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "img_per_s": round(self.done / elapsed, 2) if elapsed > 0 else 0.0,
            "seconds": round(elapsed, 2),
            "error": self.error,
            "report": self.report,
        }


class JobProgress(Progress):
    """Pipeline progress hook that fills in an :class:`IndexJob` and honours cancellation."""

    def __init__(self, job: IndexJob, cancelled: threading.Event) -> None:
        self.job = job
        self.cancelled = cancelled

    def start(self, total: int) -> None:
        self.job.total = total
        self._check()

    def advance(self, count: int = 1) -> None:
        self.job.done += count
        self._check()

    def fail(self, path: str, reason: str) -> None:
        """One file failed: counted at once, so the page shows failures while a job runs."""
        self.job.failed += 1

    def _check(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled


Runner = Callable[[list[str], Progress], IndexReport]


class IndexJobs:
    """A queue of index jobs served by one daemon worker thread."""

    def __init__(self, run: Runner) -> None:
        self._run = run
        self._jobs: OrderedDict[str, IndexJob] = OrderedDict()
        self._queue: queue.Queue[IndexJob | None] = queue.Queue()
        self._cancelled = threading.Event()
        self._lock = threading.Lock()
        self._worker: threading.Thread | None = None  # started by the first job

    def submit(
        self, paths: list[str], index_kind: str | None = None, ocr: str | None = None
    ) -> IndexJob:
        job = IndexJob(uuid.uuid4().hex[:16], list(paths), index_kind=index_kind, ocr=ocr)
        with self._lock:
            active = sum(j.state in ("queued", "running") for j in self._jobs.values())
            if active >= MAX_ACTIVE_JOBS:
                raise Busy(f"{active} index jobs are already queued: wait for them to finish")
            self._jobs[job.id] = job
            self._forget_old()
            if self._worker is None:
                self._worker = threading.Thread(
                    target=self._serve, name="clipdex-index-jobs", daemon=True
                )
                self._worker.start()
        self._queue.put(job)
        return job

    def _forget_old(self) -> None:
        while len(self._jobs) > MAX_KEPT_JOBS:
            oldest = next(iter(self._jobs.values()))
            if oldest.state in ("queued", "running"):
                return
            self._jobs.popitem(last=False)

    def get(self, job_id: str) -> IndexJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no index job {job_id!r}: POST /api/index starts one")
        return job

    def recent(self) -> list[IndexJob]:
        with self._lock:
            return list(reversed(self._jobs.values()))

    def active(self) -> list[IndexJob]:
        return [job for job in self.recent() if job.state in ("queued", "running")]

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel queued and running jobs and wait (bounded) for the worker to stop."""
        self._cancelled.set()
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(timeout)

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._cancelled.is_set():
                job.state = "cancelled"
                continue
            self._execute(job)

    def _execute(self, job: IndexJob) -> None:
        job.state, job.started_at = "running", time.time()
        try:
            progress = JobProgress(job, self._cancelled)
            kind = (job.index_kind,) if job.index_kind is not None else ()
            ocr = {"ocr": job.ocr} if job.ocr is not None else {}
            report = self._run(job.paths, progress, *kind, **ocr)
        except JobCancelled:
            job.state = "cancelled"
        except ClipdexError as exc:
            job.state, job.error = "failed", str(exc)
        except Exception as exc:  # a job's bug must not kill the worker
            log.exception("index job %s failed", job.id)
            job.state, job.error = "failed", f"internal error: {type(exc).__name__}: {exc}"
        else:
            job.state, job.report = "done", report.as_dict()
            job.failed = report.failed
            job.report["failures"] = [
                {"path": path, "error": reason} for path, reason in report.failures[:100]
            ]
        finally:
            job.finished_at = time.time()
