"""The vector index: FAISS ``IndexIDMap2`` over ``IndexFlatIP``; the only module importing faiss.

It stores integer ids (the catalog's primary keys) and unit vectors, nothing else, so inner
product is cosine similarity. Files are written to a temporary name, fsynced and renamed
into place, so a reader or a crash only ever sees a whole file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import faiss
import numpy as np

from .errors import LibraryError
from .model import EMBED_DIM


class VectorIndex:
    """Exact cosine search over id-tagged vectors."""

    def __init__(self, dim: int = EMBED_DIM, index: faiss.Index | None = None) -> None:
        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.mmapped = False  # a memory-mapped index is read-only

    # -- persistence ----------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, *, mmap: bool = False) -> VectorIndex:
        """Read an index file; ``mmap`` maps the vectors instead of copying them (read-only)."""
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            index = faiss.read_index(str(path), flags)
        except RuntimeError as exc:
            raise LibraryError(
                f"the vector index {path} is damaged ({str(exc).splitlines()[0][:120]}): "
                "run `clipdex repair` to rebuild it from the catalog"
            ) from exc
        if not isinstance(index, faiss.IndexIDMap2):
            index = faiss.downcast_index(index)
        loaded = cls(index.d, index)
        loaded.mmapped = mmap
        return loaded

    def save(self, path: Path) -> None:
        """Write atomically: temporary file in the same folder, fsync, rename."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            faiss.write_index(self.index, tmp)
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    # -- contents -------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> int:
        if len(ids) == 0:
            return 0
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64))
        return int(self.index.remove_ids(selector))

    def reconstruct(self, image_id: int) -> np.ndarray:
        return self.index.reconstruct(int(image_id))

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row; ``allowed_ids`` restricts the candidates.

        With a restriction the top-k is taken from the allowed set itself (FAISS applies the
        selector during the scan), not filtered out of an unrestricted top-k.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, min(int(k), len(self)))
        if len(self) == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        params = None
        if allowed_ids is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
            params = faiss.SearchParameters(sel=selector)
        scores, ids = self.index.search(queries, k, params=params)
        return scores, ids


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
