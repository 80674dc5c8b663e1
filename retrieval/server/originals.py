"""Open a catalogued photo's file safely: only the very file that was indexed is served.

A catalog row names a path; between indexing and a request, that path may have been
replaced by another file, or it or any folder above it by a symbolic link to anything the
server can read (``/etc/passwd``, the token file). So the server never serves "whatever the
path leads to now":

- **No link anywhere on the path.** The indexer records each photo's *real* path (every
  symlink resolved, at indexing: the links a user indexed through on purpose are honoured
  as they were then). The server walks that path from ``/`` one component at a time
  (``openat`` with ``O_NOFOLLOW | O_DIRECTORY``, the photo itself with ``O_NOFOLLOW |
  O_NONBLOCK | O_NOCTTY``), so a link met anywhere on it now was put there since: refused.
  Rows from before the catalog kept real paths are walked on their catalogued path, just
  as strictly (indexing again records their real path).
- **The same file.** ``fstat`` of the open descriptor must show the device, inode, size and
  mtime the catalog recorded (rows from before identities were kept: size and mtime).

A mismatch is :class:`~retrieval.server.errors.FileChanged` (404 ``file_changed``, "run
clipdex index"), never the bytes, and the photo is queued for re-indexing (the caller's
``on_changed``). Everything is checked on the descriptor that is then read, so there is no
window between the check and the read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import weakref
from collections.abc import Callable, Iterator

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    MalformedRangeHeader,
    RangeNotSatisfiable,
    StreamingResponse,
)
from starlette.types import Receive, Scope, Send

from indexer.fsutil import file_key
from indexer.ingest import objectstore
from retrieval.server.errors import FileChanged, FileUnavailable, error_response

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | NOFOLLOW
# Folders are only walked through: O_PATH needs no read permission on them (Linux).
FOLDER_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC | NOFOLLOW
# A component that is a link now (or no longer a folder): the path was changed under us.
# (ELOOP: a link met with O_NOFOLLOW; FreeBSD says EMLINK; ENOTDIR: with O_DIRECTORY.)
SWAPPED = (errno.ELOOP, errno.ENOTDIR, errno.EMLINK)
LINK_ON_PATH = "a symbolic link (or another kind of file) is on its path now"
REINDEX = "run `clipdex index` on its folder again"
# Names of this process's open descriptors: opening one opens that very file (Linux; BSDs
# and macOS have /dev/fd).
FD_FOLDER = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"

OnChanged = Callable[[dict, str], None]  # (row, reason): queue the photo for re-indexing


def open_catalogued(row: dict, on_changed: OnChanged | None = None) -> tuple[int, os.stat_result]:
    """An open descriptor on the file the catalog row recorded, with its stat.

    Raises :class:`FileUnavailable` (404) when there is no readable regular file at the
    path, :class:`FileChanged` (404 ``file_changed``) when the path holds a link or leads
    to another file than the one indexed; ``on_changed(row, reason)`` is called first.
    The caller closes the descriptor.
    """
    try:
        fd = _open_without_links(row)
        try:
            result = os.fstat(fd)
            check_is_catalogued(row, result)
        except BaseException:
            os.close(fd)
            raise
    except FileChanged as exc:
        if on_changed is not None:
            on_changed(row, exc.reason)
        raise
    return fd, result


def is_object(row: dict) -> bool:
    """Whether the row's photo was indexed from object storage (its path is a URI)."""
    return objectstore.is_uri(row["path"])


def read_object(row: dict, on_changed: OnChanged | None = None) -> bytes:
    """The bytes of a photo indexed from object storage (``s3://``, ``gs://``), read
    through :mod:`indexer.ingest.objectstore` with the server's settings.

    The bytes read are checked against the catalogued content hash, so an object replaced
    since it was indexed is :class:`FileChanged` (and queued for re-indexing), never served.
    A gone object is :class:`FileUnavailable`; a store that cannot be reached at all is
    :class:`~indexer.errors.ObjectStoreError` (502, naming the URI and what to set).
    """
    image_id, uri = row["id"], row["path"]
    try:
        data = objectstore.read_bytes(uri)
    except FileNotFoundError as exc:
        raise FileUnavailable(f"the object of photo {image_id} is gone ({uri}): {REINDEX}") from exc
    except OSError as exc:
        raise objectstore.translate(exc, uri) from exc
    if row.get("sha256") and hashlib.sha256(data).hexdigest() != row["sha256"]:
        exc = _changed(image_id, "another object is at its URI now (content differs)")
        if on_changed is not None:
            on_changed(row, exc.reason)
        raise exc
    return data


