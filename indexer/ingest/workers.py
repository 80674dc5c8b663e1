"""Decode worker processes: read, hash and decode files beside the inference process.

Each worker is a ``python -m indexer.ingest.workers`` child (a plain subprocess: it never re-runs
the caller's ``__main__`` and imports only numpy, Pillow and :mod:`indexer.ingest.decode`) joined
to the parent by a private pair of pipes. A supervisor thread in the parent

- hands one file at a time to each idle worker; the worker reads and hashes it and asks
  whether the content is already known (catalog or this run): a known file is never decoded;
- keeps at most ``capacity`` files dispatched or waiting for the consumer (back-pressure:
  a slow consumer stops the reading, which bounds memory);
- enforces the per-file time limit, and replaces a worker that overruns or dies, recording
  its file as failed with a human reason; the worker caps its own address space, so a file
  that needs too much memory fails alone with a MemoryError.

Outcomes come back in completion order, not input order.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np

from indexer.errors import ClipdexError
from indexer.fsutil import child_pythonpath
from indexer.ingest import objectstore
from indexer.ingest.decode import DEFAULT_MAX_MEGAPIXELS, decode_for_model, describe_failure
from indexer.ingest.discover import FoundFile
from indexer.ingest.objectstore import is_uri
from indexer.ingest.video import is_video_path

DEFAULT_DECODER = "indexer.ingest.workers:decode_file"
STARTUP_SECONDS = 60.0  # a worker that is not up by then means a broken installation
_POLL_SECONDS = 0.05  # how often the supervisor looks for freed slots and overruns

Lookup = Callable[[str], "tuple[dict, np.ndarray] | None"]


@dataclass(frozen=True)
class DecodeLimits:
    """Per-file bounds enforced in the workers."""

    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    seconds: float = 30.0  # wall time to read + decode one file (a video: to hash, then to sample)
    memory_mb: int = 2048  # address space a worker may add while decoding (Linux); 0: none


@dataclass
class Outcome:
    """One file after the pool: model input to encode, a known vector to reuse, or a failure."""

    found: FoundFile
    sha256: str = ""
    pixels: np.ndarray | None = None
    fields: dict | None = None
    vector: np.ndarray | None = None
    error: str | None = None


# -- the worker side ----------------------------------------------------------------------------
def decode_file(data: bytes | None, path: str, max_megapixels: float) -> tuple[np.ndarray, dict]:
    """The default decoder: model input and the catalog's fields for one file's bytes.

    A video (``data`` is None: its bytes were hashed, not held) is sampled from its path by
    :mod:`indexer.ingest.video`: its pixels are a stack of frames, and its fields carry
    ``frame_times``.
    """
    if data is None:
        from indexer.ingest.video import decode_video_file

        return decode_video_file(path, max_megapixels)
    pixels, info = decode_for_model(data, max_megapixels=max_megapixels, name=path)
    fields = {
        "width": info.width,
        "height": info.height,
        "format": info.format,
        "taken_at": info.taken_at,
        "camera_make": info.camera_make,
        "camera_model": info.camera_model,
        "gps_lat": info.gps_lat,
        "gps_lon": info.gps_lon,
        "texts": list(info.texts),
    }
    return pixels, fields


def serve(inbox: Connection, outbox: Connection, decoder: Callable, limits: DecodeLimits) -> None:
    """The worker loop: one path in, ``hashed`` out, then ``decode`` or ``skip``, until EOF."""
    outbox.send(("ready",))
    while True:
        try:
            path = inbox.recv()
        except EOFError:
            return
        if path is None:
            return
        _serve_one(path, inbox, outbox, decoder, limits)


def _serve_one(path: str, inbox, outbox, decoder: Callable, limits: DecodeLimits) -> None:
    try:
        data, sha256 = _read_and_hash(path)
    except OSError as exc:
        outbox.send(("failed", _read_failure(exc, path)))
        return
    except ClipdexError as exc:  # an object store that cannot be reached at all
        outbox.send(("failed", str(exc)))
        return
    outbox.send(("hashed", sha256))
    if inbox.recv() != "decode":
        return
    try:
        pixels, fields = decoder(data, path, limits.max_megapixels)
    except MemoryError:
        del data
        outbox.send(("failed", _memory_failure(limits)))
        return
    except ClipdexError as exc:
        outbox.send(("failed", str(exc)))
        return
    except Exception as exc:  # the boundary: every failure becomes a reason
        outbox.send(("failed", describe_failure(exc, path)))
        return
    outbox.send(("decoded", pixels, fields))


def _read_and_hash(path: str) -> tuple[bytes | None, str]:
    """The file's bytes and their SHA-256; a video (often gigabytes) is hashed in chunks
    and its bytes are not kept (None): its decoder reads the file itself. A URI
    (s3://, gs://) is read from its object store."""
    if is_uri(path):
        if not is_video_path(path):
            data = objectstore.read_bytes(path)
            return data, hashlib.sha256(data).hexdigest()
        return None, hash_file(path)
    with open(path, "rb") as handle:
        if not is_video_path(path):
            data = handle.read()
            return data, hashlib.sha256(data).hexdigest()
        digest = hashlib.sha256()
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
        return None, digest.hexdigest()


def hash_file(path: str) -> str:
    """The SHA-256 of a file's content, read in chunks (the same digest the workers take)."""
    digest = hashlib.sha256()
    if is_uri(path):
        for chunk in objectstore.iter_chunks(path):
            digest.update(chunk)
        return digest.hexdigest()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _read_failure(exc: OSError, path: str) -> str:
    if is_uri(path):
        return objectstore.read_failure(exc, path)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return describe_failure(exc, path)
    return f"cannot read file: {exc.strerror or exc}"


def _memory_failure(limits: DecodeLimits) -> str:
    return (
        f"decoding needs more than {limits.memory_mb} MB, the per-file memory limit "
        "(a lower pixel limit may help, or the file is hostile)"
    )


def _cap_memory(memory_mb: int) -> None:
    """Limit this process's address space to what it uses now plus ``memory_mb``."""
    if memory_mb <= 0:
        return
    try:
        import resource

        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except (ImportError, OSError, ValueError, IndexError):
        return  # not Linux: no cap (RLIMIT_AS is not enforced on macOS anyway)
    limit = pages * os.sysconf("SC_PAGE_SIZE") + memory_mb * 2**20
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def resolve_decoder(reference: str) -> Callable:
    """``"package.module:function"`` -> the function (tests substitute hostile decoders)."""
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str]) -> int:
    """``python -m indexer.ingest.workers READ_FD WRITE_FD CONFIG_JSON``: serve to EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    read_fd, write_fd, config = int(argv[0]), int(argv[1]), json.loads(argv[2])
    limits = DecodeLimits(**config["limits"])
    decoder = resolve_decoder(config["decoder"])
    with contextlib.suppress(Exception):  # load lazy codecs (HEIF, RAW) before the memory cap
        from indexer.ingest.decode import preload_codecs

        preload_codecs()
    _cap_memory(limits.memory_mb)
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the parent went away
        serve(inbox, outbox, decoder, limits)
    return 0


# -- the parent side ----------------------------------------------------------------------------
class _Worker:
    """One worker process as the parent sees it: its pipes and the file it is working on."""

    def __init__(self, decoder: str, limits: DecodeLimits) -> None:
        child_in, self_out = os.pipe()
        self_in, child_out = os.pipe()
        config = json.dumps({"decoder": decoder, "limits": limits.__dict__})
        self.process = subprocess.Popen(
            [sys.executable, "-m", "indexer.ingest.workers", str(child_in), str(child_out), config],
            pass_fds=(child_in, child_out),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=_worker_env(),
        )
        os.close(child_in)
        os.close(child_out)
        self.outbox = Connection(self_out, readable=False)
        self.inbox = Connection(self_in, writable=False)
        self.started = time.monotonic()
        self.ready = False
        self.found: FoundFile | None = None
        self.sha256 = ""
        self.deadline = float("inf")

    def give(self, found: FoundFile, seconds: float) -> bool:
        """Send a file; False when the worker is gone."""
        self.found, self.sha256 = found, ""
        self.deadline = time.monotonic() + seconds if self.ready else float("inf")
        return self.send(found.path)

    def send(self, message) -> bool:
        try:
            self.outbox.send(message)
        except OSError:
            return False
        return True

    def done(self) -> FoundFile:
        found, self.found, self.deadline = self.found, None, float("inf")
        return found

    def exit_reason(self) -> str:
        """How the process ended, in words, e.g. 'killed by SIGSEGV'."""
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-code).name}"
            return f"killed by signal {-code}"
        return f"exit status {code}"

    def stop(self, *, force: bool = False) -> None:
        if not force:
            self.send(None)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=2)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for conn in (self.inbox, self.outbox):
            with contextlib.suppress(OSError):
                conn.close()


def _worker_env() -> dict[str, str]:
    """The child sees this checkout's packages and stays single-threaded and lean."""
    path = child_pythonpath()
    single = {k: "1" for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**os.environ, **single, "PYTHONPATH": path, "MALLOC_ARENA_MAX": "2"}


