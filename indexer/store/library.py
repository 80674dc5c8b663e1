"""A library: one directory holding the catalog, the vector index and the model identity.

Layout (this class is the only code that spells these names; everything else asks it)::

    LIBRARY/catalog.sqlite        metadata + vectors (source of truth), SQLite WAL
    LIBRARY/vectors.<gen>.faiss   vector index saved when the catalog was at generation <gen>
                                  (+ ``.check``, its stamp, which also names its kind)
    LIBRARY/write.lock            held (flock) by the one process allowed to write
    LIBRARY/label_vectors/        cached text vectors of label sets (zero-shot classify, tag)
    LIBRARY/thumbnails/           JPEG thumbnails the server renders (derived, deletable)
    LIBRARY/shards/               results of a cluster run waiting to be committed (Parquet)

Opening reconciles the two stores: catalog rows missing from the index are added from
their stored vectors, index ids without a row are dropped. Writers checkpoint by
committing the catalog, then saving the index under the new generation.

Damage is found, never served: the catalog's header and length are checked on open and
SQLite's corruption errors become :class:`~indexer.errors.LibraryDamaged`; each index file
carries a stamp (size, CRC-32, count) checked on load. Both messages name `clipdex repair`
(:mod:`indexer.ingest.repair`). A generation's file name is never reused, so a reader that picked a
file a writer has since replaced simply looks again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from indexer.errors import LibraryError, LibraryLocked, ModelMismatch
from indexer.fsutil import file_key
from indexer.model.identity import ModelIdentity
from indexer.store.vectorstore import (
    STAMP_SUFFIX,
    UnstampedIndex,
    VectorStore,
    attach_source,
    build_store,
    load_store,
    open_store,
)

if TYPE_CHECKING:  # the catalog imports SQLAlchemy: only writers pay for it
    from indexer.store.catalog import Catalog
    from indexer.store.catalog_reader import CatalogReader

CATALOG_FILE = "catalog.sqlite"
LOCK_FILE = "write.lock"
LABEL_CACHE_DIR = "label_vectors"
THUMBNAIL_DIR = "thumbnails"
SHARD_DIR = "shards"
INDEX_PATTERN = re.compile(r"^vectors\.(\d+)\.faiss$")
# The index files, their stamps and the temporary files of interrupted writes.
INDEX_FAMILY = re.compile(r"^vectors\.(\d+)\.faiss(\.check)?(\.[^.]+\.tmp)?$")
LOAD_ATTEMPTS = 10  # a reader racing writers that keep replacing the newest file


class Library:
    """Catalog + vector index of one library directory, kept consistent."""

    def __init__(
        self, root: Path, catalog: Catalog | CatalogReader, index: VectorStore, generation: int
    ) -> None:
        self.root = root
        self.catalog = catalog
        self.index = index
        self.index_generation = generation
        self._lock_handle = None
        self._catalog_file = file_identity(catalog.path)  # to notice a replaced catalog

    # -- the folder's layout --------------------------------------------------------------
    @staticmethod
    def catalog_path(root: str | os.PathLike) -> Path:
        """Where the catalog database of the library at ``root`` lives."""
        return Path(root).expanduser() / CATALOG_FILE

    @staticmethod
    def exists(root: str | os.PathLike) -> bool:
        """Whether ``root`` holds a library (its catalog), without opening it."""
        return Library.catalog_path(root).exists()

    @property
    def label_cache_dir(self) -> Path:
        """The folder where label-set text vectors are cached (created on first write)."""
        return self.root / LABEL_CACHE_DIR

    @property
    def thumbnail_dir(self) -> Path:
        """The folder where rendered thumbnails are cached (created on first write)."""
        return self.root / THUMBNAIL_DIR

    @property
    def index(self) -> VectorStore:
        """The vector index; a kind that re-ranks from full-precision vectors (ivf) reads
        them from this library's catalog, attached whenever the index is set."""
        return self._index

    @index.setter
    def index(self, store: VectorStore) -> None:
        self._index = store
        attach_source(store, lambda ids: self.catalog.vectors(ids))

    @property
    def shard_dir(self) -> Path:
        """The folder where a cluster run's result shards wait to be committed (created on
        first write; what is left there after a killed run is committed by the next one)."""
        return self.root / SHARD_DIR

    def _index_path(self, generation: int) -> Path:
        return self.root / f"vectors.{generation}.faiss"

    # -- opening ------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        *,
        create: bool = False,
        mmap: bool = False,
        load_index: bool = True,
        read_only: bool = False,
    ) -> Library:
        """Open (or with ``create`` make) the library at ``root`` and reconcile its stores.

        ``load_index=False`` (for `clipdex repair`) neither reads the index file nor
        reconciles: the index starts empty, to be rebuilt from the catalog.
        ``read_only`` is for callers that never write (a query): the catalog is read
        through :class:`~indexer.store.catalog_reader.CatalogReader` (no SQLAlchemy) and
        the index is memory-mapped.
        """
        root = Path(root).expanduser()
        if not cls.exists(root):
            if not create:
                raise LibraryError(
                    f"no clipdex library at {root}: index some photos into it first, or "
                    "choose the right library folder",
                    setting="library",
                )
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LibraryError(
                    f"cannot create the library folder {root}: {exc.strerror}"
                ) from exc
        catalog = open_catalog(cls.catalog_path(root), read_only=read_only and not create)
        if not load_index:
            return cls(root, catalog, open_store(), -1)
        try:
            generation, index = _load_latest(root, mmap=mmap or read_only)
            library = cls(root, catalog, index, generation)
            if generation != catalog.generation():
                library.reconcile()
        except BaseException:
            catalog.close()
            raise
        return library

    def close(self) -> None:
        self.release_lock()
        self.catalog.close()

    def __enter__(self) -> Library:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- model identity -----------------------------------------------------------------
    @property
    def identity(self) -> ModelIdentity | None:
        text = self.catalog.get_meta("model")
        return ModelIdentity.from_json(text) if text else None

    def bind_model(self, identity: ModelIdentity) -> None:
        """Record the library's model on first use; refuse any other model afterwards."""
        stored = self.identity
        if stored is None:
            self.catalog.set_meta("model", identity.to_json())
            return
        self.check_model(identity)

    def check_model(self, identity: ModelIdentity) -> None:
        stored = self.identity
        if stored is not None and stored != identity:
            raise ModelMismatch(
                f"the library {self.root} was built with {stored.name}, not {identity.name}: "
                "use the same weights as when it was built, or another library",
                setting="weights",
            )

    # -- consistency --------------------------------------------------------------------
    def reconcile(self) -> tuple[int, int]:
        """Make the index hold exactly the catalog's vectors; returns (added, dropped)."""
        catalog_ids = self.catalog.ids()
        index_ids = self.index.ids()
        missing = np.setdiff1d(catalog_ids, index_ids, assume_unique=True)
        orphans = np.setdiff1d(index_ids, catalog_ids, assume_unique=True)
        if len(orphans):
            self._ensure_writable_index()
            self.index.remove(orphans)
        for start in range(0, len(missing), 5000):
            ids, vectors = self.catalog.vectors(missing[start : start + 5000])
            self._ensure_writable_index()
            self.index.add(ids, vectors)
        self.index_generation = self.catalog.generation()
        return len(missing), len(orphans)

    def _ensure_writable_index(self) -> None:
        """A memory-mapped index is read-only: copy it into memory before changing it."""
        self.index = self.index.in_memory()

    def refresh(self) -> bool:
        """Pick up a newer checkpoint written by another process; True if anything changed.

        A catalog file replaced under this reader (`clipdex repair` swaps in a salvaged one)
        is opened anew and the index loaded again, never read on from the deleted file.
        """
        if self._catalog_replaced():
            self._reopen_catalog()
            return True
        if self.catalog.generation() == self.index_generation:
            return False
        if _latest_index_file(self.root)[0] > self.index_generation:
            self.index_generation, self.index = _load_latest(self.root, mmap=False)
        if self.index_generation != self.catalog.generation():
            self.reconcile()
        return True

    def _catalog_replaced(self) -> bool:
        now = file_identity(self.catalog.path)
        return now is not None and now != self._catalog_file

    def _reopen_catalog(self) -> None:
        """Open the catalog file now at the path (same kind as before), then the newest
        index, reconciled with it: ids of the replaced catalog are not served again."""
        old = self.catalog
        identity = file_identity(old.path)
        self.catalog = open_catalog(old.path, read_only=getattr(old, "read_only", False))
        self._catalog_file = identity
        old.close()
        self.index_generation, self.index = _load_latest(self.root, mmap=False)
        if self.index_generation != self.catalog.generation():
            self.reconcile()

    def checkpoint(self) -> None:
        """Save the index under the catalog's current generation; drop older index files.

        A generation whose file exists already moves to a new one first: file names are
        never reused, so no reader can pair one file's stamp with another's bytes. If the
        save fails (disk full), the older files stay and the next open reconciles.
        """
        generation = self.catalog.generation()
        if self._index_path(generation).exists():
            generation = self.catalog.bump_generation()
        self.index.save(self._index_path(generation))
        self.index_generation = generation
        self._drop_index_files(keep=generation)

    def _drop_index_files(self, keep: int) -> None:
        """Remove other generations' files, stamps and abandoned temporary files.

        Only a writer calls this (under the lock), so no temporary file is in use. The
        stamp goes after its index file: an index file never lacks its stamp.
        """
        doomed = []
        for other in self.root.iterdir():
            match = INDEX_FAMILY.match(other.name)
            if match and (int(match.group(1)) != keep or match.group(3)):
                doomed.append(other)
        doomed.sort(key=lambda p: p.name.endswith(STAMP_SUFFIX))  # index files first
        for path in doomed:
            path.unlink(missing_ok=True)

    def rebuild_index(self, kind: str | None = None) -> int:
        """Build the index again from the catalog's vectors alone (no model call), as
        ``kind`` (default: the same kind); returns its size."""
        self.index = build_store(kind or self.index.kind, self.catalog, self.index.dim)
        self.checkpoint()
        return len(self.index)

    # -- writer lock --------------------------------------------------------------------
    def acquire_lock(self) -> None:
        """Become the library's only writer, or raise :class:`LibraryLocked` at once.

        Holding it already is fine (the CLI takes it before loading the model).
        """
        if self._lock_handle is None:
            self._lock_handle = take_lock(self.root)

    def adopt_lock(self, handle: IO) -> None:
        """Hold a lock taken with :func:`take_lock` before this object existed (repair)."""
        self.release_lock()
        self._lock_handle = handle

    @property
    def locked(self) -> bool:
        return self._lock_handle is not None

    def release_lock(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    @contextlib.contextmanager
    def writing(self) -> Iterator[Library]:
        """Hold the writer lock for the block (released after, unless held before)."""
        held_before = self.locked
        self.acquire_lock()
        try:
            # Another writer may have finished between our open and the lock.
            self.refresh()
            yield self
        finally:
            if not held_before:
                self.release_lock()

    # -- facts --------------------------------------------------------------------------
    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())