def open_object(row: dict, on_changed: OnChanged | None = None):
    """A seekable binary file over a video indexed from object storage, for streaming and
    seeking without reading it whole: its size and LastModified must still be the
    catalogued ones (a video is not hashed again per request), else :class:`FileChanged`
    (queued for re-indexing). The caller closes it."""
    image_id, uri = row["id"], row["path"]
    try:
        now = objectstore.stat(uri)
        if now is not None and now == (row["size"], row["mtime_ns"]):
            return objectstore.open_input(uri)
    except FileNotFoundError:
        now = None
    except OSError as exc:
        raise objectstore.translate(exc, uri) from exc
    if now is None:
        raise FileUnavailable(f"the object of photo {image_id} is gone ({uri}): {REINDEX}")
    exc = _changed(image_id, "another object is at its URI now (size or LastModified differ)")
    if on_changed is not None:
        on_changed(row, exc.reason)
    raise exc


def object_video_response(
    request: Request, row: dict, media_type: str, headers: dict, on_changed: OnChanged | None
) -> StreamingResponse:
    """A video indexed from object storage, streamed, never held whole (see
    :func:`open_object`): one byte ``Range`` is answered 206 from a seek, so a player starts
    anywhere without the bytes before; several ranges, or none, get the whole object. A
    Range Starlette would refuse is the same JSON error as for a file (400 / 416)."""
    size = int(row["size"])
    handle = open_object(row, on_changed)
    headers = {**headers, "Accept-Ranges": "bytes", "Content-Length": str(size)}
    http_range = request.headers.get("range")
    ranges, refused = parse_range(request, http_range, size) if http_range else ([], None)
    if refused is not None:
        handle.close()
        return refused
    if len(ranges) != 1:
        return StreamingResponse(object_chunks(handle), media_type=media_type, headers=headers)
    start, end = ranges[0]  # end exclusive
    handle.seek(start)
    headers["Content-Length"] = str(end - start)
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    chunks = object_chunks(handle, end - start)
    return StreamingResponse(chunks, 206, media_type=media_type, headers=headers)


def object_chunks(handle, limit: int | None = None, chunk: int = 1 << 20) -> Iterator[bytes]:
    """An open object's bytes in chunks (a streamed response), at most ``limit`` of them,
    closing it at the end."""
    left = limit
    try:
        while left is None or left > 0:
            data = handle.read(chunk if left is None else min(chunk, left))
            if not data:
                break
            if left is not None:
                left -= len(data)
            yield data
    finally:
        handle.close()


def parse_range(request: Request, http_range: str, size: int):
    """(the byte ranges asked for, [(start, end exclusive)]; [] for more than Starlette
    serves, None) or (None, the JSON error refusing the header: 400 ``bad_request``, 416
    with ``Content-Range``)."""
    try:
        return FileResponse._parse_range_header(http_range, size), None
    except MalformedRangeHeader as exc:
        message = f"{exc.content or 'malformed Range header'}: use bytes=START-END"
        return None, error_response(request, 400, "bad_request", message)
    except RangeNotSatisfiable:
        message = f"the Range is outside the file's {size} bytes"
        headers = {"Content-Range": f"bytes */{size}"}
        return None, error_response(request, 416, "range_not_satisfiable", message, headers)


def serving_path(row: dict) -> str:
    """The path the server opens: the real path recorded at indexing, else the row's path."""
    return row.get("real_path") or row["path"]


