"""The vector index in segments: a base file, an append-only delta and a tombstone list.

A checkpoint costs what changed. New vectors are appended to a small *delta* file (rows of
int64 id + float32 vector), removed ids to a *tombstone* file (int64 ids), and a tiny
*manifest* (``segments.json``, replaced atomically) says how many rows and tombstones are
valid, their CRC-32s, which base index file they sit on and which catalog generation the
whole matches. A *compaction* folds everything into a new base file (any kind, built with
``open_store(kind)`` + ``add``) and starts an empty delta: automatically past a threshold
(:meth:`SegmentedStore.compaction_due`) and by ``clipdex optimize``.

Why readers always see exactly one checkpoint: the delta and tombstone files only grow
(bytes before a manifest's counts are never rewritten), both are fsynced before the
manifest that counts them is renamed into place, and a reader reads exactly the prefix its
manifest counts, checking the CRC-32s (cheap: the delta is bounded by the compaction
threshold; a reader that already holds a prefix continues its CRC over the new bytes only).
A compaction writes its base under a new generation's name and a new segment number, then
the manifest, then removes the old files: a reader that read the old manifest either still
opens the old files or finds one gone and reads the manifest again. A writer killed
mid-append leaves bytes past the counts, which the next writer cuts off.

:class:`SegmentedStore` keeps the :class:`~indexer.store.vectorstore.VectorStore` contract
over base + delta - tombstones, so the search layer does not care: top-k and range search
stay exact over the union, ``allowed_ids`` restrictions included. Ids are never reused (the
catalog's AUTOINCREMENT keys), so a tombstone hides one id forever.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from indexer.errors import LibraryDamaged, LibraryError
from indexer.fsutil import write_atomic
from indexer.store.background import SampleFile, open_sample, sample_hash
from indexer.store.vectors import VectorIndex, fsync_dir, write_error
from indexer.store.vectorstore import VectorStore, damage_message

MANIFEST_FILE = "segments.json"
MANIFEST_FORMAT = 1
# A compaction is due once the delta and tombstones hold this many entries, or this share
# of the base, whichever is more, but never more than COMPACT_MAX (the delta is scanned
# exactly by every query and read whole by every open).
COMPACT_MIN = 4096
COMPACT_FRACTION = 0.05
COMPACT_MAX = 50_000
_ID_BYTES = 8


def delta_name(segment: int) -> str:
    return f"delta.{segment}.vec"


def tombstone_name(segment: int) -> str:
    return f"delta.{segment}.del"


def row_bytes(dim: int) -> int:
    """Bytes per delta row: the id, then the vector."""
    return _ID_BYTES + 4 * dim


@dataclass(frozen=True)
class Manifest:
    """What one checkpoint of the vector index is made of (``segments.json``)."""

    generation: int  # the catalog generation this checkpoint matches
    base: str | None  # the base index file's name in the library folder (None: empty base)
    segment: int  # the delta files are delta.<segment>.vec / .del
    dim: int
    rows: int = 0  # valid rows in the delta file
    rows_crc: int = 0  # CRC-32 of those rows' bytes
    deleted: int = 0  # valid ids in the tombstone file
    deleted_crc: int = 0

    def to_json(self) -> bytes:
        return json.dumps({"format": MANIFEST_FORMAT, **asdict(self)}).encode()


def read_manifest(root: Path) -> Manifest | None:
    """The library's manifest, or None when it has none (older clipdex, or none written)."""
    path = Path(root) / MANIFEST_FILE
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        if data.pop("format", None) != MANIFEST_FORMAT:
            raise ValueError("unknown format")
        fields = {k: int(data[k]) for k in ("generation", "segment", "dim", "rows", "rows_crc")}
        fields.update(deleted=int(data["deleted"]), deleted_crc=int(data["deleted_crc"]))
        base = data.get("base")
        return Manifest(base=str(base) if base is not None else None, **fields)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LibraryDamaged(damage_message(path, f"unreadable manifest: {exc}")) from exc


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Replace the manifest atomically (fsynced, then renamed, then the folder fsynced)."""
    try:
        write_atomic(Path(root) / MANIFEST_FILE, manifest.to_json())
    except OSError as exc:
        raise write_error(exc, Path(root) / MANIFEST_FILE) from exc
    fsync_dir(Path(root))


def read_prefix(path: Path, size: int, start: int = 0, crc: int = 0) -> tuple[bytes, int]:
    """Bytes ``[start:size]`` of ``path`` and the CRC-32 of ``[0:size]`` (``crc`` being that
    of ``[0:start]``); LibraryDamaged if the file is shorter (truncated)."""
    if size <= start:
        return b"", crc
    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read(size - start)
    if len(data) != size - start:
        problem = f"{start + len(data)} bytes where {size} were written, truncated?"
        raise LibraryDamaged(damage_message(path, problem))
    return data, zlib.crc32(data, crc)


class SegmentedStore:
    """Base + delta - tombstones, as one :class:`VectorStore` (see the module docstring).

    ``base`` is any kind's store (memory-mapped and read-only is fine: it is never changed);
    the delta is an exact in-memory store. Changes made here (``add``, ``remove``) are kept
    as *pending* until :meth:`flush` appends them to the files.
    """

    def __init__(self, base: VectorStore, manifest: Manifest, sample: Path | None = None) -> None:
        """``sample``: the base's background sample file (:mod:`.background`), if any."""
        self.base = base
        self.dim = base.dim
        self.manifest = manifest  # what is on disk, as far as this store has read it
        self.delta = VectorIndex(self.dim)
        self._delta_ids: set[int] = set()
        self._dead = np.zeros(0, np.int64)  # sorted ids hidden in the base
        self._gone: set[int] = set()  # delta ids removed (a later tombstone of one: no-op)
        self._base_ids: np.ndarray | None = None  # sorted, computed when first needed
        self._pending_ids: list[np.ndarray] = []
        self._pending_vectors: list[np.ndarray] = []
        self._pending_dead: list[int] = []
        self._sample_path = sample
        self._sample: SampleFile | bool | None = None  # False: looked, none usable
        self._sample_rows: dict[int, tuple] = {}  # limit -> what the file's prefix holds
        self._background: dict[int, tuple] = {}  # limit -> (changes, ids, vectors)
        self._changes = 0  # bumped by every add and removal (the background follows them)

    # -- what it is ---------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """The base's kind: what a compaction builds again."""
        return self.base.kind

    @property
    def pending(self) -> int:
        """Changes not yet written by :meth:`flush`."""
        return sum(len(ids) for ids in self._pending_ids) + len(self._pending_dead)

    def compaction_due(self) -> bool:
        """Whether delta + tombstones have grown enough to fold into a new base, or the
        base's kind asks to be built again (``wants_rebuild(live_count)``: e.g. an index
        trained on far fewer vectors than the library now holds)."""
        changes = self.manifest.rows + self.manifest.deleted + self.pending
        limit = min(COMPACT_MAX, max(COMPACT_MIN, COMPACT_FRACTION * len(self.base)))
        if changes >= limit:
            return True
        wants_rebuild = getattr(self.base, "wants_rebuild", None)
        return bool(wants_rebuild(len(self))) if wants_rebuild is not None else False

    # -- loading --------------------------------------------------------------------------
    @classmethod
    def load(
        cls, root: Path, base: VectorStore, manifest: Manifest, sample: Path | None = None
    ) -> SegmentedStore:
        """The store ``manifest`` describes, over an already loaded ``base``."""
        empty = replace(manifest, rows=0, rows_crc=0, deleted=0, deleted_crc=0)
        store = cls(base, empty, sample)
        store.extend(root, manifest)
        return store

    def continues(self, manifest: Manifest) -> bool:
        """Whether ``manifest`` only appended to what this store has read (same base and
        segment, counts not lower): :meth:`extend` then reads the new entries only."""
        mine = self.manifest
        return (
            (manifest.base, manifest.segment, manifest.dim) == (mine.base, mine.segment, mine.dim)
            and manifest.rows >= mine.rows
            and manifest.deleted >= mine.deleted
        )

    def extend(self, root: Path, manifest: Manifest) -> None:
        """Read the rows and tombstones ``manifest`` counts beyond those already read."""
        mine, size = self.manifest, row_bytes(self.dim)
        rows, rows_crc = read_prefix(
            root / delta_name(manifest.segment),
            manifest.rows * size,
            mine.rows * size,
            mine.rows_crc,
        )
        dead, dead_crc = read_prefix(
            root / tombstone_name(manifest.segment),
            manifest.deleted * _ID_BYTES,
            mine.deleted * _ID_BYTES,
            mine.deleted_crc,
        )
        if rows_crc != manifest.rows_crc or dead_crc != manifest.deleted_crc:
            path = root / delta_name(manifest.segment)
            raise LibraryDamaged(damage_message(path, "checksum mismatch: its bytes changed"))
        table = np.frombuffer(rows, dtype=np.dtype([("id", "<i8"), ("v", "<f4", (self.dim,))]))
        self._apply_rows(table["id"].astype(np.int64), table["v"])
        self._apply_dead(np.frombuffer(dead, dtype="<i8").astype(np.int64))
        self.manifest = manifest

    def _apply_rows(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add delta rows, skipping ids this store holds already (added here by reconcile)."""
        fresh = self._fresh(ids)
        if fresh.any():
            self._changes += 1
            self.delta.add(ids[fresh], vectors[fresh])
            self._delta_ids.update(ids[fresh].tolist())

    def _fresh(self, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` this store's delta has never held (the first of repeats)."""
        held, gone, seen = self._delta_ids, self._gone, set()
        fresh = np.zeros(len(ids), bool)
        for at, image_id in enumerate(ids.tolist()):
            if image_id not in held and image_id not in gone and image_id not in seen:
                fresh[at] = True
                seen.add(image_id)
        return fresh

    def _apply_dead(self, ids: np.ndarray) -> None:
        """Hide ``ids``: a delta id leaves the delta, any other one is hidden in the base."""
        ids = np.asarray([i for i in ids.tolist() if i not in self._gone], dtype=np.int64)
        if len(ids) == 0:
            return
        self._changes += 1
        in_delta = np.fromiter((int(i) in self._delta_ids for i in ids), bool, len(ids))
        if in_delta.any():
            self.delta.remove(ids[in_delta])
            self._delta_ids.difference_update(int(i) for i in ids[in_delta])
            self._gone.update(int(i) for i in ids[in_delta])
        self._dead = np.union1d(self._dead, ids[~in_delta])

    # -- writing --------------------------------------------------------------------------
    def flush(self, root: Path, generation: int) -> int:
        """Append pending rows and tombstones (fsynced), then replace the manifest (now at
        ``generation``); returns the bytes appended. On failure nothing counted changes."""
        mine, size = self.manifest, row_bytes(self.dim)
        rows = self._pending_rows()
        dead = np.asarray(self._pending_dead, dtype="<i8").tobytes()
        append(root / delta_name(mine.segment), mine.rows * size, rows)
        append(root / tombstone_name(mine.segment), mine.deleted * _ID_BYTES, dead)
        manifest = replace(
            mine,
            generation=generation,
            rows=mine.rows + len(rows) // size,
            rows_crc=zlib.crc32(rows, mine.rows_crc),
            deleted=mine.deleted + len(dead) // _ID_BYTES,
            deleted_crc=zlib.crc32(dead, mine.deleted_crc),
        )
        write_manifest(root, manifest)
        self.manifest = manifest
        self._pending_ids, self._pending_vectors, self._pending_dead = [], [], []
        return len(rows) + len(dead)

    def _pending_rows(self) -> bytes:
        if not self._pending_ids:
            return b""
        ids = np.concatenate(self._pending_ids)
        table = np.zeros(len(ids), dtype=np.dtype([("id", "<i8"), ("v", "<f4", (self.dim,))]))
        table["id"] = ids
        table["v"] = np.vstack(self._pending_vectors)
        return table.tobytes()

    # -- the VectorStore contract -------------------------------------------------------------
    def attach_source(self, fetch) -> None:
        """Pass a kind's source of full-precision vectors on to the base (kinds that re-rank)."""
        attach = getattr(self.base, "attach_source", None)
        if attach is not None:
            attach(fetch)

    def folded(self) -> VectorStore | None:
        """A new base holding what this store holds live (base + delta - tombstones), made
        by the base's kind from the base itself (``folded``: ivf encodes only the delta,
        against its trained centroids); None for a kind that cannot (it is built again)."""
        fold = getattr(self.base, "folded", None)
        if fold is None:
            return None
        ids = self.delta.ids()
        return fold(ids, self._delta_vectors(ids), self._dead)

    def _delta_vectors(self, ids: np.ndarray) -> np.ndarray:
        """The delta's vectors of ``ids`` (delta ids), one row each."""
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        return np.vstack([self.delta.reconstruct(int(i)) for i in ids])

    def describe(self) -> dict:
        """What `clipdex info` shows: the base's own facts, the live count, and the delta
        rows and tombstones of the last checkpoint (as ``Library.index_summary`` reads them)."""
        describe = getattr(self.base, "describe", None)
        facts = describe() if describe is not None else {"kind": self.kind}
        mine = self.manifest
        return {**facts, "count": len(self), "delta": mine.rows, "tombstones": mine.deleted}

    @property
    def params(self) -> dict:
        """The base's build parameters, for kinds that have them (ivf: ``built_for``...)."""
        return getattr(self.base, "params", {})

    @property
    def mmapped(self) -> bool:
        """Whether the base is mapped read-only from its file (the delta is always in memory)."""
        return bool(getattr(self.base, "mmapped", False))

    @property
    def near_pairs(self):
        """``near_pairs(radius, allowed_ids)`` over base + delta - tombstones when the
        base's kind finds near pairs through its own structure (ivf), else None."""
        if getattr(self.base, "near_pairs", None) is None:
            return None
        return self._near_pairs

    def _near_pairs(
        self, radius: float, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The base's own pairs minus tombstoned ones, plus each delta vector's range
        search over everything live (delta pairs with the base and among themselves)."""
        base_allowed, _ = self._base_restriction(allowed_ids)
        a, b, scores = self.base.near_pairs(radius, base_allowed)
        if len(self._dead):
            keep = ~(np.isin(a, self._dead) | np.isin(b, self._dead))
            a, b, scores = a[keep], b[keep], scores[keep]
        parts = [(a, b, scores)]
        delta_ids = self.delta.ids()
        if allowed_ids is not None:
            delta_ids = delta_ids[np.isin(delta_ids, allowed_ids)]
        if len(delta_ids):
            vectors = self._delta_vectors(delta_ids)
            lims, hit_scores, hits = self.range_search(vectors, radius, allowed_ids)
            queries = np.repeat(delta_ids, np.diff(lims))
            other = hits != queries
            parts.append((queries[other], hits[other], hit_scores[other]))
        return tuple(np.concatenate(column) for column in zip(*parts))

    def background(self, limit: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids, float32 vectors) of a fixed uniform random sample of the live vectors,
        about ``limit`` of them, from the base's sample file (:mod:`.background`): its first
        rows minus tombstones, plus the delta's ids that hash below the same bound. None
        when the base has no usable sample file: the caller reads vectors another way."""
        cached = self._background.get(limit)
        if cached is not None and cached[0] == self._changes:
            return cached[1:]
        rows = self._sample_prefix(limit)
        if rows is None:
            return None
        ids, vectors, bound = rows
        if len(self._dead):
            keep = ~np.isin(ids, self._dead)
            ids, vectors = ids[keep], vectors[keep]
        vectors = vectors.astype(np.float32)
        delta_ids = self.delta.ids()
        chosen = delta_ids[sample_hash(delta_ids) < bound]
        if len(chosen):
            ids = np.concatenate([ids, chosen])
            vectors = np.vstack([vectors, self._delta_vectors(chosen)])
        self._background[limit] = (self._changes, ids, vectors)
        return ids, vectors

    def look_for_sample(self, path: Path) -> None:
        """Use the sample file at ``path`` (just written for this base) from now on."""
        self._sample_path, self._sample, self._sample_rows = path, None, {}
        self._background = {}

    def _sample_prefix(self, limit: int) -> tuple | None:
        """The sample file's first ``limit`` rows (read once), or None without a sound file."""
        if self._sample is None:
            found = None
            if self._sample_path is not None:
                found = open_sample(self._sample_path, self.dim, len(self.base))
            self._sample = found if found is not None else False
        if self._sample is False:
            return None
        if limit not in self._sample_rows:
            rows = self._sample.read(limit)
            if rows is None:  # damaged: never again
                self._sample = False
                return None
            self._sample_rows[limit] = rows
        return self._sample_rows[limit]

    def in_memory(self) -> SegmentedStore:
        return self  # changes go to the delta and tombstones: always writable

    def save(self, path: Path) -> None:
        raise LibraryError("a segmented index is written by Library.checkpoint, not saved")

    def __len__(self) -> int:
        return len(self.base) - len(self._dead) + len(self.delta)

    def ids(self) -> np.ndarray:
        base = self.base.ids()
        if len(self._dead):
            base = base[~np.isin(base, self._dead, assume_unique=True)]
        return np.concatenate([base, self.delta.ids()]).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)
        fresh = self._fresh(ids)  # an id held already (added by a reconcile) is not repeated
        ids, vectors = ids[fresh], vectors[fresh]
        self._apply_rows(ids, vectors)
        self._pending_ids.append(ids.copy())
        self._pending_vectors.append(vectors.copy())

    def remove(self, ids: np.ndarray) -> int:
        """Tombstone the live ones of ``ids``; returns how many were live."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if len(ids) == 0:
            return 0
        in_delta = np.fromiter((int(i) in self._delta_ids for i in ids), bool, len(ids))
        others = ids[~in_delta]
        in_base = np.isin(others, self._sorted_base_ids()) & ~np.isin(others, self._dead)
        live = np.concatenate([ids[in_delta], others[in_base]])
        self._apply_dead(live)
        self._pending_dead.extend(int(i) for i in live)
        return len(live)

    def reconstruct(self, image_id: int) -> np.ndarray:
        """The stored vector of a live id (KeyError for one that is not)."""
        image_id = int(image_id)
        if image_id in self._delta_ids:
            return self.delta.reconstruct(image_id)
        if np.isin(image_id, self._dead):
            raise KeyError(image_id)
        return self.base.reconstruct(image_id)

    def _sorted_base_ids(self) -> np.ndarray:
        if self._base_ids is None:
            self._base_ids = np.sort(self.base.ids())
        return self._base_ids

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None, **options
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over base + delta - tombstones, exact merge of both (``options`` go to the
        base's search, e.g. a kind's own search parameters)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        k = max(1, min(int(k), len(self)))
        if len(self) == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        parts = []
        if len(self.base) > len(self._dead):
            base_allowed, extra = self._base_restriction(allowed_ids)
            if extra and getattr(self.base, "excludes", False):
                # The base skips the tombstones in its scan: no extra hits to ask for.
                options = {**options, "excluded_ids": self._dead}
                extra = 0
            want = min(k + extra, len(self.base))
            scores, ids = self.base.search(queries, want, base_allowed, **options)
            if extra:
                hidden = np.isin(ids, self._dead)
                scores, ids = np.where(hidden, -np.inf, scores), np.where(hidden, -1, ids)
            parts.append((scores, ids))
        if len(self.delta):
            parts.append(self.delta.search(queries, k, allowed_ids))
        return _merge_top(parts, len(queries), k)

    def _base_restriction(self, allowed_ids: np.ndarray | None) -> tuple[np.ndarray | None, int]:
        """What the base may return: the allowed ids minus tombstones (nothing more to
        fetch), or everything with as many extra hits as there are tombstones to drop."""
        if allowed_ids is None:
            return None, len(self._dead)
        allowed = np.asarray(allowed_ids, dtype=np.int64)
        if len(self._dead):
            allowed = allowed[~np.isin(allowed, self._dead)]
        return allowed, 0

    def range_search(
        self, queries: np.ndarray, radius: float, allowed_ids: np.ndarray | None = None, **options
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every live (allowed) vector above ``radius``, from base and delta, as lims/scores/ids."""
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.dim)
        parts = []
        if len(self.base):
            base_allowed, extra = self._base_restriction(allowed_ids)
            lims, scores, ids = self.base.range_search(queries, radius, base_allowed, **options)
            if extra:
                keep = ~np.isin(ids, self._dead)
                kept = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
                lims, scores, ids = kept[lims], scores[keep], ids[keep]
            parts.append((lims, scores, ids))
        if len(self.delta):
            parts.append(self.delta.range_search(queries, radius, allowed_ids))
        return _merge_ranges(parts, len(queries))


