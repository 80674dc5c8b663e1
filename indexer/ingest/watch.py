"""Where a sync learns of changes: file-system events (watchfiles) or a periodic rescan.

The only module that imports watchfiles. An *event source* answers ``changes(timeout)``
with the ``(kind, path)`` pairs seen since its last answer (kind: added, modified or
deleted), waiting at most about ``timeout`` seconds; :mod:`indexer.ingest.sync` turns them
into batches. Two sources:

- :class:`WatchfilesEvents` follows the kernel's events (inotify, FSEvents, ...): changes
  arrive within a fraction of a second and cost nothing while nothing changes.
- :class:`PollingEvents` walks the folders every N seconds and compares sizes and mtimes
  with the previous walk. It is the fallback where events do not arrive: a network mount
  (NFS, SMB, sshfs: another machine's writes raise no local event), a watcher that cannot
  start (e.g. the system's inotify watch limit), or ``--poll SECONDS`` by choice.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from indexer.errors import WatchUnavailable
from indexer.ingest.discover import discover

ADDED, MODIFIED, DELETED = "added", "modified", "deleted"
Change = tuple[str, str]  # (kind, absolute path)

# File systems whose changes made by other machines raise no local event (Linux names).
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ncpfs",
        "afs",
        "9p",
        "fuse.sshfs",
        "fuse.rclone",
        "ceph",
        "glusterfs",
        "fuse.glusterfs",
        "lustre",
        "davfs",
        "fuse.davfs2",
        "fuse.s3fs",
    }
)


class EventSource(Protocol):
    """What the sync loop reads changes from."""

    mode: str  # "events" or "poll"
    reason: str | None  # why this source was chosen, when it is a fallback

    def changes(self, timeout: float) -> list[Change]:
        """Changes since the last call, waiting at most about ``timeout`` seconds."""
        ...

    def close(self) -> None:
        """Stop following; the source is not used again."""
        ...


class WatchfilesEvents:
    """Kernel file-system events for existing folders, through watchfiles."""

    mode = "events"

    def __init__(self, roots: Sequence[Path], tick: float = 0.25) -> None:
        """Start watching now; :class:`WatchUnavailable` if the watcher cannot start."""
        import watchfiles

        self.reason: str | None = None
        self._stop = threading.Event()
        wait_ms = max(10, int(tick * 1000))
        self._iterator = watchfiles.watch(
            *[str(root) for root in roots],
            watch_filter=None,  # the sync filters: it knows the suffixes and excludes
            debounce=wait_ms,
            step=min(50, wait_ms),
            rust_timeout=wait_ms,
            yield_on_timeout=True,
            stop_event=self._stop,
            raise_interrupt=True,  # Ctrl-C reaches the caller as KeyboardInterrupt
        )
        # The watcher starts on the first step: do it now, so a failure shows at once.
        self._early = self._next()

    def _next(self) -> list[Change]:
        try:
            raw = next(self._iterator, set())
        except (OSError, RuntimeError) as exc:
            raise WatchUnavailable(f"file-system events are unavailable: {exc}") from exc
        return [(change.name, path) for change, path in raw]

    def changes(self, timeout: float) -> list[Change]:
        """Changes within the tick given at creation (``timeout`` is that tick here)."""
        if self._early:
            early, self._early = self._early, []
            return early
        return self._next()

    def close(self) -> None:
        self._stop.set()
        self._iterator.close()


class PollingEvents:
    """A rescan every ``interval`` seconds, compared with the previous one."""

    mode = "poll"

    def __init__(
        self,
        roots: Sequence[Path],
        interval: float,
        excludes: Sequence[str] = (),
        reason: str | None = None,
    ) -> None:
        self.roots, self.interval, self.excludes = list(roots), interval, tuple(excludes)
        self.reason = reason
        self.cause: Exception | None = None  # the watcher's failure, when this is a fallback
        self._snapshot = self._scan()
        self._next_scan = time.monotonic() + interval

    def _scan(self) -> dict[str, tuple[int, int, int | None]]:
        """size, mtime and inode of every indexable file under the (present) roots."""
        snapshot: dict[str, tuple[int, int, int | None]] = {}
        for root in self.roots:
            if root.is_dir():
                for found in discover(root, self.excludes).files:
                    snapshot[found.path] = (found.size, found.mtime_ns, found.inode)
        return snapshot

    def changes(self, timeout: float) -> list[Change]:
        wait = self._next_scan - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, timeout))
            if time.monotonic() < self._next_scan:
                return []
        current = self._scan()
        self._next_scan = time.monotonic() + self.interval
        before, self._snapshot = self._snapshot, current
        found = [(DELETED, path) for path in before if path not in current]
        for path, key in current.items():
            if path not in before:
                found.append((ADDED, path))
            elif before[path] != key:
                found.append((MODIFIED, path))
        return found

    def close(self) -> None:
        self._snapshot = {}


def open_events(
    roots: Sequence[Path],
    poll_seconds: float | None,
    fallback_poll_seconds: float,
    excludes: Sequence[str] = (),
    tick: float = 0.25,
) -> EventSource:
    """The best source for these (existing) folders: events, unless polling was asked for,
    a folder is on a network file system, or the watcher cannot start."""
    if poll_seconds:
        return PollingEvents(roots, poll_seconds, excludes, f"rescanning every {poll_seconds:g} s")
    for root in roots:
        kind = filesystem_type(root)
        if kind in NETWORK_FILESYSTEMS:
            reason = (
                f"{root} is on a network file system ({kind}) whose changes raise no events "
                f"here: rescanning every {fallback_poll_seconds:g} s"
            )
            return PollingEvents(roots, fallback_poll_seconds, excludes, reason)
    try:
        return WatchfilesEvents(roots, tick)
    except WatchUnavailable as exc:
        return polling_fallback(roots, fallback_poll_seconds, excludes, exc)


def polling_fallback(
    roots: Sequence[Path], interval: float, excludes: Sequence[str], why: Exception
) -> PollingEvents:
    """The rescanning source that replaces a watcher that failed (``why`` is kept)."""
    reason = f"{why}: rescanning every {interval:g} s instead"
    source = PollingEvents(roots, interval, excludes, reason)
    source.cause = why
    return source


def filesystem_type(path: Path) -> str | None:
    """The type of the file system holding ``path`` (Linux /proc/self/mounts), or None."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as mounts:
            lines = mounts.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best, kind = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape_mount(fields[1])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def _unescape_mount(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field
