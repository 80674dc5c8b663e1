"""A read-only view of the catalog through the stdlib's sqlite3: what a query reads.

:class:`~indexer.store.catalog.Catalog` (SQLAlchemy) owns the schema, its migrations and
every write; importing SQLAlchemy alone costs a cold query ~0.3 s. A query reads a handful
of columns, so :class:`CatalogReader` answers the catalog's read methods with plain SQL on
a connection opened ``mode=ro``: it never writes, never migrates, and reads while an indexer
holds the WAL (each statement sees the last committed state, as the catalog's do).

It keeps the catalog's promises about damage: the same checks on open (the file's header and
length, the first and last rows of every table) and SQLite's corruption errors become
:class:`~indexer.errors.LibraryDamaged` with the same repair hint. A file it cannot serve as
is (a schema it was not written for, one that needs migrating) raises
:class:`ReaderUnavailable`, and the caller opens the full catalog instead.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from indexer.errors import DiskFull, LibraryDamaged, LibraryError
from indexer.model.identity import EMBED_DIM
from indexer.paths import from_db, to_db
from indexer.store import textsearch
from indexer.store.rawindex import RAW_FILES_SQL
from indexer.store.textsearch import TextHit, TextTerm

# Schema versions whose tables this reader's SQL was checked against (the catalog's
# SCHEMA_VERSION must be one of them: tests/test_catalog_reader.py says so).
READABLE_SCHEMAS = frozenset({3, 4, 5, 6, 7, 8, 9, 10})
# Video frames (schema 6), as plain SQL both catalog kinds run; "{}" is an IN (...) list.
FRAME_OWNERS = "SELECT id, image_id, time FROM frames WHERE id IN ({})"
FRAME_IDS_OF = "SELECT id FROM frames WHERE image_id IN ({})"
ANY_FRAME = "SELECT 1 FROM frames LIMIT 1"
VIDEO_FRAMES = (
    "SELECT id, frame_time AS time, vector FROM images WHERE id = ? AND kind = 'video' "
    "UNION ALL SELECT id, time, vector FROM frames WHERE image_id = ? ORDER BY time"
)
# A catalog from before videos (schema < 6) has no ``kind`` column: each row is a photo, so a
# filter on the kind (``--kind photo|video``) reads the rows through this, not an SQL error.
_IMAGES_BEFORE_VIDEOS = "(SELECT *, 'photo' AS kind FROM images) AS images"
# Videos are few among many photos: a partial index of their rows (schema 9) lets a count
# of them, and `--kind video`, read only the videos' entries, not every row.
VIDEO_INDEX_DDL = "CREATE INDEX IF NOT EXISTS ix_images_video ON images(id) WHERE kind = 'video'"
VIDEO_COUNT = "SELECT count(*) FROM images WHERE kind = 'video'"
ANY_VIDEO = "SELECT 1 FROM images WHERE kind = 'video' LIMIT 1"
# Date filters (retrieval/search/filters.py) are ranges of this index (schema 10): the EXIF
# time, and the mtime of the rows without one.
CAPTURE_INDEX_DDL = "CREATE INDEX IF NOT EXISTS ix_images_capture ON images(taken_at, mtime_ns)"
FRAME_COUNT = "SELECT count(*) FROM frames"
SQLITE_IOERR, SQLITE_CORRUPT, SQLITE_FULL, SQLITE_NOTADB = 10, 11, 13, 26  # primary codes
_SQLITE_MAGIC = b"SQLite format 3\x00"
_CHUNK = 500  # ids per IN (...) list, as the catalog does
# The catalog's writes: asked of a reader, they are a typed error, not an AttributeError.
CATALOG_WRITES = frozenset({
    "set_meta", "bump_generation", "commit_batch", "delete_ids", "touch", "store_tags",
    "forget_tagged", "forget_failures_under", "record_file_keys", "queue_reindex",
    "add_text_roots", "rebuild_text_index",
})  # fmt: skip


class ReaderUnavailable(Exception):
    """This file needs the full catalog (e.g. a migration): open that instead."""


# -- checks shared with the catalog ------------------------------------------------------------
def sqlite_file_problem(path: Path) -> str | None:
    """What is visibly wrong with a SQLite file's header or length, or None.

    The header's page count is trusted only when SQLite marks it valid (change counter ==
    version-valid-for); a file shorter than that was truncated.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            header = handle.read(100)
    except FileNotFoundError:
        return None  # a new catalog
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    if size == 0:
        return None
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        return "not a SQLite database: the header is missing or overwritten"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    valid = header[24:28] == header[92:96]
    if valid and pages and size < pages * page_size:
        return f"shorter than its header says: {size} of {pages * page_size} bytes, truncated?"
    return None


