"""The ``exact`` vector store: FAISS ``IndexIDMap2`` over ``IndexFlatIP``.

It implements :class:`~indexer.store.vectorstore.VectorStore`: integer ids (the catalog's
primary keys) and unit vectors, nothing else, so inner product is cosine similarity, and a
search scans every vector. Files are written to a temporary name, fsynced and renamed into
place, so a reader or a crash only ever sees a whole file; each carries a stamp
(:mod:`indexer.store.vectorstore`) whose size and count are checked on load (the full CRC
by `clipdex repair`). A failed write (disk full, I/O error)
removes its temporary file and leaves the previous files untouched.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import faiss
import numpy as np

from indexer.errors import DiskFull, LibraryDamaged, LibraryError
from indexer.fsutil import write_atomic
from indexer.model.identity import EMBED_DIM
from indexer.store.vectorstore import (
    check_stamp,
    damage_message,
    make_stamp,
    read_stamp,
    stamp_path,
)


class VectorIndex:
    """Exact cosine search over id-tagged vectors (the ``exact`` kind of vector store)."""

    kind: ClassVar[str] = "exact"

    def __init__(self, dim: int = EMBED_DIM, index: faiss.Index | None = None) -> None:
        self.dim = dim
        self.index = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self.mmapped = False  # a memory-mapped index is read-only

    # -- persistence ----------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, *, mmap: bool = False, verify: bool = True) -> VectorIndex:
        """Read an index file; ``mmap`` maps the vectors instead of copying them (read-only).

        With ``verify`` the file must match its stamp in kind, size and vector count
        (:class:`UnstampedIndex` when it has none, :class:`~indexer.errors.LibraryDamaged`
        when it differs); the CRC of every byte is checked by
        :func:`~indexer.store.vectorstore.verify_file` (repair), not here. A file that vanished
        (a writer replaced it) raises ``FileNotFoundError`` so the caller can look again.
        """
        path = Path(path)
        # IO_FLAG_MMAP_IFC maps a flat index's vectors; IO_FLAG_MMAP alone still copies them.
        mapped = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)
        flags = mapped | faiss.IO_FLAG_READ_ONLY if mmap else 0
        index, stamp = read_faiss_index(path, cls.kind, flags, verify)
        if not isinstance(index, faiss.IndexIDMap2):
            index = faiss.downcast_index(index)
        check_count(path, index, stamp)
        loaded = cls(index.d, index)
        loaded.mmapped = mmap
        return loaded

    def save(self, path: Path) -> None:
        """Write atomically with a stamp: temporary files, fsync, stamp renamed, index renamed.

        Any write failure removes the temporary files and raises :class:`DiskFull` (no
        space) or :class:`LibraryError`; the files already in place are never touched.
        """
        save_faiss_index(
            path,
            self.index,
            lambda size, crc: make_stamp(self.kind, len(self), self.dim, size, crc),
        )

    def in_memory(self) -> VectorIndex:
        """A writable copy of a memory-mapped index (self when not mapped).

        A mapped index is a read-only view: FAISS aborts the process, not raises, when one
        (or its ``clone_index``) is changed, so changes go to a copy built from its vectors.
        """
        if not self.mmapped:
            return self
        flat = faiss.downcast_index(self.index.index)
        count = len(self)
        vectors = faiss.rev_swig_ptr(flat.get_xb(), count * self.dim).reshape(count, self.dim)
        copy = VectorIndex(self.dim)
        copy.add(self.ids(), vectors.copy())
        return copy

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

    def range_search(
        self, queries: np.ndarray, radius: float, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every stored vector scoring above ``radius`` per query row, as FAISS's
        (lims, scores, ids): the hits of row i are ``[lims[i]:lims[i + 1]]``, unordered.

        ``allowed_ids`` restricts the candidates during the scan, as in :meth:`search`; a
        radius of -inf returns every (allowed) score, i.e. the query's whole distribution.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        if len(self) == 0:
            empty = np.zeros(0, np.float32), np.zeros(0, np.int64)
            return np.zeros(len(queries) + 1, np.int64), *empty
        params = None
        if allowed_ids is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed_ids, dtype=np.int64))
            params = faiss.SearchParameters(sel=selector)
        radius = max(float(radius), -3.0)  # cosines are >= -1; FAISS keeps score > radius
        lims, scores, ids = self.index.range_search(queries, radius, params=params)
        return lims.astype(np.int64), scores, ids.astype(np.int64)


def set_search_threads(count: int) -> None:
    """Threads FAISS (OpenMP) may use per call, process-wide.

    A server answering one query per request wants 1: a single-query flat search gains
    nothing from a thread team, and teams spinning in many request threads cost ~10 ms
    per query on a 2-core machine (measured by bench/bench_server.py).
    """
    faiss.omp_set_num_threads(max(1, int(count)))


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def save_faiss_index(path: Path, index: faiss.Index, stamp: Callable[[int, int], dict]) -> None:
    """Write ``index`` to ``path`` atomically with its stamp, for every FAISS-based kind:
    temporary file, fsync, stamp renamed, index renamed. ``stamp(size, crc32)`` makes the
    stamp from the bytes written. Any write failure removes the temporary file and raises
    :class:`DiskFull` or :class:`LibraryError`; the files already in place are never touched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            size, crc = _write_through_python(index, handle)
            handle.flush()
            os.fsync(handle.fileno())
        write_atomic(stamp_path(path), json.dumps(stamp(size, crc)).encode())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(exc, path) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_faiss_index(
    path: Path, kind: str, flags: int, verify: bool
) -> tuple[faiss.Index, dict | None]:
    """Read a FAISS-based kind's file: (the index, its stamp or None without ``verify``).

    With ``verify`` the stamp must name ``kind`` and match the file's size (checked before
    reading); a file FAISS cannot read is :class:`LibraryDamaged`; one that vanished (a
    writer replaced it) raises ``FileNotFoundError`` so the caller can look again.
    """
    stamp = read_stamp(path) if verify else None
    if stamp is not None:
        if stamp["kind"] != kind:
            raise LibraryError(f"{path} is a {stamp['kind']!r} index, not {kind!r}")
        check_stamp(path, stamp)
    try:
        return faiss.read_index(str(path), flags), stamp
    except RuntimeError as exc:
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, "index file replaced", str(path)) from exc
        raise LibraryDamaged(damage_message(path, str(exc).splitlines()[0][:120])) from exc


def check_count(path: Path, index: faiss.Index, stamp: dict | None) -> None:
    """:class:`LibraryDamaged` when the index holds another number of vectors than its
    stamp says."""
    if stamp is not None and int(index.ntotal) != stamp["count"]:
        raise LibraryDamaged(damage_message(path, "vector count differs from its stamp"))


def _write_through_python(index: faiss.Index, handle) -> tuple[int, int]:
    """Serialise into ``handle`` through Python, so every write error surfaces; returns
    (bytes written, their CRC-32)."""
    state = {"size": 0, "crc32": 0}

    def sink(chunk: bytes) -> None:
        handle.write(chunk)
        state["size"] += len(chunk)
        state["crc32"] = zlib.crc32(chunk, state["crc32"])

    writer = faiss.PyCallbackIOWriter(sink)
    faiss.write_index(index, writer)
    del writer  # flushes FAISS's buffer into ``sink``
    return state["size"], state["crc32"]


def write_error(exc: BaseException, path: Path) -> LibraryError:
    """A failed index write as a typed error: disk full, or another I/O problem."""
    if getattr(exc, "errno", None) in _NO_SPACE or "No space left" in str(exc):
        return DiskFull.at(path.parent)
    detail = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:160]
    return LibraryError(
        f"cannot write the vector index {path} ({detail}): the library keeps its previous "
        "checkpoint; check the disk and run the command again"
    )


def fsync_dir(folder: Path) -> None:
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
