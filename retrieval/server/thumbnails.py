"""JPEG thumbnails of catalogued photos, cached on disk inside the library.

Every request opens the photo through :func:`retrieval.server.originals.open_catalogued`
(no link on its path, the catalogued device, inode, size and mtime), so a file swapped in
is refused even when its thumbnail is cached. A thumbnail is keyed by what is actually
read: a digest of the catalogued hash and the *open descriptor's* device, inode, size,
mtime and ctime (``LIBRARY/thumbnails/<size>/<key[:2]>/<key>.jpg``, a 40-hex name). Any
write to the file moves its ctime, which no user can set back, so bytes changed in place
(even with size and mtime restored) or a file swapped and then restored get a new key and
a fresh render, never a stale or poisoned one; and the descriptor is fstat'ed again after
the read, so bytes changed *during* the read are not cached under the earlier key. The ETag
is derived from the same key (a 304 only for the file as it is now).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from indexer.errors import DecodeError
from indexer.ingest.decode import MODEL_IMAGE_SIZE, open_rgb
from indexer.ingest.video import frame_at
from retrieval.server.errors import FileChanged, FileUnavailable
from retrieval.server.originals import (
    OnChanged,
    check_is_catalogued,
    is_object,
    open_catalogued,
    open_object,
    read_object,
)

log = logging.getLogger("clipdex.server")

THUMBNAIL_SIZES = (128, 256, 512, 1024)
CACHE_CONTROL = "private, max-age=86400"


@dataclass(frozen=True)
class Thumbnail:
    """A rendered or cached thumbnail: bytes in memory or a cache file, and its ETag;
    ``not_modified`` when the client's If-None-Match already names it (send a 304)."""

    etag: str
    path: Path | None = None
    data: bytes | None = None
    not_modified: bool = False