def nearly_full(folder: Path) -> bool:
    """Less than 1 MiB free where the library lives (the likely cause of an I/O error)."""
    try:
        fs = os.statvfs(folder)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < 2**20


def check_catalog_file(path: Path, quick_check: Callable[[], str]) -> None:
    """Cheap checks on open: a SQLite header, and a file as long as it says it is.

    A file that looks short is damage only if ``quick_check`` (the opener's own) agrees: a
    concurrent WAL checkpoint may be growing it. Raises :class:`LibraryDamaged`.
    """
    problem = sqlite_file_problem(path)
    if problem is None:
        return
    if problem.startswith("shorter") and quick_check() == "ok":
        return
    raise LibraryDamaged(catalog_damage_message(path, problem), problem)


def catalog_damage_message(path: Path, detail: str) -> str:
    """The user's message for a damaged catalog: what is wrong and how to repair it."""
    root = path.parent
    return (
        f"the catalog {path} is damaged ({detail}): run `clipdex repair` on the library "
        f"{root} to salvage what is readable (add the photo folders to re-index the rest), "
        f"or restore {path.name} from a backup"
    )


def sqlite_error(path: Path, code: int | None, original: BaseException) -> Exception | None:
    """The typed clipdex error for a SQLite error code on the catalog at ``path``, or None."""
    if code is None:
        return None
    primary = code & 0xFF
    if primary == SQLITE_FULL or (primary == SQLITE_IOERR and nearly_full(path.parent)):
        return DiskFull.at(path.parent)  # SQLite hides the errno of an I/O error
    if primary in (SQLITE_CORRUPT, SQLITE_NOTADB):
        return LibraryDamaged(catalog_damage_message(path, str(original)), str(original))
    if primary == SQLITE_IOERR:
        return LibraryError(
            f"cannot read or write the catalog {path} ({original}): the library keeps "
            "its previous checkpoint; check the disk (free space, errors) and run again"
        )
    return None


def blob_to_vector(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4").astype(np.float32)


def vector_is_sound(blob: bytes | None, dim: int = EMBED_DIM) -> bool:
    """Whether a stored vector blob is ``dim`` finite float32 of unit length."""
    if not isinstance(blob, bytes) or len(blob) != 4 * dim:
        return False
    vector = blob_to_vector(blob)
    return bool(np.isfinite(vector).all()) and abs(float(vector @ vector) - 1.0) < 1e-2


def sound_stack(path: Path, ids: Sequence[int], blobs: Sequence[bytes]) -> np.ndarray:
    """Stored vectors as one (n, dim) array; LibraryDamaged if any is not a unit vector.

    The index is rebuilt from these, so a damaged blob must stop the rebuild rather than
    become a wrong neighbour. Vectorised: this runs over every row on a rebuild.
    """
    sizes = {len(b) if isinstance(b, bytes) else -1 for b in blobs}
    if sizes == {4 * EMBED_DIM}:
        vectors = np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), EMBED_DIM)
        norms = np.einsum("ij,ij->i", vectors, vectors)
        if np.isfinite(norms).all() and (np.abs(norms - 1.0) < 1e-2).all():
            return vectors.astype(np.float32)
    bad = [i for i, b in zip(ids, blobs) if not vector_is_sound(b)]
    detail = f"the stored vector of image {bad[0]} is invalid"
    raise LibraryDamaged(catalog_damage_message(path, detail), detail)


