"""What a vector index must offer, and the one place where its kinds are listed.

A *vector store* holds integer ids (the catalog's primary keys) and unit vectors, nothing
else: inner product is cosine similarity, content lives in SQL. :class:`VectorStore` is the
contract the library, the pipeline and the search layer type against; each *kind* is one
class implementing it, named in :data:`KINDS`:

    ``exact``   FAISS flat inner-product scan (:class:`indexer.store.vectors.VectorIndex`)
    ``ivf``     FAISS IVF on 8-bit codes, candidates re-ranked exactly from full-precision
                vectors the store reads through its *vector source* (the catalog), so it
                keeps only codes (:class:`indexer.store.ivf.IVFIndex`)

Optional parts of a kind (looked up with ``getattr``, so a kind without them still works):
``build(source, dim)`` (a classmethod building a whole index from a source of vectors, used
by :func:`build_store`), ``attach_source(fetch)`` (where full-precision vectors come from:
``fetch(ids) -> (found ids, vectors)``) and ``describe()`` (what ``clipdex info`` shows).

Another kind is one module with one class plus one line in :data:`KINDS`; nothing else
changes. Kinds are imported lazily, so naming this module costs
no FAISS import.

Every index file ``X`` of any kind has a stamp ``X.check`` (JSON: format, kind, vector
count, dim, byte size, CRC-32), renamed into place just before the index itself, so
:func:`load_store` knows which kind to read before reading it. A load checks what costs
nothing to check (kind, size, the header its reader parses, count): a truncated file is
refused without reading it; the CRC-32 of every byte is :func:`verify_file`'s job, which
`clipdex repair` runs. Stamps written before kinds existed say none: they are ``exact``.
"""

from __future__ import annotations

import importlib
import json
import zlib
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from indexer.errors import LibraryDamaged, LibraryError
from indexer.model.identity import EMBED_DIM

DEFAULT_KIND = "exact"
# kind -> "module:Class"; the class implements VectorStore and has kind == its key.
KINDS: dict[str, str] = {
    "exact": "indexer.store.vectors:VectorIndex",
    "ivf": "indexer.store.ivf:IVFIndex",
}

STAMP_FORMAT = 1
STAMP_SUFFIX = ".check"