def _merge_top(parts: list, rows: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of several (scores, ids) top lists per row, padded with id -1."""
    scores = np.concatenate([p[0] for p in parts], axis=1).astype(np.float32)
    ids = np.concatenate([p[1] for p in parts], axis=1).astype(np.int64)
    scores = np.where(ids < 0, -np.inf, scores)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_ids[~np.isfinite(top_scores)] = -1
    top_scores[top_ids < 0] = np.finfo(np.float32).min  # as FAISS pads
    return top_scores, top_ids


def _merge_ranges(parts: list, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Several range results (lims, scores, ids) as one, row by row."""
    if not parts:
        return np.zeros(rows + 1, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64)
    if len(parts) == 1:
        return parts[0]
    score_rows, id_rows = [], []
    for row in range(rows):
        for lims, scores, ids in parts:
            score_rows.append(scores[lims[row] : lims[row + 1]])
            id_rows.append(ids[lims[row] : lims[row + 1]])
    counts = sum(np.diff(lims) for lims, _, _ in parts)
    lims = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return lims, np.concatenate(score_rows).astype(np.float32), np.concatenate(id_rows)


# -- files ----------------------------------------------------------------------------------------
def append(path: Path, valid: int, data: bytes) -> None:
    """Append ``data`` after the first ``valid`` bytes of ``path`` (cutting off whatever an
    interrupted writer left past them), fsynced. A failed write (disk full) is cut off
    again, so the file holds the previous checkpoint's bytes only. Nothing to append:
    nothing touched."""
    if not data:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as exc:
        raise write_error(exc, path) from exc
    try:
        if os.fstat(fd).st_size != valid:
            os.ftruncate(fd, valid)
        os.lseek(fd, valid, os.SEEK_SET)
        write_all(fd, data)
        os.fsync(fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, valid)
        raise write_error(exc, path) from exc
    finally:
        os.close(fd)
    if valid == 0:
        fsync_dir(path.parent)  # a new file: its name must survive a crash too


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a separate function: tests fill the disk)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