class ThumbnailCache:
    """Renders thumbnails with EXIF orientation applied and keeps them on disk."""

    def __init__(
        self,
        folder: Path,
        max_megapixels: float,
        slots: threading.BoundedSemaphore | None = None,
        quality: int = 85,
        on_changed: OnChanged | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.max_megapixels = max_megapixels
        self.slots = slots or threading.BoundedSemaphore(2)  # bounds decode memory
        self.quality = quality
        self.on_changed = on_changed  # queues a photo whose file changed for re-indexing

    @staticmethod
    def key(row: dict, opened: os.stat_result) -> str:
        """What a thumbnail is keyed by: the catalogued hash and the open file's stamp."""
        stamp = (
            f"{row['sha256']}:{opened.st_dev}:{opened.st_ino}:{opened.st_size}:"
            f"{opened.st_mtime_ns}:{opened.st_ctime_ns}"
        )
        return hashlib.sha256(stamp.encode()).hexdigest()[:40]

    def cache_path(self, key: str, size: int) -> Path:
        return self.folder / str(size) / key[:2] / f"{key}.jpg"

    def get(
        self, row: dict, size: int, if_none_match: str = "", at: float | None = None
    ) -> Thumbnail:
        """The thumbnail of a catalog row whose longer side is at most ``size`` pixels; of a
        video, of its frame at ``at`` seconds (None: the frame its row holds).

        Raises what :func:`~retrieval.server.originals.open_catalogued` raises when the
        file at the row's path is not the one indexed (then nothing is read or cached).
        """
        video = row.get("kind") == "video"
        if video and at is None:
            at = float(row.get("frame_time") or 0.0)
        if is_object(row):
            return self._get_object(row, size, if_none_match, at if video else None)
        fd, opened = open_catalogued(row, self.on_changed)
        with os.fdopen(fd, "rb") as handle:
            key = self.key(row, opened)
            if video:  # one thumbnail per frame asked for
                key = hashlib.sha256(f"{key}@{at:.3f}".encode()).hexdigest()[:40]
            etag, cached, ready = self._cached(key, size, if_none_match)
            if ready is not None:
                return ready
            with self.slots:
                if video:  # a video is read where needed (by seeking), never whole
                    data = self.render_frame(handle, at, size, row["id"])
                    self._check_unchanged(row, opened, os.fstat(handle.fileno()))
                else:
                    source = handle.read()
                    self._check_unchanged(row, opened, os.fstat(handle.fileno()))
                    data = self.render(source, size, row["id"], name=row["path"])
        self._store(cached, data)
        return Thumbnail(etag, data=data)

    def _get_object(self, row: dict, size: int, if_none_match: str, at: float | None) -> Thumbnail:
        """:meth:`get` for a photo indexed from object storage: the object is read (and its
        content checked against the catalogued hash) unless the client or the cache already
        has the thumbnail of the object as catalogued (hash, URI, size and LastModified).
        ``at``: a video's second (None for a photo)."""
        stamp = f"{row['sha256']}:{row['path']}:{row['size']}:{row['mtime_ns']}"
        if at is not None:
            stamp += f"@{at:.3f}"
        key = hashlib.sha256(stamp.encode()).hexdigest()[:40]
        etag, cached, ready = self._cached(key, size, if_none_match)
        if ready is not None:
            return ready
        if at is not None:  # a video: FFmpeg seeks in the object, which is not read whole
            with open_object(row, self.on_changed) as handle, self.slots:
                data = self.render_frame(handle, at, size, row["id"])
        else:
            source = read_object(row, self.on_changed)
            with self.slots:
                data = self.render(source, size, row["id"], name=row["path"])
        self._store(cached, data)
        return Thumbnail(etag, data=data)

    def _cached(
        self, key: str, size: int, if_none_match: str
    ) -> tuple[str, Path, Thumbnail | None]:
        """The ETag and cache file of thumbnail ``key`` at ``size``, and the answer when
        nothing needs rendering: a 304 when the client names the ETag, else the cache file
        when it is on disk (None: render, then store at the cache file)."""
        etag = f'"{key[:24]}-{size}"'
        cached = self.cache_path(key, size)
        if etag_matches(if_none_match, etag):
            return etag, cached, Thumbnail(etag, not_modified=True)
        if cached.is_file():
            return etag, cached, Thumbnail(etag, path=cached)
        return etag, cached, None

    def _check_unchanged(self, row: dict, before: os.stat_result, after: os.stat_result) -> None:
        """The file was written while it was read: its bytes are not the keyed ones."""
        if self.key(row, before) == self.key(row, after):
            return
        try:
            check_is_catalogued(row, after)
        except FileChanged as exc:  # its size or mtime moved: queue it as any changed file
            if self.on_changed is not None:
                self.on_changed(row, exc.reason)
            raise
        raise FileUnavailable(
            f"the file of photo {row['id']} was being written while its thumbnail was made: "
            "retry shortly"
        )

    def render(self, source: bytes, size: int, image_id: int, name: str | None = None) -> bytes:
        """Decode (oriented, RGB), shrink to fit ``size``, encode as a progressive JPEG.

        ``name`` (the file's path) lets a camera RAW be recognised by its suffix."""
        try:
            # The DCT-domain draft keeps the short side >= 256, enough for small sizes only.
            image, _ = open_rgb(
                source,
                max_megapixels=self.max_megapixels,
                draft=size <= MODEL_IMAGE_SIZE,
                name=name,
            )
        except DecodeError as exc:
            raise FileUnavailable(f"cannot make a thumbnail of photo {image_id}: {exc}") from exc
        image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=self.quality, optimize=True, progressive=True)
        return out.getvalue()

    def render_frame(self, handle, seconds: float, size: int, image_id: int) -> bytes:
        """A video's frame at ``seconds`` (rotation applied), shrunk to ``size``, as JPEG."""
        try:
            image = frame_at(handle, seconds, size)
        except DecodeError as exc:
            raise FileUnavailable(f"cannot make a thumbnail of video {image_id}: {exc}") from exc
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.convert("RGB").save(out, "JPEG", quality=self.quality, optimize=True)
        return out.getvalue()

    def _store(self, target: Path, data: bytes) -> None:
        """Write atomically; a read-only or full disk only costs the cache, not the answer."""
        tmp = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".thumb.", dir=target.parent)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, target)
        except OSError as exc:
            log.warning("thumbnail cache not written (%s): %s", target, exc)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Whether an If-None-Match header names ``etag`` (weak or strong) or is ``*``."""
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags
