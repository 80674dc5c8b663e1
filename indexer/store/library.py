"""A library: one directory holding the catalog, the vector index and the model identity.

Layout (this class is the only code that spells these names; everything else asks it)::

    LIBRARY/catalog.sqlite        metadata + vectors (source of truth), SQLite WAL
    LIBRARY/segments.json         the index's manifest: base file, delta counts + CRCs and the
                                  catalog generation they match (replaced atomically)
    LIBRARY/vectors.<gen>.faiss   the base vector index, built when the catalog was at <gen>
                                  (+ ``.check``, its stamp, which also names its kind)
    LIBRARY/vectors.<gen>.faiss.sample  a fixed random sample of the base's vectors (float16,
                                  ~20k), read by the cut-off instead of the catalog
                                  (:mod:`indexer.store.background`; absent for small bases)
    LIBRARY/delta.<gen>.vec       vectors added since (append-only rows: id + vector)
    LIBRARY/delta.<gen>.del       ids removed since (append-only tombstones)
    LIBRARY/write.lock            held (flock) by the one process allowed to write
    LIBRARY/label_vectors/        cached text vectors of label sets (zero-shot classify, tag)
    LIBRARY/thumbnails/           JPEG thumbnails the server renders (derived, deletable)
    LIBRARY/shards/               results of a cluster run waiting to be committed (Parquet)

A checkpoint costs what changed: the writer commits the catalog, appends the new vectors
and tombstones to the delta files and replaces the manifest (:mod:`indexer.store.segments`).
Past a threshold, and by `clipdex optimize`, a compaction builds a new base from the
catalog's vectors; searches go on meanwhile (other processes read the previous files).
The first use of the index reads the manifest, memory-maps the base and reads the small
delta (a call that never searches never reads them); when the catalog's generation differs
from the manifest's (a writer killed between its two steps), it reconciles: catalog rows
missing from the index are added from their stored vectors, index ids without a row are
dropped.

Damage is found, never served: the catalog's header and length are checked on open and
SQLite's corruption errors become :class:`~indexer.errors.LibraryDamaged`; the base file's
stamp (kind, size, count) and the delta's CRC-32s are checked on load, the CRC-32 of every
byte of the base by `clipdex repair` (:func:`index_problem`). Messages name `clipdex repair`
(:mod:`indexer.ingest.repair`). A file name is never reused, so a reader that picked a file
a writer has since replaced simply looks again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from indexer.errors import LibraryDamaged, LibraryError, LibraryLocked, ModelMismatch
from indexer.fsutil import file_key
from indexer.model.identity import EMBED_DIM, ModelIdentity
from indexer.store.background import draw_sample, sample_path
from indexer.store.kindchoice import needs_retraining
from indexer.store.segments import (
    MANIFEST_FILE,
    Manifest,
    SegmentedStore,
    delta_name,
    read_manifest,
    tombstone_name,
    write_manifest,
)
from indexer.store.vectorstore import (
    DEFAULT_KIND,
    STAMP_SUFFIX,
    UnstampedIndex,
    VectorStore,
    attach_source,
    build_store,
    damage_message,
    describe_store,
    load_store,
    open_store,
    stamp_path,
    verify_file,
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
# The index files, their stamps, the delta files, the manifest and the temporary files of
# interrupted writes: what a checkpoint may remove when no manifest names it.
INDEX_FAMILY = re.compile(
    r"^(vectors\.(\d+)\.faiss(\.check|\.sample)?|delta\.(\d+)\.(vec|del)|segments\.json)"
    r"(\.[^.]+\.tmp)?$"
)
LOAD_ATTEMPTS = 10  # a reader racing writers that keep replacing the newest file


class Library:
    """Catalog + vector index of one library directory, kept consistent."""

    def __init__(
        self,
        root: Path,
        catalog: Catalog | CatalogReader,
        index: SegmentedStore | None,
        generation: int = -1,
    ) -> None:
        self.root = root
        self.catalog = catalog
        self._index = index  # None: read from disk when first used (see ``index``)
        self._generation = generation
        self._loading = threading.RLock()
        self._lock_handle = None
        self._catalog_file = file_identity(catalog.path)  # to notice a replaced catalog
        # Where a compaction has an encoding kind's batches encoded (a cluster run sets its
        # tasks here for the run: indexer.ingest.cluster); None: in this process.
        self.part_encoder = None
        self._sample_checked = False  # whether a checkpoint looked for the sample file

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

    # -- the vector index, read when first used ---------------------------------------------
    @property
    def index(self) -> SegmentedStore:
        """The vector index, loaded (and reconciled with the catalog) on first use: a call
        that never searches (``info``, an ``index`` run that finds nothing new) never
        reads it."""
        if self._index is None:
            self._load_index()
        return self._index

    @index.setter
    def index(self, store: SegmentedStore) -> None:
        self._index = store
        self._attach_source()

    def _attach_source(self) -> None:
        """A kind that re-ranks from full-precision vectors (ivf) reads them from this
        library's catalog."""
        attach_source(self._index, lambda ids: self.catalog.vectors(ids))

    @property
    def index_generation(self) -> int:
        """The catalog generation the loaded index matches."""
        if self._index is None:
            self._load_index()
        return self._generation

    @index_generation.setter
    def index_generation(self, generation: int) -> None:
        self._generation = generation

    def _load_index(self) -> None:
        with self._loading:  # threads of a server may ask at once: read it once
            if self._index is not None:
                return
            generation, index = _load_latest(self.root)
            self._generation, self._index = generation, index
            self._attach_source()
            if generation != self.catalog.generation():
                self.reconcile()

    @property
    def shard_dir(self) -> Path:
        """The folder where a cluster run's result shards wait to be committed (created on
        first write; what is left there after a killed run is committed by the next one)."""
        return self.root / SHARD_DIR

    def index_summary(self) -> dict:
        """What `clipdex info` shows of the index (kind, count, the kind's build report,
        delta and tombstones), from the manifest and the base's stamp when the index is not
        loaded yet: no vector is read for it. The count is that of the last checkpoint."""
        if self._index is not None:
            return describe_store(self._index)
        manifest = read_manifest(self.root)
        if manifest is None:  # an older library: its newest index file alone
            path = _latest_index_file(self.root)[1]
            manifest = Manifest(-1, path.name if path else None, 0, EMBED_DIM)
        facts = {"kind": DEFAULT_KIND, "count": 0}
        if manifest.base is not None:
            try:
                stamp = json.loads(stamp_path(self.root / manifest.base).read_bytes())
                facts = {"kind": stamp.get("kind", DEFAULT_KIND), "count": int(stamp["count"])}
                facts.update(stamp.get("params") or {})
            except (OSError, ValueError, KeyError, TypeError):
                return describe_store(self.index)  # let the load say what is wrong
        facts["count"] += manifest.rows - manifest.deleted
        return {**facts, "delta": manifest.rows, "tombstones": manifest.deleted}

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
        """Open (or with ``create`` make) the library at ``root``.

        The vector index is read, and reconciled with the catalog, when first used
        (:attr:`index`): damage in it is reported then. ``load_index=False`` (for
        `clipdex repair`) never reads the index files: the index starts empty, to be
        rebuilt from the catalog.
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
            return cls(root, catalog, empty_store(), -1)
        # The index is read on first use; its base is never changed in place, so every
        # opener maps it (``mmap`` is kept for callers that name it).
        return cls(root, catalog, None)

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
        """Make the index hold exactly the catalog's vectors; returns (added, dropped).

        The ids are read between two reads of the generation that agree, so the index is
        labelled with the generation whose ids it holds (a writer may commit meanwhile).
        """
        for _ in range(LOAD_ATTEMPTS):
            generation = self.catalog.generation()
            catalog_ids = self.catalog.ids()
            if self.catalog.generation() == generation:
                break
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
        self.index_generation = generation
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
        if self._index is None:
            return False  # not read yet: the first use reads the newest checkpoint
        if self.catalog.generation() == self.index_generation:
            return False
        manifest = read_manifest(self.root)
        if manifest is not None and self.index.continues(manifest):
            try:  # only what was appended since: costs what changed
                self.index.extend(self.root, manifest)
                self.index_generation = manifest.generation
            except FileNotFoundError:  # compacted meanwhile: read the new checkpoint
                self.index_generation, self.index = _load_latest(self.root)
        elif manifest is not None or _latest_index_file(self.root)[0] > self.index_generation:
            self.index_generation, self.index = _load_latest(self.root)
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
        self._index = None  # read again, and reconciled with the new catalog, on next use

    def checkpoint(self) -> None:
        """Write the index's changes under the catalog's current generation.

        New vectors and tombstones are appended to the delta files and the manifest is
        replaced: the cost follows what changed. Past the compaction threshold (or when the
        base's kind asks to be rebuilt) the whole index is compacted instead
        (:meth:`compact`). If a write fails (disk full), the previous checkpoint stays and
        the next open reconciles.
        """
        if self.index.compaction_due():
            self.compact()
            return
        generation = self.catalog.generation()
        if self.index.pending or self.index.manifest.generation != generation:
            self.index.flush(self.root, generation)
        self.index_generation = generation
        self._drop_index_files()
        self._draw_missing_sample()

    def _draw_missing_sample(self) -> None:
        """A base compacted by an older clipdex has no background sample file: draw it
        once (about 20,000 catalog reads), so the next queries read it instead."""
        name = self.index.manifest.base
        if name is None or self._sample_checked:
            return
        self._sample_checked = True
        path = sample_path(self.root / name)
        if not path.exists() and draw_sample(path, self.index.base, self.catalog.vectors):
            self.index.look_for_sample(path)

    def compact(self, kind: str | None = None, retrain: bool = False) -> int:
        """Fold base, delta and tombstones into one new base file of ``kind`` (default: the
        base's kind); returns how many it holds.

        A base that can fold (ivf) and is not due for re-training
        (:func:`~indexer.store.kindchoice.needs_retraining`) takes the delta into a copy of
        itself, encoded against its trained centroids: the cost follows the change, not the
        library. Otherwise, or with ``retrain`` (``clipdex optimize``, a switch of kind), the
        index is built from the catalog's vectors the kind's way
        (:func:`~indexer.store.vectorstore.build_store`: an ivf index trains again on what
        the library holds now). With :attr:`part_encoder` set (a cluster run), an ivf
        build's batches are encoded there and merged here.

        Readers in other processes go on searching the previous files meanwhile and pick
        the new checkpoint up on their next refresh; a crash before the new manifest is in
        place leaves the previous checkpoint whole (and the new file as litter, removed by
        the next checkpoint). A writer's job: hold the lock.
        """
        kind = kind or self.index.kind
        store = None if retrain or kind != self.index.kind else self._folded_base()
        if store is None:
            store = build_store(kind, self.catalog, self.index.dim, parts=self.part_encoder)
        self._install_base(store)
        return len(store)

    def _folded_base(self) -> VectorStore | None:
        """The index folded into a new base by its own kind (see :meth:`compact`), or None
        when its kind cannot fold or it is due for re-training."""
        facts = {"kind": self.index.kind, **self.index.params}
        if needs_retraining(facts, len(self.index)):
            return None
        store = self.index.folded()
        if store is not None:
            attach_source(store, self.catalog.vectors)
        return store

    def _install_base(self, store: VectorStore) -> None:
        """Save ``store`` as the new base (a never-used file name), then the manifest that
        names it with an empty delta, then remove everything else."""
        generation = self.catalog.generation()
        floor = max(self.index.manifest.segment, _segment_on_disk(self.root))
        if generation <= floor:  # e.g. a salvaged catalog: move past every name used
            self.catalog.set_meta("generation", str(floor))
        if generation <= floor or self._index_path(generation).exists():
            generation = self.catalog.bump_generation()
        path = self._index_path(generation)
        store.save(path)
        draw_sample(sample_path(path), store, self.catalog.vectors)
        manifest = Manifest(generation, path.name, generation, store.dim)
        write_manifest(self.root, manifest)
        self.index = SegmentedStore(store, manifest, sample_path(path))
        self.index_generation = generation
        self._drop_index_files()

    def _drop_index_files(self) -> None:
        """Remove index files the manifest does not name, and abandoned temporary files.

        Only a writer calls this (under the lock), so no temporary file is in use. A stamp
        goes after its index file: an index file never lacks its stamp.
        """
        manifest = self.index.manifest
        keep = {MANIFEST_FILE, delta_name(manifest.segment), tombstone_name(manifest.segment)}
        if manifest.base:
            base = self.root / manifest.base
            keep |= {manifest.base, stamp_path(base).name, sample_path(base).name}
        doomed = [
            other
            for other in self.root.iterdir()
            if INDEX_FAMILY.match(other.name) and other.name not in keep
        ]
        doomed.sort(key=lambda p: p.name.endswith(STAMP_SUFFIX))  # index files first
        for path in doomed:
            path.unlink(missing_ok=True)

    def rebuild_index(self, kind: str | None = None) -> int:
        """Build the index again from the catalog's vectors alone (no model call), as
        ``kind`` (default: the same kind), trained again; returns its size."""
        return self.compact(kind, retrain=True)

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


def empty_store(dim: int = EMBED_DIM) -> SegmentedStore:
    """An empty index (no base file, no delta yet) of the default kind."""
    return SegmentedStore(open_store(dim=dim), Manifest(-1, None, 0, dim))


def _load_latest(root: Path) -> tuple[int, SegmentedStore]:
    """The checkpoint the manifest names as (generation, index); (-1, empty) if none.

    A library without a manifest (older clipdex) has its newest stamped index file as the
    base; one without a stamp is not trusted: the caller rebuilds from the catalog. A file
    deleted under us means a writer compacted: read the manifest again.
    """
    for _ in range(LOAD_ATTEMPTS):
        manifest = read_manifest(root)
        if manifest is None:
            generation, path = _latest_index_file(root)
            if path is None:
                return -1, empty_store()
            try:
                base = load_store(path, mmap=True)
            except FileNotFoundError:
                continue
            except UnstampedIndex:
                return -1, empty_store()
            manifest = Manifest(generation, path.name, generation, base.dim)
            return generation, SegmentedStore(base, manifest)
        try:
            return manifest.generation, _load_manifest(root, manifest)
        except FileNotFoundError as exc:
            if read_manifest(root) == manifest:  # not a compaction: the file is gone
                missing = Path(exc.filename or root / MANIFEST_FILE)
                raise LibraryDamaged(damage_message(missing, "the file is missing")) from exc
    raise LibraryError(
        f"the index files of {root} kept changing while being read: try again in a moment"
    )


def _load_manifest(root: Path, manifest: Manifest) -> SegmentedStore:
    if manifest.base is None:
        base = open_store(dim=manifest.dim)
    else:
        try:
            base = load_store(root / manifest.base, mmap=True)
        except UnstampedIndex:
            path = root / manifest.base
            raise LibraryDamaged(damage_message(path, "its stamp is missing")) from None
    sample = sample_path(root / manifest.base) if manifest.base is not None else None
    return SegmentedStore.load(root, base, manifest, sample)


def _segment_on_disk(root: Path) -> int:
    """The segment number the manifest on disk names (0 when there is none or it is
    unreadable: a compaction replaces it anyway)."""
    try:
        manifest = read_manifest(root)
    except LibraryDamaged:
        return 0
    return manifest.segment if manifest is not None else 0


def index_problem(root: Path) -> str | None:
    """The full check of the index files, every byte read: what is wrong, or None.

    The base file's CRC-32 against its stamp, the delta and tombstones against the
    manifest's CRC-32s (`clipdex repair` runs it; an open checks sizes and counts only).
    """
    root = Path(root)
    try:
        manifest = read_manifest(root)
        if manifest is None:
            path = _latest_index_file(root)[1]
            if path is not None:
                verify_file(path)
            return None
        if manifest.base is not None:
            verify_file(root / manifest.base)
        SegmentedStore.load(root, open_store(dim=manifest.dim), manifest)
    except UnstampedIndex as exc:
        return f"{exc} has no stamp"
    except FileNotFoundError as exc:
        return f"{exc.filename} is missing"
    except LibraryDamaged as exc:
        return exc.detail
    return None


def _latest_index_file(root: Path) -> tuple[int, Path | None]:
    best: tuple[int, Path | None] = (-1, None)
    if not root.is_dir():
        return best
    for entry in root.iterdir():
        match = INDEX_PATTERN.match(entry.name)
        if match and int(match.group(1)) > best[0]:
            best = (int(match.group(1)), entry)
    return best