# -- the reader --------------------------------------------------------------------------------
class CatalogReader:
    """The catalog's read methods over a read-only sqlite3 connection (one per thread)."""

    read_only = True

    def __init__(self, path: Path) -> None:
        """Open and check the catalog at ``path``; ReaderUnavailable if it needs the writer."""
        self.path = Path(path)
        if not self.path.is_file():
            raise ReaderUnavailable(f"no catalog at {self.path}")
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            self._check_file()
            self._check_schema()
            self._probe()
        except BaseException:
            self.close()
            raise

    # -- connection and errors ------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            uri = self.path.resolve().as_uri() + "?mode=ro"
            try:
                connection = sqlite3.connect(
                    uri, uri=True, timeout=10, isolation_level=None, check_same_thread=False
                )
            except sqlite3.Error as exc:
                raise ReaderUnavailable(f"cannot open {self.path} read-only: {exc}") from exc
            with self._lock:
                self._connections.append(connection)
            self._local.connection = connection
        return connection

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        """Run one read statement; SQLite's damage and I/O errors come out typed."""
        try:
            return self._connection().execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            typed = sqlite_error(self.path, getattr(exc, "sqlite_errorcode", None), exc)
            if typed is not None:
                raise typed from exc
            raise

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()
        self._local = threading.local()

    def damage_message(self, detail: str) -> str:
        return catalog_damage_message(self.path, detail)

    def __getattr__(self, name: str):
        """A write asked of the reader: say that the library was opened read-only."""
        if name in CATALOG_WRITES:
            raise LibraryError(
                f"the library {self.path.parent} was opened read-only (for queries): "
                "open it without read_only to change it"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- checks on open (as the catalog's) --------------------------------------------------
    def _check_file(self) -> None:
        """A SQLite header, and a file as long as it says it is."""
        check_catalog_file(self.path, self.quick_check)

    def _check_schema(self) -> None:
        """Only a schema this reader knows; anything else goes to the full catalog."""
        try:
            has_meta = self._rows(
                "SELECT name FROM sqlite_master WHERE type='table' AND name='meta'"
            )
            version = self.get_meta("schema_version") if has_meta else None
        except sqlite3.Error as exc:  # e.g. locked, or not openable read-only
            raise ReaderUnavailable(f"cannot read {self.path}: {exc}") from exc
        if version is None or int(version) not in READABLE_SCHEMAS:
            raise ReaderUnavailable(f"schema version {version} needs the full catalog")

    def _probe(self) -> None:
        """Touch each table's first and last rows: a damaged root page shows on open.

        Tables without a rowid (the FTS5 index's ``text_fts_idx``) have no order to probe.
        """
        tables = self._rows(
            "SELECT name, sql FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
        )
        for table, sql in tables:
            if "WITHOUT ROWID" in (sql or "").upper():
                continue
            for order in ("ASC", "DESC"):
                self._rows(f'SELECT * FROM "{table}" ORDER BY rowid {order} LIMIT 1')

    def quick_check(self) -> str:
        """SQLite's ``PRAGMA quick_check``: ``"ok"`` or the first problem found."""
        try:
            rows = [row[0] for row in self._rows("PRAGMA quick_check(5)")]
        except (sqlite3.Error, LibraryDamaged) as exc:
            return str(exc).splitlines()[0][:200]
        return "ok" if rows == ["ok"] else "; ".join(map(str, rows))[:300]

    # -- key/value ------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def generation(self) -> int:
        """A counter bumped by every write; the index file records the one it matches."""
        return int(self.get_meta("generation") or 0)

    # -- reads ----------------------------------------------------------------------------
    def count(self) -> int:
        return int(self._rows("SELECT count(*) FROM images")[0][0])

    def kind_counts(self) -> dict[str, int]:
        """Photos, videos and the videos' searchable frames (each video's own row holds one
        of them); none of the last two before schema 6."""
        total = self.count()
        if not self._has_frames():
            return {"photos": total, "videos": 0, "video_frames": 0}
        videos = int(self._rows(VIDEO_COUNT)[0][0])
        frames = int(self._rows(FRAME_COUNT)[0][0])
        return {"photos": total - videos, "videos": videos, "video_frames": videos + frames}

    def reindex_count(self) -> int:
        """How many photos are queued for re-indexing (none before schema 5)."""
        if not self._rows("SELECT name FROM sqlite_master WHERE type='table' AND name='reindex'"):
            return 0
        return self._rows("SELECT count(*) FROM reindex")[0][0]

    def failure_count(self) -> int:
        return int(self._rows("SELECT count(*) FROM failures")[0][0])

    def ids(self) -> np.ndarray:
        """Every id the vector index holds: images and (schema 6) video frames."""
        rows = self._rows("SELECT id FROM images ORDER BY id")
        if self._has_frames():
            rows += self._rows("SELECT id FROM frames")
        return np.sort(np.asarray([row[0] for row in rows], dtype=np.int64))

    def _has_frames(self) -> bool:
        sql = "SELECT name FROM sqlite_master WHERE type='table' AND name='frames'"
        return bool(self._rows(sql))

    def frame_owners(self, ids: Iterable[int]) -> dict[int, tuple[int, float]]:
        """For the given ids that are frames (not images): id -> (video id, time)."""
        if not self._has_frames():
            return {}
        return {row[0]: (row[1], float(row[2])) for row in self._in(FRAME_OWNERS, ids)}

    def frame_ids_of(self, image_ids: Iterable[int]) -> np.ndarray:
        """The ids of the frames of the given videos (their rows' own ids not included).
        A library without any frame answers at once, however many ids are given."""
        if not self._has_frames() or not self._rows(ANY_FRAME):
            return np.zeros(0, dtype=np.int64)
        rows = self._in(FRAME_IDS_OF, image_ids)
        return np.asarray(sorted(row[0] for row in rows), dtype=np.int64)

    def video_frames(self, image_id: int) -> tuple[list[float], np.ndarray]:
        """Every frame of a video, the row's own first: (times, vectors), by time."""
        if not self._has_frames():
            return [], np.zeros((0, 0), dtype=np.float32)
        rows = self._rows(VIDEO_FRAMES, (image_id, image_id))
        if not rows:
            return [], np.zeros((0, 0), dtype=np.float32)
        return [float(r[1]) for r in rows], self._sound([r[0] for r in rows], [r[2] for r in rows])

    def vectors(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) for the given ids that exist (images or video frames)."""
        rows = self._in("SELECT id, vector FROM images WHERE id IN ({})", ids)
        if self._has_frames():
            rows += self._in("SELECT id, vector FROM frames WHERE id IN ({})", ids)
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        found = [row[0] for row in rows]
        return np.asarray(found, dtype=np.int64), self._sound(found, [row[1] for row in rows])

    def iter_vectors(self, batch: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (ids, vectors), in batches (keyset paging): images, then video frames."""
        for table in ("images", "frames") if self._has_frames() else ("images",):
            last = 0
            while True:
                rows = self._rows(
                    f"SELECT id, vector FROM {table} WHERE id > ? ORDER BY id LIMIT ?",
                    (last, batch),
                )
                if not rows:
                    break
                ids = [row[0] for row in rows]
                last = ids[-1]
                yield np.asarray(ids, dtype=np.int64), self._sound(ids, [row[1] for row in rows])

    def _sound(self, ids: Sequence[int], blobs: Sequence[bytes]) -> np.ndarray:
        return sound_stack(self.path, ids, blobs)

    def get_images(self, ids: Iterable[int]) -> dict[int, dict]:
        """Metadata rows (without vectors) for the given ids, keyed by id."""
        columns, dates = self._table_info("images")
        columns = [c for c in columns if c != "vector"]
        select = ", ".join(f'"{c}"' for c in columns)
        out = {}
        for row in self._in(f"SELECT {select} FROM images WHERE id IN ({{}})", ids):
            record = dict(zip(columns, row))
            for name in dates & record.keys():  # DATETIME text, as the catalog returns it
                if isinstance(record[name], str):
                    record[name] = dt.datetime.fromisoformat(record[name])
            record["path"] = from_db(record["path"])
            if record.get("real_path") is not None:
                record["real_path"] = from_db(record["real_path"])
            out[record["id"]] = record
        return out

    def id_for_path(self, path: str) -> int | None:
        rows = self._rows("SELECT id FROM images WHERE path = ?", (to_db(path),))
        return rows[0][0] if rows else None

    def ids_where(self, where: str, params: Sequence[object] = ()) -> np.ndarray:
        """Ids of the images whose row satisfies ``where`` (plain SQL, ``?`` bound), ascending.

        The same contract as :meth:`indexer.store.catalog.Catalog.ids_where`.
        """
        source = "images" if self._has_kinds() else _IMAGES_BEFORE_VIDEOS
        rows = self._rows(f"SELECT id FROM {source} WHERE {where}", params)  # see the catalog's
        return np.sort(np.asarray([row[0] for row in rows], dtype=np.int64))

    def raw_files(self) -> list[tuple[int, str]]:
        """(id, path) of every camera RAW file (the same contract as the catalog's)."""
        return [(i, from_db(path)) for i, path in self._rows(RAW_FILES_SQL)]

    def _has_kinds(self) -> bool:
        """Whether rows say photo or video (schema 6); before, every row is a photo."""
        return "kind" in {row[1] for row in self._rows("PRAGMA table_info(images)")}

    def formats(self) -> list[str]:
        """The distinct image formats in the library (for error messages)."""
        rows = self._rows("SELECT DISTINCT format FROM images WHERE format IS NOT NULL")
        return sorted(row[0] for row in rows)

    def list_failures(self) -> list[dict]:
        rows = self._rows("SELECT path, error FROM failures ORDER BY path")
        return [{"path": from_db(path), "error": error} for path, error in rows]

    # -- tags -----------------------------------------------------------------------------
    def has_tags(self) -> bool:
        return bool(self._rows("SELECT image_id FROM tags LIMIT 1"))

    def has_videos(self) -> bool:
        """Whether any row is a video (through the videos' partial index: at once)."""
        return self._has_kinds() and bool(self._rows(ANY_VIDEO))

    def tag_counts(self) -> list[tuple[str, int]]:
        """Every stored label with the number of images carrying it, most frequent first."""
        sql = "SELECT label, count(*) AS n FROM tags GROUP BY label ORDER BY n DESC, label"
        return [(label, n) for label, n in self._rows(sql)]

    def tags_for(self, ids: Iterable[int]) -> dict[int, list[tuple[str, float]]]:
        """Stored (label, score) pairs of the given images, best first; untagged ids absent."""
        out: dict[int, list[tuple[str, float]]] = {}
        sql = (
            "SELECT image_id, label, score FROM tags WHERE image_id IN ({}) "
            "ORDER BY image_id, score DESC, label"
        )
        for image_id, label, score in self._in(sql, ids):
            out.setdefault(image_id, []).append((label, float(score)))
        return out

    # -- words (FTS5; see indexer.store.textsearch) ----------------------------------------
    def has_text(self) -> bool:
        """Whether any photo has words stored (names, keywords, OCR...)."""
        return textsearch.has_text(self._rows)

    def text_search(
        self, terms: Sequence[TextTerm], limit: int, allowed_ids: np.ndarray | None = None
    ) -> list[TextHit]:
        """Photos whose words match any of ``terms``, best first (bm25), at most ``limit``."""
        return textsearch.text_search(self._rows, terms, limit, allowed_ids)

    def text_ids(self, term: TextTerm, allowed_ids: np.ndarray | None = None) -> np.ndarray:
        """Ids of every photo whose words hold ``term`` (a phrase as a whole)."""
        return textsearch.ids_with(self._rows, term, allowed_ids)

    def text_snippets(
        self, image_ids: Sequence[int], terms: Sequence[TextTerm]
    ) -> dict[int, list[dict]]:
        """Where ``terms`` stand in the given photos' words, marked ``[[...]]``."""
        return textsearch.snippets(self._rows, image_ids, terms)

    # -- helpers --------------------------------------------------------------------------
    def _in(self, sql: str, ids: Iterable[int]) -> list[tuple]:
        """``sql`` with its ``IN ({})`` bound to ``ids``, run in chunks (SQLite's limits).

        Rows of different chunks are concatenated: a statement that orders its rows does
        so per chunk, so callers group by id (as the catalog's do).
        """
        ids = [int(i) for i in ids]
        rows: list[tuple] = []
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start : start + _CHUNK]
            rows += self._rows(sql.format(", ".join("?" * len(chunk))), chunk)
        return rows

    def _table_info(self, table: str) -> tuple[list[str], set[str]]:
        """A table's column names in order, and those declared DATETIME.

        Read on every call, not cached: a newer clipdex may add columns while this reads.
        """
        info = self._rows(f'PRAGMA table_info("{table}")')
        return [row[1] for row in info], {row[1] for row in info if row[2].upper() == "DATETIME"}
