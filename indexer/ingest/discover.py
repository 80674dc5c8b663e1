"""Find the image files under the folders a user points at.

Recursive, hidden folders and files skipped, ``--exclude`` globs honoured, directory
symlinks followed once (a loop is detected by device + inode and not followed again).
Problems with single entries (no permission, a name the OS cannot stat, a link that loops
or leads nowhere, a path over the system's limit) are reported, not raised, so one bad
folder never stops a run. Names are ``str`` with undecodable bytes surrogate-escaped (see
:mod:`indexer.paths` for how they are stored and shown).
"""

from __future__ import annotations

import errno
import fnmatch
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from indexer.errors import ConfigError
from indexer.fsutil import file_key
from indexer.ingest import objectstore
from indexer.ingest.decode import IMAGE_SUFFIXES
from indexer.ingest.video import VIDEO_SUFFIXES

_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES

OUTSIDE_ROOTS = "symlink leads outside the folders this server may index: not followed"


@dataclass(frozen=True)
class FoundFile:
    path: str  # absolute
    size: int
    mtime_ns: int
    device: int | None = None  # the file's identity (indexer.fsutil.file_key), when known
    inode: int | None = None
    real_path: str | None = None  # ``path`` with every symlink resolved (the server opens it)


@dataclass
class Discovery:
    """What one walk found: image files and entries that could not be read."""

    files: list[FoundFile] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


Root = Path | objectstore.UriRoot  # a local folder or file, or an object-storage URI


def resolve_root(path: str | os.PathLike) -> Root:
    """An existing folder or file as an absolute path, or an object-storage URI
    (``s3://bucket/prefix``: listed through :mod:`indexer.ingest.objectstore`); a clear
    error otherwise."""
    if objectstore.scheme_of(path) is not None:  # s3://, gs://; an unknown scheme is refused
        return objectstore.resolve(path)
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    if not root.exists():
        raise ConfigError(f"{path} does not exist: pass an existing folder or image file")
    return root


def is_excluded(path: str, root: str, excludes: Sequence[str]) -> bool:
    """True when a glob matches the path relative to root, the absolute path or the name."""
    if not excludes:
        return False
    relative = os.path.relpath(path, root)
    name = os.path.basename(path)
    return any(
        fnmatch.fnmatch(relative, glob)
        or fnmatch.fnmatch(path, glob)
        or fnmatch.fnmatch(name, glob)
        for glob in excludes
    )


def discover(
    root: Root, excludes: Sequence[str] = (), within: Sequence[str] = ()
) -> Discovery:
    """Every image file under ``root`` (or ``root`` itself when it is a file).

    With ``within`` (real, resolved folder paths: the server's --index-root), a symlink
    whose target lies outside all of them is reported and not followed.
    """
    if isinstance(root, objectstore.UriRoot):
        return discover_uri(root, excludes)
    found = Discovery()
    if root.is_file():
        real = os.path.realpath(root)
        _add_file(found, str(root), real, str(root.parent), excludes, explicit=True)
        return found
    seen_dirs: set[tuple[int, int]] = set()
    for path, real in _walk(str(root), seen_dirs, found, tuple(within)):
        _add_file(found, path, real, str(root), excludes, explicit=False)
    return found


def discover_uri(root: objectstore.UriRoot, excludes: Sequence[str] = ()) -> Discovery:
    """Every image object under a URI prefix (or the object itself), by the rules of a
    folder walk: hidden names skipped, ``--exclude`` globs on the key below the root, the
    order of a walk (key by key, name by name). Objects have no device, inode or real path."""
    found = Discovery()
    if root.is_file():
        try:
            size, mtime_ns = objectstore.stat(root.uri) or (0, 0)
        except OSError as exc:
            raise objectstore.translate(exc, root.uri) from exc
        found.files.append(FoundFile(root.uri, size, mtime_ns))
        return found
    listed = []
    for uri, size, mtime_ns in objectstore.list_files(root):
        names = uri[len(root.uri) + 1 :].split("/")
        if any(name.startswith(".") for name in names) or not _has_image_suffix(uri):
            continue
        if excludes and any(
            fnmatch.fnmatch("/".join(names), glob)
            or fnmatch.fnmatch(uri, glob)
            or fnmatch.fnmatch(names[-1], glob)
            for glob in excludes
        ):
            continue
        listed.append((names, FoundFile(uri, size, mtime_ns)))
    found.files = [file for _, file in sorted(listed, key=lambda entry: entry[0])]
    return found


def _add_file(
    found: Discovery, path: str, real: str, root: str, excludes: Sequence[str], explicit: bool
) -> None:
    if not _has_image_suffix(path) and not explicit:
        return
    if is_excluded(path, root, excludes):
        return
    try:
        stat = os.stat(path)
    except OSError as exc:
        found.problems.append((path, f"cannot read file: {exc.strerror or exc}"))
        return
    found.files.append(FoundFile(path, stat.st_size, stat.st_mtime_ns, *file_key(stat), real))


def _walk(
    folder: str, seen: set[tuple[int, int]], found: Discovery, within: tuple[str, ...] = ()
) -> Iterator[tuple[str, str]]:
    """(path, real path) of every file under ``folder``; the real path has no symlink on
    it: resolved once per folder (a linked file on its own), not once per file."""
    try:
        stat = os.stat(folder)
    except OSError as exc:
        found.problems.append((folder, f"cannot read folder: {exc.strerror or exc}"))
        return
    key = (stat.st_dev, stat.st_ino)
    if key in seen:  # symlink loop or a second link to a folder already walked
        return
    seen.add(key)
    real_folder = os.path.realpath(folder)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        found.problems.append((folder, f"cannot list folder: {exc.strerror or exc}"))
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            is_dir = entry.is_dir()
            is_file = not is_dir and entry.is_file()
        except OSError as exc:
            found.problems.append((entry.path, _entry_problem(exc)))
            continue
        if (is_dir or is_file) and within and _leads_out(entry, within):
            if is_dir or _has_image_suffix(entry.name):
                found.problems.append((entry.path, OUTSIDE_ROOTS))
            continue
        if is_dir:
            yield from _walk(entry.path, seen, found, within)
        elif is_file:
            if entry.is_symlink():  # a linked file: its own target
                yield entry.path, os.path.realpath(entry.path)
            else:
                yield entry.path, os.path.join(real_folder, entry.name)
        elif entry.is_symlink() and _has_image_suffix(entry.name):
            found.problems.append((entry.path, "broken symlink: its target does not exist"))


def _leads_out(entry: os.DirEntry, within: tuple[str, ...]) -> bool:
    """True when ``entry`` is a symlink whose final target is outside every ``within``."""
    if not entry.is_symlink():
        return False
    target = os.path.realpath(entry.path)
    return not any(target == r or target.startswith(r.rstrip(os.sep) + os.sep) for r in within)


def _has_image_suffix(name: str) -> bool:
    """An image's or a video's suffix (both are indexed)."""
    return os.path.splitext(name)[1].lower() in _SUFFIXES


def _entry_problem(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop: the link leads back to itself"
    return f"cannot read entry: {exc.strerror or exc}"


def has_indexable_suffix(path: str) -> bool:
    """Whether a file name ends in a suffix clipdex indexes (a watcher's event filter)."""
    return _has_image_suffix(path)
