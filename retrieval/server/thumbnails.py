"""JPEG thumbnails of catalogued photos, cached on disk inside the library.

A thumbnail is keyed by the photo's content hash and size
(``LIBRARY/thumbnails/<size>/<sha[:2]>/<sha>.jpg``), so a changed file (which gets a new
catalog row) never shows a stale thumbnail, and copies share one. The ETag is derived from
the same key, so a browser revalidates without the server touching the photo. A photo is
read only through :func:`retrieval.server.originals.read_catalogued`: the file that was
indexed (same device and inode), never a file or link swapped in at its path since.
"""

from __future__ import annotations

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
from retrieval.server.errors import FileUnavailable
from retrieval.server.originals import read_catalogued

log = logging.getLogger("clipdex.server")

THUMBNAIL_SIZES = (128, 256, 512, 1024)
CACHE_CONTROL = "private, max-age=86400"


@dataclass(frozen=True)
class Thumbnail:
    """A rendered or cached thumbnail: bytes in memory or a cache file, and its ETag."""

    etag: str
    path: Path | None = None
    data: bytes | None = None


class ThumbnailCache:
    """Renders thumbnails with EXIF orientation applied and keeps them on disk."""

    def __init__(
        self,
        folder: Path,
        max_megapixels: float,
        slots: threading.BoundedSemaphore | None = None,
        quality: int = 85,
    ) -> None:
        self.folder = Path(folder)
        self.max_megapixels = max_megapixels
        self.slots = slots or threading.BoundedSemaphore(2)  # bounds decode memory
        self.quality = quality

    @staticmethod
    def etag(row: dict, size: int) -> str:
        return f'"{row["sha256"][:24]}-{size}"'

    def cache_path(self, row: dict, size: int) -> Path:
        sha = row["sha256"]
        return self.folder / str(size) / sha[:2] / f"{sha}.jpg"

    def get(self, row: dict, size: int) -> Thumbnail:
        """The thumbnail of a catalog row whose longer side is at most ``size`` pixels."""
        etag = self.etag(row, size)
        cached = self.cache_path(row, size)
        if cached.is_file():
            return Thumbnail(etag, path=cached)
        with self.slots:
            data = self.render(read_catalogued(row), size, row["id"])
        self._store(cached, data)
        return Thumbnail(etag, data=data)

    def render(self, source: bytes, size: int, image_id: int) -> bytes:
        """Decode (oriented, RGB), shrink to fit ``size``, encode as a progressive JPEG."""
        try:
            # The DCT-domain draft keeps the short side >= 256, enough for small sizes only.
            image, _ = open_rgb(
                source, max_megapixels=self.max_megapixels, draft=size <= MODEL_IMAGE_SIZE
            )
        except DecodeError as exc:
            raise FileUnavailable(f"cannot make a thumbnail of photo {image_id}: {exc}") from exc
        image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=self.quality, optimize=True, progressive=True)
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