def _open_without_links(row: dict) -> int:
    """Open the row's file walking its path from ``/``, following no symlink at all."""
    image_id = row["id"]
    names = os.fsencode(serving_path(row)).split(b"/")
    if names[0] or not names[-1] or {b".", b".."} & set(names):  # never in a catalogued path
        raise _changed(image_id, "its catalogued path is not a plain absolute path")
    names = [name for name in names if name]
    try:
        folder = os.open("/", FOLDER_FLAGS)
    except OSError as exc:
        raise _unreadable(image_id, exc) from exc
    try:
        for name in names[:-1]:
            folder = _step(folder, os.open(name, FOLDER_FLAGS, dir_fd=folder))
        return os.open(names[-1], OPEN_FLAGS, dir_fd=folder)
    except OSError as exc:
        if exc.errno in SWAPPED:
            raise _changed(image_id, LINK_ON_PATH) from exc
        raise _unreadable(image_id, exc) from exc
    except ValueError as exc:  # a NUL byte: never in a catalogued path
        raise _unreadable(image_id, exc) from exc
    finally:
        os.close(folder)


def _step(folder: int, child: int) -> int:
    os.close(folder)
    return child


def check_is_catalogued(row: dict, result: os.stat_result) -> None:
    """FileChanged unless ``result`` (an fstat) is the file the row recorded: device, inode
    (where recorded), size and mtime; FileUnavailable if it is not a regular file."""
    image_id = row["id"]
    if not stat.S_ISREG(result.st_mode):
        raise FileUnavailable(f"the file of photo {image_id} is no longer a regular file")
    differs = [
        name
        for name, now, then in (
            ("size", result.st_size, row["size"]),
            ("mtime", result.st_mtime_ns, row["mtime_ns"]),
        )
        if now != then
    ]
    if row.get("inode") is not None and file_key(result) != (row.get("device"), row["inode"]):
        differs.insert(0, "device/inode")
    if differs:
        raise _changed(image_id, f"another file is at its path now ({', '.join(differs)} differ)")


def _changed(image_id: int, reason: str) -> FileChanged:
    return FileChanged(
        f"the file of photo {image_id} changed since it was indexed: {reason}; {REINDEX} "
        "(it is queued for re-indexing)",
        reason=reason,
    )


def _unreadable(image_id: int, exc: BaseException) -> FileUnavailable:
    reason = getattr(exc, "strerror", None) or type(exc).__name__
    return FileUnavailable(
        f"the file of photo {image_id} is no longer readable ({reason}): {REINDEX}"
    )


class RangeCheckedFileResponse(FileResponse):
    """FileResponse whose refusal of a Range header is the JSON error shape (Starlette
    answers it in plain text): 400 ``bad_request``, or 416 with ``Content-Range``."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = self._bad_range(scope)
        if refused is not None:
            await refused(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def _bad_range(self, scope: Scope):
        """A JSON error for a Range header Starlette would refuse, else None."""
        headers = Headers(scope=scope)
        http_range = headers.get("range")
        if http_range is None or scope.get("method", "GET").upper() not in ("GET", "HEAD"):
            return None
        if self.stat_result is None:  # a plain path: stat it now, as Starlette would
            try:
                self.stat_result = os.stat(self.path)
            except OSError:
                return None  # Starlette's own answer
            self.set_stat_headers(self.stat_result)  # If-Range compares with these
        if_range = headers.get("if-range")
        if if_range is not None and not self._should_use_range(if_range):
            return None  # the whole file is sent
        return parse_range(Request(scope), http_range, self.stat_result.st_size)[1]


class CataloguedFileResponse(RangeCheckedFileResponse):
    """Starlette's FileResponse (ranges, ETag, HEAD) over a checked descriptor.

    The stock response opens its path when it sends, which would undo the check; this one
    is given the descriptor's own name (``/proc/self/fd/N``), which opens the very file
    :func:`open_catalogued` checked whatever now lies at the catalogued path, and closes the
    descriptor when the response is done (or dropped unsent).
    """

    def __init__(self, fd: int, stat_result: os.stat_result, **kwargs) -> None:
        super().__init__(f"{FD_FOLDER}/{fd}", stat_result=stat_result, **kwargs)
        self._close = weakref.finalize(self, os.close, fd)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._close()