@runtime_checkable
class VectorStore(Protocol):
    """Id-tagged unit vectors with cosine top-k and range search, saved to one file."""

    kind: ClassVar[str]  # the KINDS key of the implementing class
    dim: int

    @classmethod
    def load(cls, path: Path, *, mmap: bool = False, verify: bool = True) -> VectorStore:
        """Read a file written by :meth:`save`; ``mmap`` maps it read-only if the kind can.

        With ``verify`` the file must match its stamp in kind, size and count (no CRC:
        :func:`verify_file`), :class:`UnstampedIndex` without one,
        :class:`~indexer.errors.LibraryDamaged` when it differs; a file that vanished
        raises ``FileNotFoundError`` so the caller can look again.
        """
        ...

    def save(self, path: Path) -> None:
        """Write atomically with a stamp (:func:`make_stamp`); never touch files in place."""
        ...

    def in_memory(self) -> VectorStore:
        """A writable store with the same contents (self when already writable)."""
        ...

    def __len__(self) -> int: ...

    def ids(self) -> np.ndarray:
        """Every stored id (int64), in no particular order."""
        ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store ``vectors`` (rows, float32, unit length) under ``ids`` (new ids only)."""
        ...

    def remove(self, ids: np.ndarray) -> int:
        """Drop ``ids`` (unknown ones are ignored); returns how many were removed."""
        ...

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row, best first, padded with id -1.

        ``allowed_ids`` restricts the candidates *during* the search: the top-k comes from
        the allowed set itself, never filtered out of an unrestricted top-k.
        """
        ...

    def range_search(
        self, queries: np.ndarray, radius: float, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every (allowed) vector scoring above ``radius``, as (lims, scores, ids).

        The hits of query row i are ``[lims[i]:lims[i + 1]]``, unordered.
        """
        ...


def store_class(kind: str) -> type[VectorStore]:
    """The class implementing ``kind``; a kind this clipdex does not know is an error."""
    try:
        module, name = KINDS[kind].split(":")
    except KeyError:
        known = ", ".join(sorted(KINDS))
        raise LibraryError(
            f"unknown vector index kind {kind!r} (this clipdex knows: {known}); "
            "a newer clipdex may have written it"
        ) from None
    return getattr(importlib.import_module(module), name)


def open_store(kind: str = DEFAULT_KIND, dim: int = EMBED_DIM) -> VectorStore:
    """A new, empty store of ``kind``."""
    return store_class(kind)(dim)


def build_store(kind: str, source, dim: int = EMBED_DIM, parts=None) -> VectorStore:
    """A store of ``kind`` holding every vector of ``source`` (the catalog: anything with
    ``count()``, ``ids()``, ``vectors(ids)`` and ``iter_vectors()``), built the kind's way
    (the ivf kind trains on a sample and tunes itself); its vector source is attached.

    ``parts``: where a kind that encodes its vectors (ivf) has the batches encoded, e.g. a
    cluster's tasks (:class:`indexer.store.ivf.PartEncoder`); the same store either way.
    Kinds that only copy vectors (exact) build here.
    """
    cls = store_class(kind)
    build = getattr(cls, "build", None)
    if build is not None:
        store = build(source, dim) if parts is None else build(source, dim, parts=parts)
    else:
        store = cls(dim)
        for ids, vectors in source.iter_vectors():
            store.add(ids, vectors)
    attach_source(store, source.vectors)
    return store


def attach_source(store: VectorStore, fetch) -> None:
    """Tell ``store`` where full-precision vectors come from (kinds that need it)."""
    attach = getattr(store, "attach_source", None)
    if attach is not None:
        attach(fetch)


def describe_store(store: VectorStore) -> dict:
    """The index facts `clipdex info` shows: kind and size, plus what the kind reports."""
    describe = getattr(store, "describe", None)
    return describe() if describe is not None else {"kind": store.kind, "count": len(store)}


def load_store(path: Path, *, mmap: bool = False) -> VectorStore:
    """Read the index file at ``path`` with the kind its stamp names (verified)."""
    kind = read_stamp(Path(path))["kind"]
    return store_class(kind).load(Path(path), mmap=mmap)


# -- stamps -------------------------------------------------------------------------------
class UnstampedIndex(Exception):
    """An index file without a stamp (written before stamps existed): rebuild, don't trust."""


def stamp_path(path: Path) -> Path:
    """Where the stamp of the index file ``path`` lives."""
    return path.with_name(path.name + STAMP_SUFFIX)


def make_stamp(kind: str, count: int, dim: int, size: int, crc32: int) -> dict:
    """The stamp of an index file of ``size`` bytes whose CRC-32 is ``crc32``."""
    return {
        "format": STAMP_FORMAT,
        "kind": kind,
        "count": count,
        "dim": dim,
        "size": size,
        "crc32": crc32,
    }


def damage_message(path: Path, problem: str) -> str:
    """The user-facing message for a damaged index file: what, and that it is rebuildable."""
    return (
        f"the vector index {path} is damaged ({problem}): run `clipdex repair` on the library "
        f"{path.parent} to rebuild it from the catalog"
    )


def read_stamp(path: Path) -> dict:
    """The stamp of an index file; UnstampedIndex without one, FileNotFoundError w/o index."""
    try:
        text = stamp_path(path).read_bytes()
    except FileNotFoundError:
        if not path.exists():
            raise
        raise UnstampedIndex(str(path)) from None
    try:
        stamp = json.loads(text)
        if stamp.get("format") != STAMP_FORMAT:
            raise ValueError(f"unknown stamp format {stamp.get('format')!r}")
        fields = {key: int(stamp[key]) for key in ("count", "dim", "size", "crc32")}
        return {"kind": str(stamp.get("kind", DEFAULT_KIND)), **fields}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LibraryDamaged(damage_message(path, f"unreadable stamp: {exc}")) from exc


def check_stamp(path: Path, stamp: dict, *, full: bool = False) -> None:
    """The file's size against its stamp (truncation costs nothing to find); with ``full``
    also the CRC-32 of every byte (`clipdex repair`'s check: it reads the whole file).

    An open checks size, header (the kind's reader parses it) and count only, so opening a
    library costs what is read, not the size of its index; a bit flipped inside the vectors
    is what the full check finds.
    """
    size = path.stat().st_size
    if size != stamp["size"]:
        problem = f"{size} bytes where {stamp['size']} were written, truncated?"
        raise LibraryDamaged(damage_message(path, problem))
    if full and file_crc32(path) != stamp["crc32"]:
        raise LibraryDamaged(damage_message(path, "checksum mismatch: its bytes changed"))


def file_crc32(path: Path) -> int:
    """The CRC-32 of every byte of the file at ``path``."""
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify_file(path: Path) -> None:
    """The full check of an index file: its stamp, size and the CRC-32 of every byte.

    Raises :class:`UnstampedIndex` without a stamp, :class:`~indexer.errors.LibraryDamaged`
    when the file differs from it (the check `clipdex repair` runs; opens skip the CRC).
    """
    check_stamp(Path(path), read_stamp(Path(path)), full=True)