def open_catalog(path: Path, *, read_only: bool = False) -> Catalog | CatalogReader:
    """The catalog at ``path``: the stdlib reader when the caller only reads and the file
    allows it (else, e.g. for a catalog that needs migrating, the full SQLAlchemy one)."""
    if read_only:
        from indexer.store.catalog_reader import CatalogReader, ReaderUnavailable

        try:
            return CatalogReader(path)
        except ReaderUnavailable:
            pass
    from indexer.store.catalog import Catalog

    return Catalog(path)


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, or None when there is none."""
    try:
        return file_key(os.stat(path))
    except FileNotFoundError:
        return None


def take_lock(root: Path) -> IO:
    """Open and flock the library's lock file, or raise :class:`LibraryLocked` at once.

    flock is released by the kernel when the holder dies, even by SIGKILL: no stale locks.
    """
    handle = open(Path(root) / LOCK_FILE, "a+")  # noqa: SIM115 - held until released
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise LibraryLocked(
            f"another clipdex process is indexing into {root}: wait for it to finish"
        ) from exc
    return handle


def _load_latest(root: Path, *, mmap: bool) -> tuple[int, VectorStore]:
    """The newest verified index file as (generation, index); (-1, empty) if none is usable.

    A file without a stamp (older clipdex) is not trusted: the caller rebuilds from the
    catalog. A file deleted under us means a writer saved a newer one: look again.
    """
    for _ in range(LOAD_ATTEMPTS):
        generation, path = _latest_index_file(root)
        if path is None:
            return -1, open_store()
        try:
            return generation, load_store(path, mmap=mmap)
        except FileNotFoundError:
            continue
        except UnstampedIndex:
            return -1, open_store()
    raise LibraryError(
        f"the index files of {root} kept changing while being read: try again in a moment"
    )


def _latest_index_file(root: Path) -> tuple[int, Path | None]:
    best: tuple[int, Path | None] = (-1, None)
    if not root.is_dir():
        return best
    for entry in root.iterdir():
        match = INDEX_PATTERN.match(entry.name)
        if match and int(match.group(1)) > best[0]:
            best = (int(match.group(1)), entry)
    return best
