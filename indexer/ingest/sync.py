"""Keeping a library in step with folders: changes in, debounced batches out.

A :class:`Syncer` reads changes from an event source (:mod:`indexer.ingest.watch`) and
hands them, in batches, to a ``run_batch(paths)`` callable (the caller's; normally
:func:`indexer.ingest.pipeline.index_changes` under the writer lock), so every incremental
rule of ``clipdex index`` holds: a moved photo keeps its vector, a changed one is encoded
again, a deleted one leaves the index.

- **Bursts are one batch.** A batch starts once no change arrived for ``quiet_seconds``,
  or once the oldest waiting change has waited ``max_wait_seconds`` (an import that never
  pauses still lands in bounded steps). A phone import of 2,000 files is one or a few
  batches, never 2,000 runs.
- **Files being written wait.** A file is taken only once its size and mtime have held
  still for ``settle_seconds`` (or its mtime is older than that: a moved photo is taken
  at once, beside its old path's removal); a half-written JPEG is not read. Should one
  still be caught mid-write (a writer that pauses for longer), its failure is not final:
  the next write is another change, and the file is read again.
- **Folders may vanish.** A watched folder that disappears (an unmounted disk, a renamed
  folder) is treated as absent, not emptied: its photos stay in the library, the sync
  waits, and when the folder is back it is checked again like ``clipdex index`` would.
- **The writer lock is held per batch**, so searches never wait and ``clipdex index`` may
  run between batches; a batch that finds another writer keeps its changes and retries
  after ``retry_seconds``.
- **No events, no problem.** Where events are unavailable the source rescans every
  ``poll_seconds`` (or ``fallback_poll_seconds`` when it had to fall back).

``status()`` is safe to call from any thread (the server's ``/api/info`` does).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from indexer.errors import ConfigError, DiskFull, LibraryLocked, WatchUnavailable
from indexer.ingest.discover import has_indexable_suffix, is_excluded
from indexer.ingest.pipeline import IndexReport
from indexer.ingest.watch import (
    DELETED,
    MODIFIED,
    EventSource,
    open_events,
    polling_fallback,
)

log = logging.getLogger("clipdex.sync")

BatchRunner = Callable[[list[Path]], IndexReport]
_DIR = "dir"  # the stat key of a folder: it never needs to settle


@dataclass
class SyncOptions:
    """How a sync batches changes; resolved at the edge and passed in."""

    quiet_seconds: float = 2.0  # a batch starts once no change arrived for this long...
    max_wait_seconds: float = 60.0  # ...or once the oldest waiting change waited this long
    settle_seconds: float = 2.0  # a file is taken once its size and mtime held still this long
    poll_seconds: float | None = None  # rescan every N s instead of following events
    fallback_poll_seconds: float = 60.0  # the rescan period when events are unavailable
    retry_seconds: float = 5.0  # wait before retrying a batch another writer kept out
    tick_seconds: float = 0.25  # how often the loop looks at stop, roots and timers
    catch_up: bool = True  # index the folders once at start (what changed while not watching)

    def __post_init__(self) -> None:
        for name in ("quiet_seconds", "max_wait_seconds", "settle_seconds", "retry_seconds"):
            if not getattr(self, name) >= 0:  # NaN too
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("poll_seconds", "fallback_poll_seconds", "tick_seconds"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                flag = "--poll" if name == "poll_seconds" else name
                raise ConfigError(f"{flag} must be a positive number of seconds, got {value}")


@dataclass
class BatchRecord:
    """What one batch did."""

    number: int
    finished_at: float  # time.time()
    paths: int  # changed paths handed to the batch
    indexed: int
    reused: int
    removed: int
    failed: int
    seconds: float

    def as_dict(self) -> dict:
        return {
            "number": self.number,
            "finished_at": self.finished_at,
            "paths": self.paths,
            "indexed": self.indexed,
            "reused": self.reused,
            "removed": self.removed,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class _Pending:
    key: object  # (size, mtime_ns), _DIR, or None when the path is gone
    changed_at: float  # monotonic time the key was last seen to change
    immediate: bool = False  # a catch-up scan: no quiet period, no settling


@dataclass
class _Totals:
    batches: int = 0
    indexed: int = 0
    reused: int = 0
    removed: int = 0
    failed: int = 0
    last_batch: BatchRecord | None = None
    history: list[BatchRecord] = field(default_factory=list)  # the last few batches


class Syncer:
    """Follows folders and keeps a library in step with them; see the module docstring."""

    def __init__(
        self,
        roots: Sequence[str | os.PathLike],
        run_batch: BatchRunner,
        options: SyncOptions | None = None,
        *,
        excludes: Sequence[str] = (),
        on_batch: Callable[[BatchRecord, IndexReport], None] | None = None,
        on_note: Callable[[str], None] | None = None,
    ) -> None:
        """``roots``: existing folders. ``run_batch(paths)`` brings those paths up to date
        (raising LibraryLocked when another writer holds the library); ``on_batch`` hears
        each finished batch, ``on_note`` each change of mode or state worth telling."""
        self.roots = [_folder(root) for root in roots]
        self.options = options or SyncOptions()
        self.excludes = tuple(excludes)
        self._run_batch = run_batch
        self._on_batch = on_batch
        self._on_note = on_note
        self._pending: dict[str, _Pending] = {}
        self._last_change = 0.0
        self._first_pending: float | None = None
        self._not_before = 0.0  # no batch before this (lock retry, files settling)
        self._missing: set[Path] = set()
        # (device, inode) of each folder when last seen present: another one there is noticed.
        self._seen = {root: _folder_identity(root) for root in self.roots}
        self._watch_failure: Exception | None = None  # why events are not followed
        self._source: EventSource | None = None
        self._totals = _Totals()
        self._state = "starting"
        self._error: str | None = None
        self._lock = threading.Lock()

    # -- the loop -----------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Follow the folders until ``stop`` is set (or Ctrl-C: KeyboardInterrupt). The
        library keeps its last checkpoint whenever the loop ends."""
        stop = stop or threading.Event()
        self._open_source()
        if self.options.catch_up:
            for root in self._present_roots():
                self._queue(str(root), _DIR, time.monotonic(), immediate=True)
        try:
            while not stop.is_set():
                self.step()
        except BaseException as exc:
            self._set_state("failed" if not isinstance(exc, KeyboardInterrupt) else "stopped")
            if not isinstance(exc, KeyboardInterrupt):
                self._error = str(exc)
            raise
        finally:
            self._close_source()
        self._set_state("stopped")

    def step(self) -> None:
        """One turn of the loop: read changes, check the folders, run a batch when due."""
        for kind, path in self._changes():
            self._note(kind, path, time.monotonic())
        self._check_roots()
        now = time.monotonic()
        if self._due(now):
            self._batch(now)
        elif not (self._state == "waiting" and now < self._not_before):
            self._set_state(self._idle_state())

    def _idle_state(self) -> str:
        if self._source is None and not self._present_roots():
            return "waiting for folders"
        return "polling" if self.mode == "poll" else "watching"

    # -- event sources ------------------------------------------------------------------
    @property
    def mode(self) -> str | None:
        return self._source.mode if self._source is not None else None

    def _open_source(self) -> None:
        """(Re)open the source over the present folders; once the watcher has failed, the
        sync stays on rescanning (it would most likely fail again)."""
        self._close_source()
        roots = self._present_roots()
        if not roots:
            return
        options = self.options
        if self._watch_failure is not None:
            self._source = polling_fallback(
                roots, options.fallback_poll_seconds, self.excludes, self._watch_failure
            )
        else:
            self._source = open_events(
                roots,
                options.poll_seconds,
                options.fallback_poll_seconds,
                self.excludes,
                options.tick_seconds,
            )
        self._watch_failure = getattr(self._source, "cause", None)
        if self._source.reason:
            self._tell(self._source.reason)

    def _close_source(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None

    def _changes(self) -> list[tuple[str, str]]:
        if self._source is None:
            time.sleep(self.options.tick_seconds)
            return []
        try:
            return self._source.changes(self.options.tick_seconds)
        except WatchUnavailable as exc:  # the watcher broke: rescan instead, and catch up
            self._watch_failure = exc
            self._open_source()
            for root in self._present_roots():
                self._queue(str(root), _DIR, time.monotonic(), immediate=True)
            return []

    # -- changes ------------------------------------------------------------------------
    def _note(self, kind: str, path: str, now: float) -> None:
        root = self._root_of(path)
        if root is None or self._ignored(path, root):
            return
        key = None if kind == DELETED else _stat_key(path)
        if key == _DIR and kind == MODIFIED:
            return  # a folder's own mtime or mode: its files raise their own changes
        if key is not None and key != _DIR and not has_indexable_suffix(path):
            return
        self._queue(path, key, now)

    def _queue(self, path: str, key: object, now: float, immediate: bool = False) -> None:
        entry = self._pending.get(path)
        if entry is None or entry.key != key or immediate:
            self._pending[path] = _Pending(key, now, immediate or bool(entry and entry.immediate))
        self._last_change = now
        if self._first_pending is None:
            self._first_pending = now

    def _root_of(self, path: str) -> Path | None:
        for root in self.roots:
            if path == str(root) or path.startswith(str(root).rstrip(os.sep) + os.sep):
                return root
        return None

    def _ignored(self, path: str, root: Path) -> bool:
        """Hidden entries (as discovery skips them) and ``--exclude`` matches."""
        relative = os.path.relpath(path, root)
        if relative != "." and any(part.startswith(".") for part in Path(relative).parts):
            return True
        return is_excluded(path, str(root), self.excludes)

    # -- folders that vanish and come back ----------------------------------------------
    def _present_roots(self) -> list[Path]:
        return [root for root in self.roots if root not in self._missing]

    def _check_roots(self) -> None:
        """Notice a folder gone (or left as an empty mount point), back, or replaced."""
        changed = False
        for root in self.roots:
            identity = _folder_identity(root)
            absent = self._absent(root, identity)
            if absent and root not in self._missing:
                with self._lock:
                    self._missing.add(root)
                self._drop_pending_under(root)
                self._tell(f"{root} is gone or empty: its photos stay; waiting for it")
            elif not absent and (root in self._missing or identity != self._seen[root]):
                with self._lock:
                    self._missing.discard(root)
                self._seen[root] = identity
                self._queue(str(root), _DIR, time.monotonic(), immediate=True)
                self._tell(f"{root} is there (again): checking it for changes")
            else:
                continue
            changed = True
        if changed:
            self._open_source()

    def _absent(self, root: Path, identity: tuple[int, int] | None) -> bool:
        """Gone, or another folder that is empty where ours was: an unmounted disk leaves
        its empty mount point behind, and its photos must not be taken as deleted."""
        if identity is None:
            return True
        return identity != self._seen[root] and not _has_entries(root)

    def _root_present(self, path: str) -> bool:
        root = self._root_of(path)
        if root is None or root in self._missing:
            return False
        return _folder_identity(root) == self._seen[root]

    def _drop_pending_under(self, root: Path) -> None:
        for path in [p for p in self._pending if self._root_of(p) == root]:
            del self._pending[path]
        if not self._pending:
            self._first_pending = None

    # -- batches ------------------------------------------------------------------------
    def _due(self, now: float) -> bool:
        if not self._pending or now < self._not_before:
            return False
        if any(entry.immediate for entry in self._pending.values()):
            return True
        options = self.options
        quiet = now - self._last_change >= options.quiet_seconds
        waited = self._first_pending is not None and (
            now - self._first_pending >= options.max_wait_seconds
        )
        return quiet or waited

    def _take_ready(self, now: float) -> list[Path]:
        """The pending paths whose files have settled (the others wait), folders first."""
        settle = self.options.settle_seconds
        ready: list[str] = []
        next_look = None
        for path, entry in list(self._pending.items()):
            key = _stat_key(path)
            if key != entry.key:  # changed since it was noted: wait for it to hold still
                self._pending[path] = _Pending(key, now, entry.immediate)
                entry = self._pending[path]
            if key is None and not self._root_present(path):
                del self._pending[path]  # its folder went away: not a deletion (see above)
                continue
            if entry.immediate or key in (None, _DIR) or _settled(entry, now, settle):
                ready.append(path)
            else:
                look = entry.changed_at + settle
                next_look = look if next_look is None else min(next_look, look)
        for path in ready:
            del self._pending[path]
        self._first_pending = None if not self._pending else now
        if next_look is not None:
            self._not_before = next_look
        return _outermost(ready)

    def _batch(self, now: float) -> None:
        paths = self._take_ready(now)
        if not paths:
            return
        self._set_state("indexing")
        started = time.monotonic()
        try:
            report = self._run_batch(paths)
        except (LibraryLocked, DiskFull) as exc:
            for path in paths:  # keep them: the next try takes them at once
                self._queue(str(path), _DIR if path.is_dir() else _stat_key(str(path)), now, True)
            self._not_before = time.monotonic() + self.options.retry_seconds
            self._set_state("waiting")
            self._tell(f"{exc}: trying again in {self.options.retry_seconds:g} s")
            return
        self._record(paths, report, time.monotonic() - started)

    def _record(self, paths: list[Path], report: IndexReport, seconds: float) -> None:
        with self._lock:
            totals = self._totals
            totals.batches += 1
            record = BatchRecord(
                totals.batches,
                time.time(),
                len(paths),
                report.indexed,
                report.reused,
                report.removed,
                report.failed,
                seconds,
            )
            totals.indexed += report.indexed
            totals.reused += report.reused
            totals.removed += report.removed
            totals.failed += report.failed
            totals.last_batch = record
            totals.history = [*totals.history[-9:], record]
            self._state = self._idle_state()  # with the counts: a reader never sees one alone
        log.info(
            "sync batch %d: %d paths, %d indexed, %d reused, %d removed, %d failed (%.1f s)",
            record.number,
            record.paths,
            record.indexed,
            record.reused,
            record.removed,
            record.failed,
            seconds,
        )
        if self._on_batch is not None:
            self._on_batch(record, report)

    # -- what it is doing ---------------------------------------------------------------
    def _set_state(self, state: str) -> None:
        with self._lock:
            self._state = state

    def _tell(self, message: str) -> None:
        log.info("sync: %s", message)
        if self._on_note is not None:
            self._on_note(message)

    @property
    def batches(self) -> list[BatchRecord]:
        """The last few batches, oldest first."""
        with self._lock:
            return list(self._totals.history)

    def status(self) -> dict:
        """What the sync is doing, for ``/api/info`` and the page's status line."""
        with self._lock:
            totals = self._totals
            source = self._source
            return {
                "paths": [str(root) for root in self.roots],
                "state": self._state,
                "mode": source.mode if source is not None else None,
                "reason": source.reason if source is not None else None,
                "poll_seconds": getattr(source, "interval", None),
                "missing": sorted(str(root) for root in self._missing),
                "pending": len(self._pending),
                "batches": totals.batches,
                "indexed": totals.indexed,
                "reused": totals.reused,
                "removed": totals.removed,
                "failed": totals.failed,
                "last_batch": totals.last_batch.as_dict() if totals.last_batch else None,
                "error": self._error,
            }


def _folder(path: str | os.PathLike) -> Path:
    """A folder to follow, absolute; a clear error when it is not one."""
    if isinstance(path, str) and "://" in path:
        raise ConfigError(
            f"{path}: only folders on this machine can be watched (object storage sends no "
            "events): index the bucket again with `clipdex index` when it changes, e.g. on a "
            "schedule (unchanged objects cost one listing)"
        )
    folder = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise ConfigError(f"{path} {what}: give existing folders to watch")
    return folder


def _folder_identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder; None when it is gone (or is no folder now)."""
    try:
        info = os.stat(folder)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None


def _settled(entry: _Pending, now: float, settle: float) -> bool:
    """Held still for ``settle`` seconds since noted, or last written longer ago than that
    (a renamed or moved photo keeps its old mtime: it is taken at once, in the same batch
    as its old path's removal, so it keeps its vector)."""
    if now - entry.changed_at >= settle:
        return True
    _size, mtime_ns = entry.key
    return time.time_ns() - mtime_ns >= settle * 1e9


def _has_entries(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is not None
    except OSError:
        return False


def _stat_key(path: str) -> object:
    """(size, mtime_ns) of a file, _DIR for a folder, None when the path is gone."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    if stat.S_ISDIR(info.st_mode):
        return _DIR
    return (info.st_size, info.st_mtime_ns)


def _outermost(paths: list[str]) -> list[Path]:
    """The paths, less those inside another of them that is a folder being scanned."""
    folders = {p for p in paths if os.path.isdir(p)}
    kept = []
    for path in sorted(paths):
        parents = Path(path).parents
        if not any(str(parent) in folders for parent in parents):
            kept.append(Path(path))
    return kept
