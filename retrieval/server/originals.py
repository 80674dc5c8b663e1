"""Open a catalogued photo's file safely: only the very file that was indexed is served.

A catalog row names a path; between indexing and a request, that path may have been
replaced by another file or by a symbolic link to anything the server can read
(``/etc/passwd``, the token file). So the server never serves "whatever the path leads to
now": it opens the path without following a final symlink (``O_NOFOLLOW``) and without
blocking on a FIFO or taking a terminal (``O_NONBLOCK | O_NOCTTY``), ``fstat``\\s the open
descriptor and compares it with what the catalog recorded when the file was indexed:

- rows with a file identity (schema 4 on): the same device and inode, which no swapped-in
  file or link target can have. A photo that was catalogued through a link of the user's
  own (``clipdex index`` follows links) is opened through it, and the identity decides;
- older rows (no identity yet): the same size and mtime, and no link at the path.

A mismatch is :class:`~retrieval.server.errors.FileChanged` (409, "run clipdex index"),
never the bytes. Everything is checked on the descriptor that is then read, so there is no
window between the check and the read. Directory components are followed (a user's
album may be a link); the identity check covers a directory swapped for a link too.
"""

from __future__ import annotations

import errno
import os
import stat
import weakref

from starlette.responses import FileResponse
from starlette.types import Receive, Scope, Send

from indexer.fsutil import file_key
from retrieval.server.errors import FileChanged, FileUnavailable

OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
REINDEX = "run `clipdex index` on its folder again"
# Names of this process's open descriptors: opening one opens that very file (Linux; BSDs
# and macOS have /dev/fd).
FD_FOLDER = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"


def open_catalogued(row: dict) -> tuple[int, os.stat_result]:
    """An open descriptor on the file the catalog row recorded, with its stat.

    Raises :class:`FileUnavailable` (404) when there is no readable regular file at the
    path, :class:`FileChanged` (409) when the path leads to another file than the one
    indexed. The caller closes the descriptor.
    """
    fd = _open_no_follow(row)
    try:
        result = os.fstat(fd)
        _check_is_catalogued(row, result)
    except BaseException:
        os.close(fd)
        raise
    return fd, result


def read_catalogued(row: dict) -> bytes:
    """The bytes of the file the catalog row recorded (see :func:`open_catalogued`)."""
    fd, _ = open_catalogued(row)
    with os.fdopen(fd, "rb") as handle:
        return handle.read()


def _open_no_follow(row: dict) -> int:
    path, image_id = row["path"], row["id"]
    try:
        return os.open(path, OPEN_FLAGS | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise _unreadable(image_id, exc) from exc
        if row.get("inode") is None:  # a link, and no identity to check its target against
            raise FileChanged(
                f"the file of photo {image_id} is now a symbolic link, not the file that was "
                f"indexed: {REINDEX}"
            ) from exc
    try:  # catalogued through a link of the user's: follow it, the identity decides
        return os.open(path, OPEN_FLAGS)
    except (OSError, ValueError) as exc:
        raise _unreadable(image_id, exc) from exc


def _check_is_catalogued(row: dict, result: os.stat_result) -> None:
    image_id = row["id"]
    if not stat.S_ISREG(result.st_mode):
        raise FileUnavailable(f"the file of photo {image_id} is no longer a regular file")
    if row.get("inode") is not None:
        same = file_key(result) == (row.get("device"), row["inode"])
    else:  # a row from before the catalog kept identities
        same = (result.st_size, result.st_mtime_ns) == (row["size"], row["mtime_ns"])
    if not same:
        raise FileChanged(
            f"the file of photo {image_id} changed since it was indexed (another file is at "
            f"its path now): {REINDEX}"
        )


def _unreadable(image_id: int, exc: BaseException) -> FileUnavailable:
    reason = getattr(exc, "strerror", None) or type(exc).__name__
    return FileUnavailable(
        f"the file of photo {image_id} is no longer readable ({reason}): {REINDEX}"
    )


class CataloguedFileResponse(FileResponse):
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