_END = object()


class DecodePool:
    """Worker processes that turn found files into :class:`Outcome` objects, with bounds."""

    def __init__(
        self,
        workers: int = 2,
        limits: DecodeLimits | None = None,
        lookup: Lookup | None = None,
        capacity: int | None = None,
        decoder: str = DEFAULT_DECODER,
    ) -> None:
        self.size = max(1, int(workers))
        self.limits = limits or DecodeLimits()
        self.lookup = lookup or (lambda sha256: None)
        self.capacity = max(self.size, capacity or 4 * self.size)
        self.decoder = decoder
        self.peak_outstanding = 0  # most files dispatched but not yet taken by the consumer
        self.restarts = 0  # workers replaced after a crash or an overrun
        self._outstanding = 0
        self._lock = threading.Lock()
        self._results: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._workers: list[_Worker] = []
        self._supervisor: threading.Thread | None = None
        self._failed = False

    def map(self, files: Iterable[FoundFile]) -> Iterator[Outcome]:
        """Outcomes of ``files`` as they complete; stops the workers when done or abandoned."""
        with self:
            self.start(files)
            yield from self.outcomes()

    def start(self, files: Iterable[FoundFile]) -> None:
        """Start the workers and the supervisor on ``files``; they run ahead of the consumer
        up to ``capacity`` files. Pair with :meth:`close` (or use the pool as a context).
        Once :meth:`outcomes` has ended, ``start`` may run the pool again on more files with
        the same worker processes (a cluster actor's pool serves shard after shard)."""
        while len(self._workers) < self.size:
            self._workers.append(_Worker(self.decoder, self.limits))
        self._supervisor = threading.Thread(
            target=self._supervise, args=(iter(files),), name="clipdex-decode", daemon=True
        )
        self._supervisor.start()

    def outcomes(self) -> Iterator[Outcome]:
        """The outcomes, in completion order, until every file has one."""
        while (item := self._results.get()) is not _END:
            if isinstance(item, BaseException):
                self._failed = True
                raise item
            with self._lock:
                self._outstanding -= 1
            yield item

    def close(self) -> None:
        """Stop the supervisor and the workers (at once if files are still in flight)."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        for worker in self._workers:
            worker.stop(force=self._failed or worker.found is not None)
        self._workers = []

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self._failed = self._failed or kind is not None
        self.close()

    # -- the supervisor thread ------------------------------------------------------------------
    def _supervise(self, source: Iterator[FoundFile]) -> None:
        try:
            more = True
            while not self._stopping.is_set():
                if more:
                    more = self._dispatch(source)
                busy = [w for w in self._workers if w.found is not None]
                if not more and not busy:
                    break
                self._listen(busy)
                self._expire(busy)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._results.put(exc)
        finally:
            self._results.put(_END)

    def _dispatch(self, source: Iterator[FoundFile]) -> bool:
        """Give files to idle workers while slots are free; False once ``source`` is empty."""
        for i in range(len(self._workers)):
            if self._workers[i].found is not None:
                continue
            with self._lock:
                if self._outstanding >= self.capacity:
                    return True
            found = next(source, None)
            if found is None:
                return False
            with self._lock:
                self._outstanding += 1
                self.peak_outstanding = max(self.peak_outstanding, self._outstanding)
            if not self._workers[i].give(found, self.limits.seconds):
                self._restart_idle(i).give(found, self.limits.seconds)
        return True

    def _restart_idle(self, index: int) -> _Worker:
        """Replace a worker found dead while idle (its last file was already reported)."""
        old = self._workers[index]
        old.found = None
        if not old.ready:
            self._not_started(old)
        old.stop(force=True)
        self._workers[index] = _Worker(self.decoder, self.limits)
        self.restarts += 1
        return self._workers[index]

    def _listen(self, busy: list[_Worker]) -> None:
        """Wait briefly for messages from busy workers and act on each."""
        by_conn = {w.inbox: w for w in busy}
        for conn in wait(list(by_conn), timeout=self._timeout(busy)):
            worker = by_conn[conn]
            try:
                message = conn.recv()
            except (EOFError, OSError):
                self._died(worker)
                continue
            self._on_message(worker, message)

    def _timeout(self, busy: list[_Worker]) -> float:
        soonest = min((w.deadline for w in busy), default=float("inf"))
        return max(0.0, min(_POLL_SECONDS, soonest - time.monotonic()))

    def _on_message(self, worker: _Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "ready":
            worker.ready = True
            worker.deadline = time.monotonic() + self.limits.seconds
        elif kind == "hashed":
            worker.sha256 = message[1]
            known = self.lookup(worker.sha256)
            if known is None:
                if is_video_path(worker.found.path):  # hashing gigabytes is not decoding:
                    worker.deadline = time.monotonic() + self.limits.seconds  # a fresh limit
                worker.send("decode")
            else:
                worker.send("skip")
                fields, vector = known
                self._emit(Outcome(worker.done(), message[1], fields=dict(fields), vector=vector))
        elif kind == "decoded":
            sha256 = worker.sha256
            self._emit(Outcome(worker.done(), sha256, pixels=message[1], fields=message[2]))
        elif kind == "failed":
            sha256 = worker.sha256
            self._emit(Outcome(worker.done(), sha256, error=message[1]))

    def _died(self, worker: _Worker) -> None:
        if not worker.ready:
            self._not_started(worker)
        reason = f"the decoder crashed on this file (worker process {worker.exit_reason()})"
        self._replace(self._workers.index(worker), reason)

    @staticmethod
    def _not_started(worker: _Worker) -> None:
        raise ClipdexError(
            f"a decode worker could not start ({worker.exit_reason()}): see the error above; "
            f"is clipdex installed for {sys.executable}?"
        )

    def _expire(self, busy: list[_Worker]) -> None:
        now = time.monotonic()
        for worker in busy:
            if worker.found is None:
                continue
            if worker.deadline <= now:
                worker.process.kill()
                seconds = f"{self.limits.seconds:g}"
                reason = f"took longer than {seconds} s to read and decode, the per-file time limit"
                self._replace(self._workers.index(worker), reason)
            elif not worker.ready and now - worker.started > STARTUP_SECONDS:
                raise ClipdexError(f"a decode worker did not start in {STARTUP_SECONDS:g} s")

    def _replace(self, index: int, reason: str) -> None:
        """Record the worker's file as failed and put a fresh worker in its place."""
        old = self._workers[index]
        if old.found is not None:
            sha256 = old.sha256
            self._emit(Outcome(old.done(), sha256, error=reason))
        old.stop(force=True)
        self._workers[index] = _Worker(self.decoder, self.limits)
        self.restarts += 1

    def _emit(self, outcome: Outcome) -> None:
        self._results.put(outcome)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
