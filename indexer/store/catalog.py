"""The catalog: image metadata, vectors and failures in SQLite, through SQLAlchemy 2.0.

The only module that imports SQLAlchemy. The catalog is the library's source of truth: it
holds every image's vector as a float32 blob next to its metadata, so the FAISS index is a
derived file that can always be rebuilt (`clipdex repair`) and a renamed file can reuse its
vector by content hash. Every write transaction bumps ``generation``; the index file records
the generation it was saved at, which tells on open whether the two agree.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import (
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DatabaseError, DisconnectionError, OperationalError

from indexer.errors import DiskFull, LibraryDamaged, LibraryError
from indexer.fsutil import file_key
from indexer.paths import ESCAPE, from_db, to_db
from indexer.store import textindex, textsearch
from indexer.store.catalog_reader import (  # the checks both catalog kinds share
    ANY_FRAME,
    ANY_VIDEO,
    CAPTURE_INDEX_DDL,
    FRAME_COUNT,
    FRAME_IDS_OF,
    FRAME_OWNERS,
    VIDEO_COUNT,
    VIDEO_FRAMES,
    VIDEO_INDEX_DDL,
    blob_to_vector,
    catalog_damage_message,
    check_catalog_file,
    sound_stack,
    sqlite_error,
    vector_is_sound,
)
from indexer.store.rawindex import RAW_FILES_SQL, RAW_INDEX_DDL
from indexer.store.textsearch import TextHit, TextTerm

SCHEMA_VERSION = 10  # == len(MIGRATIONS)
# SQLite page size of a new catalog. An images row is ~2.2-2.4 KB (its 512-d float32 vector
# is 2,048 bytes), so SQLite's default 4 KiB page holds one row and ~1.7 KB of nothing: ~4.2
# KB a photo. A 16 KiB page holds six or seven (2.7 KB a photo for a 2.37 KB row), 32 KiB
# thirteen or fourteen (2.5 KB), 64 KiB 27 (2.4 KB) but writes twice as much per row changed
# (a commit writes whole pages): 32 KiB. An older catalog keeps its page size until
# `clipdex optimize` rebuilds it (Catalog.repage). bench/bench_bytes.py --layouts measures.
PAGE_SIZE = 32768
WAL_SIZE_LIMIT = 8 * 2**20  # bytes a WAL file is cut back to after a checkpoint
metadata = MetaData()

meta_table = Table(
    "meta",
    metadata,
    Column("key", String, primary_key=True),
    Column("value", Text, nullable=False),
)

images = Table(
    "images",
    metadata,
    Column("id", Integer, primary_key=True),  # also the FAISS id; never reused (AUTOINCREMENT)
    Column("path", Text, nullable=False, unique=True),
    Column("size", Integer, nullable=False),
    Column("mtime_ns", Integer, nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("format", String),
    Column("taken_at", DateTime),
    Column("camera_make", String),
    Column("camera_model", String),
    Column("gps_lat", Float),
    Column("gps_lon", Float),
    Column("indexed_at", DateTime, nullable=False),
    Column("vector", LargeBinary, nullable=False),
    # The file's identity when indexed (indexer.fsutil.file_key): the server serves only
    # that file. NULL in rows from before schema 4 (the server then compares size + mtime).
    Column("device", Integer),
    Column("inode", Integer),
    # The file's resolved path when indexed (no symlink on it, through indexer.paths.to_db):
    # the server opens only this, refusing a link on any component. NULL before schema 5.
    Column("real_path", Text),
    # Videos (schema 6): a video is one row, "kind" = "video"; its vector is its first kept
    # frame's (at "frame_time" seconds) and its other frames live in ``frames``.
    Column("kind", String, nullable=False, server_default="photo"),
    Column("duration", Float),  # seconds (videos)
    Column("codec", String),  # e.g. "H264", "HEVC", "VP9" (videos)
    Column("frame_time", Float),  # the time of the frame whose vector the row holds (videos)
    sqlite_autoincrement=True,
)

# A video's frames other than the one its ``images`` row holds: each a searchable vector
# with its time. Frame ids are taken from the images id sequence (so the vector index stays
# one id -> vector map and a frame id is never an image id); a video's frames are written
# in the same transaction as its row and go with it (ON DELETE CASCADE).
frames = Table(
    "frames",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("image_id", Integer, ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
    Column("time", Float, nullable=False),
    Column("vector", LargeBinary, nullable=False),
    Index("ix_frames_image_id", "image_id"),
)

failures = Table(
    "failures",
    metadata,
    Column("path", Text, primary_key=True),
    Column("size", Integer),
    Column("mtime_ns", Integer),
    Column("error", Text, nullable=False),
    Column("failed_at", DateTime, nullable=False),
)


# Photos queued for re-indexing: the server found that the file at a row's path is no
# longer the one indexed (another inode, size or mtime, or a link on its path). The next
# `clipdex index` of the folder reads such a file again even if its stat looks unchanged;
# storing it again replaces the row, and the mark goes with it (ON DELETE CASCADE).
reindex = Table(
    "reindex",
    metadata,
    Column("image_id", Integer, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    Column("reason", Text, nullable=False),
    Column("queued_at", DateTime, nullable=False),
)


# Zero-shot tags (`clipdex tag`): the top labels of each image with their probability.
# Labels compare case-insensitively (NOCASE), so `--tag Cat` finds "cat" through the index.
tags = Table(
    "tags",
    metadata,
    Column("image_id", Integer, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    Column("label", String(collation="NOCASE"), primary_key=True),
    Column("score", Float, nullable=False),
    Index("ix_tags_label", "label"),
)

# Which label set each image was last tagged with (a digest of labels, prompts, model and
# thresholds): `clipdex tag` only visits images whose digest differs, so it is incremental,
# resumable after a kill, and re-tags everything when the label set changes.
tagged = Table(
    "tagged",
    metadata,
    Column("image_id", Integer, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    Column("labelset", String(64), nullable=False),
    Column("tagged_at", DateTime, nullable=False),
)


# Words of each image (schema 7): one row per (image, source), see indexer.store.textindex.
# Mirrored into the FTS5 table ``text_fts`` (rowid == id) by :meth:`Catalog._insert_texts`
# in the same transaction; a deleted row (also by ON DELETE CASCADE) leaves it by trigger.
image_text = Table(
    "image_text",
    metadata,
    Column("id", Integer, primary_key=True),  # == text_fts rowid; explicit, so VACUUM keeps it
    Column("image_id", Integer, ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
    Column("source", String, nullable=False),  # name, folder, description, keywords, ocr
    Column("text", Text, nullable=False),
    Column("confidence", Float),  # OCR: the mean recognition confidence; else NULL
    Index("ix_image_text_image_id", "image_id"),
)

TEXT_FTS_DDL = (
    "CREATE VIRTUAL TABLE IF NOT EXISTS text_fts USING fts5(text, image_id UNINDEXED, "
    "source UNINDEXED, tokenize='unicode61 remove_diacritics 2')"
)
TEXT_FTS_TRIGGER_DDL = (
    "CREATE TRIGGER IF NOT EXISTS image_text_fts_delete AFTER DELETE ON image_text "
    "BEGIN DELETE FROM text_fts WHERE rowid = old.id; END"
)
TEXT_ROOTS_KEY = "text_roots"  # meta: JSON list of indexed roots (folder words start there)


def _migration_1(conn: Connection) -> None:
    metadata.create_all(conn, tables=[meta_table, images, failures])


def _migration_2(conn: Connection) -> None:
    metadata.create_all(conn, tables=[tags, tagged])


def _migration_3(conn: Connection) -> None:
    """Paths are stored through :func:`indexer.paths.to_db`: double any literal escape char."""
    for table in ("images", "failures"):
        conn.exec_driver_sql(
            f"UPDATE {table} SET path = replace(path, ?, ?) WHERE instr(path, ?) > 0",
            (ESCAPE, ESCAPE * 2, ESCAPE),
        )


def _migration_4(conn: Connection) -> None:
    """Each image's file identity (device, inode); NULL until the file is indexed again."""
    present = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(images)")}
    for column in ("device", "inode"):
        if column not in present:  # a catalog created at schema >= 4 has them already
            conn.exec_driver_sql(f"ALTER TABLE images ADD COLUMN {column} INTEGER")


def _migration_5(conn: Connection) -> None:
    """Each image's resolved path (NULL until indexed again), and the re-index queue."""
    present = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(images)")}
    if "real_path" not in present:  # a catalog created at schema >= 5 has it already
        conn.exec_driver_sql("ALTER TABLE images ADD COLUMN real_path TEXT")
    metadata.create_all(conn, tables=[reindex])


def _migration_6(conn: Connection) -> None:
    """Videos: kind, duration, codec and frame time of each row, and the frames table."""
    present = {row[1] for row in conn.exec_driver_sql("PRAGMA table_info(images)")}
    added = {
        "kind": "TEXT NOT NULL DEFAULT 'photo'",
        "duration": "FLOAT",
        "codec": "VARCHAR",
        "frame_time": "FLOAT",
    }
    for column, declaration in added.items():
        if column not in present:  # a catalog created at schema >= 6 has them already
            conn.exec_driver_sql(f"ALTER TABLE images ADD COLUMN {column} {declaration}")
    metadata.create_all(conn, tables=[frames])


def _migration_7(conn: Connection) -> None:
    """Words of each image: ``image_text`` + the FTS5 index, filled with the name and folder
    words of every row already there (metadata and OCR text come with a re-index)."""
    metadata.create_all(conn, tables=[image_text])
    conn.exec_driver_sql(TEXT_FTS_DDL)
    conn.exec_driver_sql(TEXT_FTS_TRIGGER_DDL)
    roots = _common_root(conn)
    Catalog._set(conn, TEXT_ROOTS_KEY, json.dumps(roots))
    last = 0
    while True:
        rows = conn.exec_driver_sql(
            "SELECT id, path FROM images WHERE id > ? AND NOT EXISTS "
            "(SELECT 1 FROM image_text WHERE image_id = images.id) ORDER BY id LIMIT 5000",
            (last,),
        ).all()
        if not rows:
            return
        last = rows[-1][0]
        texts = [
            (row[0], *text) for row in rows for text in textindex.path_texts(from_db(row[1]), roots)
        ]
        Catalog._insert_texts(conn, texts)


def _migration_8(conn: Connection) -> None:
    """A partial index of the RAW files' rows (:mod:`indexer.store.rawindex`): the RAW+JPEG
    pair map reads it instead of scanning every row. Creating it reads the table once."""
    conn.exec_driver_sql(RAW_INDEX_DDL)


def _migration_9(conn: Connection) -> None:
    """A partial index of the videos' rows: counting them (``clipdex info``) and
    ``--kind video`` read the videos, not every row. Creating it reads the table once."""
    conn.exec_driver_sql(VIDEO_INDEX_DDL)


def _migration_10(conn: Connection) -> None:
    """An index of the capture time (EXIF time, then mtime): a date filter reads the rows in
    its range instead of every row. Creating it reads the table once."""
    conn.exec_driver_sql(CAPTURE_INDEX_DDL)


def _common_root(conn: Connection) -> list[str]:
    """The folder every catalogued path lies in (the common folder of the least and greatest
    path is everyone's), as the one known root of a library from before schema 7."""
    low, high = conn.exec_driver_sql("SELECT min(path), max(path) FROM images").one()
    if low is None:
        return []
    common = os.path.commonpath([os.path.dirname(from_db(low)), os.path.dirname(from_db(high))])
    return [common]


# Named, ordered migrations: index i brings the schema from version i to i + 1.
MIGRATIONS = [
    _migration_1,
    _migration_2,
    _migration_3,
    _migration_4,
    _migration_5,
    _migration_6,
    _migration_7,
    _migration_8,
    _migration_9,
    _migration_10,
]

IMAGE_FIELDS = (
    "width",
    "height",
    "format",
    "taken_at",
    "camera_make",
    "camera_model",
    "gps_lat",
    "gps_lon",
    "kind",
    "duration",
    "codec",
    "frame_time",
)


@dataclass
class ImageRecord:
    """One encoded file, ready to be stored."""

    path: str
    size: int
    mtime_ns: int
    sha256: str
    vector: np.ndarray
    width: int
    height: int
    format: str | None = None
    taken_at: dt.datetime | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None
    device: int | None = None  # the file's identity (indexer.fsutil.file_key)
    inode: int | None = None
    real_path: str | None = None  # the path with every symlink resolved, when indexed
    kind: str = "photo"  # or "video"
    duration: float | None = None  # videos: seconds
    codec: str | None = None  # videos
    frame_time: float | None = None  # videos: the time of ``vector``'s frame
    # Videos: every kept frame (the first is ``vector``'s), times ascending, and the ids the
    # frames after the first got when stored (set by :meth:`Catalog.commit_batch`).
    frame_times: Sequence[float] = ()
    frame_vectors: np.ndarray | None = None
    frame_ids: list[int] = field(default_factory=list)
    # Words that follow the content (source, text, confidence): description, keywords, OCR.
    # Name and folder words are made from ``path`` when the row is stored.
    texts: Sequence[tuple[str, str, float | None]] = ()


@dataclass(frozen=True)
class FileState:
    """What the catalog knows of a file on disk, to decide whether it changed."""

    id: int
    size: int
    mtime_ns: int
    device: int | None = None  # None in rows from before schema 4
    inode: int | None = None
    real_path: str | None = None  # None in rows from before schema 5
    queued: bool = False  # queued for re-indexing (the server found another file there)


def vector_to_blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def _image_row(record: ImageRecord, now: dt.datetime) -> dict:
    """The ``images`` row of a record (paths in their stored form)."""
    return {
        "path": to_db(record.path),
        "size": record.size,
        "mtime_ns": record.mtime_ns,
        "sha256": record.sha256,
        "vector": vector_to_blob(record.vector),
        "indexed_at": now,
        "device": record.device,
        "inode": record.inode,
        "real_path": to_db(record.real_path) if record.real_path else None,
        **{name: getattr(record, name) for name in IMAGE_FIELDS},
    }


def _prefix_range(under: str) -> tuple[str, str]:
    """Stored paths inside the folder ``under`` are exactly those in ``[low, high)``.

    A range on the path column is answered from its unique index (what changed is read,
    not every row: a no-op ``clipdex index`` of a small folder in a large library), where
    ``substr(path, 1, n) = prefix`` reads the whole table. Stored paths compare by code
    point (SQLite's BINARY collation on UTF-8), and ``high`` is the prefix with its final
    ``/`` replaced by the next character, ``0``.
    """
    low = to_db(under.rstrip("/") + "/")
    return low, low[:-1] + "0"


def _real_path(mapping) -> dict:
    """A result row as a dict whose ``path`` is the real (OS) path again."""
    row = dict(mapping)
    row["path"] = from_db(row["path"])
    if row.get("real_path") is not None:
        row["real_path"] = from_db(row["real_path"])
    return row


def _file_state(row) -> FileState:
    real_path = from_db(row.real_path) if row.real_path is not None else None
    return FileState(
        row.id, row.size, row.mtime_ns, row.device, row.inode, real_path, bool(row.queued)
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    # Takes effect only on a new, empty file (before its first table): see PAGE_SIZE.
    cursor.execute(f"PRAGMA page_size={PAGE_SIZE}")
    # WAL: readers (searches) never block the indexer and always see a committed state.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # A WAL file keeps its largest size after a checkpoint unless told: a long-running
    # server's library would carry a checkpoint's worth of old pages (up to 1,000 pages).
    cursor.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@dataclass(frozen=True)
class Repage:
    """What :meth:`Catalog.repage` did: ``done`` when the file was rebuilt, ``reason``
    when it was left as is although its pages are smaller than :data:`PAGE_SIZE`."""

    done: bool
    page_size: int  # now
    bytes_before: int
    bytes_after: int
    seconds: float
    reason: str | None = None


def _leave_wal(conn: sqlite3.Connection) -> bool:
    """Switch to rollback-journal mode; False when another connection has the file open."""
    try:
        return conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0] == "delete"
    except sqlite3.OperationalError:  # "database is locked"
        return False


def _vacuum(conn: sqlite3.Connection, path: Path) -> None:
    """VACUUM, with a full disk as :class:`DiskFull` (SQLite has rolled it back)."""
    try:
        conn.execute("VACUUM")
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF == 13 or "full" in str(exc):
            raise DiskFull.at(path.parent) from exc
        raise


def _sqlite_temp_folder() -> Path:
    """Where SQLite's unix VFS puts a VACUUM's temporary copy (its own search order)."""
    candidates = [os.environ.get("SQLITE_TMPDIR"), os.environ.get("TMPDIR")]
    candidates += ["/var/tmp", "/usr/tmp", "/tmp"]
    for folder in candidates:
        if folder and os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
            return Path(folder)
    return Path(tempfile.gettempdir())


def _room_for_vacuum(path: Path, size: int) -> str | None:
    """None if a VACUUM of a ``size``-byte file fits (a temporary copy where SQLite keeps
    them, a journal beside the file, 10 % spare each), else what is missing."""
    needs: dict[int, list] = {}
    for folder in (path.parent, _sqlite_temp_folder()):
        device = os.stat(folder).st_dev
        needs.setdefault(device, [folder, 0])[1] += size * 11 // 10
    for folder, needed in needs.values():
        fs = os.statvfs(folder)
        free = fs.f_bavail * fs.f_frsize
        if free < needed:
            return (
                f"not enough free space to rebuild it: {needed / 1e6:,.0f} MB needed on the "
                f"disk of {folder}, {free / 1e6:,.0f} MB free; free some and run "
                "`clipdex optimize` again"
            )
    return None


class Catalog:
    """Typed access to the library's SQLite database."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.exists():
            raise LibraryError(f"no catalog at {self.path}: run `clipdex index PATH` first")
        self.engine: Engine = create_engine(f"sqlite:///{self.path}", future=True)
        event.listen(self.engine, "connect", _sqlite_pragmas)
        event.listen(self.engine, "handle_error", self._translate_error)
        event.listen(self.engine, "do_connect", self._note_file)
        event.listen(self.engine, "checkout", self._drop_if_replaced)
        try:
            self._check_file()
            self._migrate()
            self._probe()
        except LibraryError:
            self.engine.dispose()
            raise
        except (DatabaseError, OperationalError) as exc:
            self.engine.dispose()
            raise LibraryError(
                f"the catalog {self.path} is unreadable ({exc.orig}): restore it from a backup, "
                "or move the library directory away and index again"
            ) from exc

    def close(self) -> None:
        self.engine.dispose()

    # -- a file replaced under us ------------------------------------------------------
    def _file_identity(self) -> tuple[int, int] | None:
        try:
            return file_key(os.stat(self.path))
        except FileNotFoundError:
            return None

    def _note_file(self, _dialect, record, _cargs, _cparams) -> None:
        """SQLAlchemy ``do_connect`` hook: remember which file a new connection opens."""
        record.info["catalog_file"] = self._file_identity()

    def _drop_if_replaced(self, _dbapi_connection, record, _proxy) -> None:
        """SQLAlchemy ``checkout`` hook: a pooled connection to a catalog file that has since
        been replaced (`clipdex repair` renames a salvaged one in) is dropped, and the pool
        opens the file now at the path; nothing is read from the deleted file."""
        now = self._file_identity()
        if now is not None and now != record.info.get("catalog_file"):
            raise DisconnectionError("the catalog file was replaced")

    # -- health -------------------------------------------------------------------------
    def _translate_error(self, context) -> None:
        """SQLAlchemy ``handle_error`` hook: disk full and damage become typed, actionable."""
        original = context.original_exception
        typed = sqlite_error(self.path, getattr(original, "sqlite_errorcode", None), original)
        if typed is not None:
            raise typed from original

    def damage_message(self, detail: str) -> str:
        return catalog_damage_message(self.path, detail)

    def _check_file(self) -> None:
        """Cheap checks on open: a SQLite header, and a file as long as it says it is."""
        check_catalog_file(self.path, self.quick_check)

    def _probe(self) -> None:
        """Touch each table's first and last rows: a damaged root page shows on open.

        O(log n) per table, unlike ``quick_check`` (which reads every page); damage deeper
        in a table shows when a query reaches it, as :class:`LibraryDamaged`.
        """
        with self.engine.connect() as conn:
            for table in metadata.sorted_tables:
                for order in ("ASC", "DESC"):
                    conn.exec_driver_sql(
                        f'SELECT * FROM "{table.name}" ORDER BY rowid {order} LIMIT 1'
                    ).all()

    # -- page size ----------------------------------------------------------------------
    def page_size(self) -> int:
        """The file's SQLite page size (new catalogs: :data:`PAGE_SIZE`)."""
        with self.engine.connect() as conn:
            return int(conn.exec_driver_sql("PRAGMA page_size").scalar_one())

    def repage(self) -> Repage:
        """Rebuild a catalog made with smaller pages (SQLite's default 4 KiB, before
        :data:`PAGE_SIZE`) with :data:`PAGE_SIZE` ones: ~4.2 KB a photo become ~2.5 KB.

        One ``VACUUM``, which can change the page size only out of WAL mode: the file goes to
        rollback-journal mode for it and back to WAL after. SQLite makes it atomic (a crash
        midway is rolled back from the journal on the next open) and it keeps every rowid,
        so the vector index stays valid. Left as is, with the reason, when it cannot be done
        safely now: another process has the catalog open (a search, a server: switching out
        of WAL needs the file alone), or the disk lacks room for the copy SQLite writes
        (the file's size twice: a temporary copy and the journal). A writer's job.
        """
        started = time.monotonic()
        before, size = self.page_size(), self._bytes()
        if before >= PAGE_SIZE:
            return Repage(False, before, size, size, 0.0)
        short = _room_for_vacuum(self.path, size)
        if short is not None:
            return Repage(False, before, size, size, 0.0, short)
        self.engine.dispose()  # this process's pooled connections: the file must be alone
        conn = sqlite3.connect(self.path, timeout=0)
        try:
            if not _leave_wal(conn):
                reason = (
                    "another process has the catalog open (a search or a server): run "
                    "`clipdex optimize` again when none does"
                )
                return Repage(False, before, size, size, 0.0, reason)
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            _vacuum(conn, self.path)
        finally:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA journal_mode=WAL")  # else the next open sets it
            conn.close()
        after = self.page_size()
        return Repage(after != before, after, size, self._bytes(), time.monotonic() - started)

    def _bytes(self) -> int:
        """The catalog's bytes on disk (the database and its WAL)."""
        return sum(
            os.stat(f"{self.path}{suffix}").st_size
            for suffix in ("", "-wal")
            if os.path.exists(f"{self.path}{suffix}")
        )

    def quick_check(self) -> str:
        """SQLite's ``PRAGMA quick_check``: ``"ok"`` or the first problem found."""
        return self._pragma_check("quick_check")

    def integrity_check(self) -> str:
        """SQLite's full ``PRAGMA integrity_check`` (reads every page; for `clipdex repair`)."""
        return self._pragma_check("integrity_check")

    def _pragma_check(self, pragma: str) -> str:
        try:
            with self.engine.connect() as conn:
                rows = conn.exec_driver_sql(f"PRAGMA {pragma}(5)").scalars().all()
        except (DatabaseError, LibraryDamaged) as exc:
            return str(getattr(exc, "orig", None) or exc).splitlines()[0][:200]
        return "ok" if rows == ["ok"] else "; ".join(map(str, rows))[:300]

    # -- schema -----------------------------------------------------------------------
    def _migrate(self) -> None:
        with self.engine.begin() as conn:
            version = self._schema_version(conn)
            if version > len(MIGRATIONS):
                raise LibraryError(
                    f"the catalog {self.path} has schema version {version}, newer than this "
                    f"clipdex understands ({len(MIGRATIONS)}): upgrade clipdex"
                )
            for step in MIGRATIONS[version:]:
                step(conn)
            if version < len(MIGRATIONS):
                self._set(conn, "schema_version", str(len(MIGRATIONS)))

    def _schema_version(self, conn: Connection) -> int:
        has_meta = conn.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='meta'"
        ).first()
        if not has_meta:
            return 0
        value = conn.execute(
            select(meta_table.c.value).where(meta_table.c.key == "schema_version")
        ).scalar()
        return int(value or 0)

    # -- key/value ----------------------------------------------------------------------
    @staticmethod
    def _set(conn: Connection, key: str, value: str) -> None:
        conn.execute(delete(meta_table).where(meta_table.c.key == key))
        conn.execute(insert(meta_table).values(key=key, value=value))

    def get_meta(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(meta_table.c.value).where(meta_table.c.key == key)).scalar()

    def set_meta(self, key: str, value: str) -> None:
        with self.engine.begin() as conn:
            self._set(conn, key, value)

    def generation(self) -> int:
        """A counter bumped by every write; the index file records the one it matches."""
        return int(self.get_meta("generation") or 0)

    def bump_generation(self) -> int:
        """Move to a new generation without other changes (an index rewritten as is)."""
        with self.engine.begin() as conn:
            self._bump(conn)
        return self.generation()

    def _bump(self, conn: Connection) -> None:
        current = conn.execute(
            select(meta_table.c.value).where(meta_table.c.key == "generation")
        ).scalar()
        self._set(conn, "generation", str(int(current or 0) + 1))

    # -- reads --------------------------------------------------------------------------
    def count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(images)).scalar_one()

    def kind_counts(self) -> dict[str, int]:
        """Photos, videos and the videos' searchable frames (each video's own row holds one
        of them): the videos through their partial index, not a scan of every row."""
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(images)).scalar_one()
            videos = conn.exec_driver_sql(VIDEO_COUNT).scalar_one()
            frame_rows = conn.exec_driver_sql(FRAME_COUNT).scalar_one()
        return {"photos": total - videos, "videos": videos, "video_frames": videos + frame_rows}

    def failure_count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(failures)).scalar_one()

    def file_states(self, under: str) -> dict[str, FileState]:
        """Every catalogued path inside the folder ``under`` (absolute, resolved)."""
        low, high = _prefix_range(under)
        c = images.c
        queued = exists().where(reindex.c.image_id == c.id).label("queued")
        query = select(
            c.path, c.id, c.size, c.mtime_ns, c.device, c.inode, c.real_path, queued
        ).where(c.path >= low, c.path < high)
        with self.engine.connect() as conn:
            return {from_db(row.path): _file_state(row) for row in conn.execute(query)}

    def file_states_at(self, paths: Sequence[str]) -> dict[str, FileState]:
        """The catalogued files among exactly these paths (a watcher's changed files): one
        indexed lookup per 500 paths, however large the folders holding them."""
        c = images.c
        queued = exists().where(reindex.c.image_id == c.id).label("queued")
        columns = (c.path, c.id, c.size, c.mtime_ns, c.device, c.inode, c.real_path, queued)
        states: dict[str, FileState] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(paths), 500):
                chunk = [to_db(p) for p in paths[start : start + 500]]
                rows = conn.execute(select(*columns).where(c.path.in_(chunk)))
                states.update({from_db(row.path): _file_state(row) for row in rows})
        return states

    def find_by_hash(self, sha256: str) -> tuple[dict, np.ndarray] | None:
        """Metadata and vector of any image with this content, for renamed or copied files."""
        query = select(images).where(images.c.sha256 == sha256).limit(1)
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        fields = {name: getattr(row, name) for name in IMAGE_FIELDS}
        texts = self.texts_for([row.id]).get(row.id, [])
        fields["texts"] = [t for t in texts if t[0] in textindex.CONTENT_SOURCES]
        if row.kind == "video":  # a renamed video reuses every frame
            times, vectors = self.video_frames(row.id)
            fields.update(frame_times=times, frame_vectors=vectors)
        return fields, blob_to_vector(row.vector)

    def ids(self) -> np.ndarray:
        """Every id the vector index holds: images (photos, videos) and video frames."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(images.c.id)).scalars().all()
            rows += conn.execute(select(frames.c.id)).scalars().all()
        return np.sort(np.asarray(rows, dtype=np.int64))

    # -- video frames ---------------------------------------------------------------------
    def frame_owners(self, ids: Iterable[int]) -> dict[int, tuple[int, float]]:
        """For the given ids that are frames (not images): id -> (video id, time)."""
        rows = self._in_sql(FRAME_OWNERS, ids)
        return {row[0]: (row[1], float(row[2])) for row in rows}

    def frame_ids_of(self, image_ids: Iterable[int]) -> np.ndarray:
        """The ids of the frames of the given videos (their rows' own ids not included).
        A library without any frame answers at once, however many ids are given."""
        with self.engine.connect() as conn:
            if conn.exec_driver_sql(ANY_FRAME).first() is None:
                return np.zeros(0, dtype=np.int64)
        rows = self._in_sql(FRAME_IDS_OF, image_ids)
        return np.asarray(sorted(row[0] for row in rows), dtype=np.int64)

    def video_frames(self, image_id: int) -> tuple[list[float], np.ndarray]:
        """Every frame of a video, the row's own first: (times, vectors), by time."""
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(VIDEO_FRAMES, (image_id, image_id)).all()
        if not rows:
            return [], np.zeros((0, 0), dtype=np.float32)
        vectors = self._sound_stack([r[0] for r in rows], [r[2] for r in rows])
        return [float(r[1]) for r in rows], vectors

    def _in_sql(self, sql: str, ids: Iterable[int]) -> list[tuple]:
        ids = [int(i) for i in ids]
        out: list[tuple] = []
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                out += conn.exec_driver_sql(sql.format(marks), tuple(chunk)).all()
        return out

    def vectors(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) for the given ids that exist (images or video frames), in chunks to
        respect SQLite limits."""
        found_ids: list[int] = []
        found: list[bytes] = []
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            query = select(images.c.id, images.c.vector).where(images.c.id.in_(chunk))
            frame_query = select(frames.c.id, frames.c.vector).where(frames.c.id.in_(chunk))
            with self.engine.connect() as conn:
                for row in [*conn.execute(query), *conn.execute(frame_query)]:
                    found_ids.append(row.id)
                    found.append(row.vector)
        if not found:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        return np.asarray(found_ids, dtype=np.int64), self._sound_stack(found_ids, found)

    def _row_batches(self, columns: Sequence, batch: int, table: Table = images) -> Iterator[list]:
        """Rows of ``table`` (id first) in id order, ``batch`` at a time (keyset paging)."""
        last = 0
        while True:
            query = select(*columns).where(table.c.id > last).order_by(table.c.id).limit(batch)
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
            if not rows:
                return
            last = rows[-1].id
            yield rows

    def iter_vectors(self, batch: int = 10_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (ids, vectors), in batches: the input of an index rebuild. Images in id
        order, then video frames in id order."""
        for table in (images, frames):
            for rows in self._row_batches((table.c.id, table.c.vector), batch, table):
                ids = [r.id for r in rows]
                vectors = self._sound_stack(ids, [r.vector for r in rows])
                yield np.asarray(ids, dtype=np.int64), vectors

    def _sound_stack(self, ids: Sequence[int], blobs: Sequence[bytes]) -> np.ndarray:
        """Stored vectors as one (n, dim) array; LibraryDamaged if any is not a unit vector.

        The index is rebuilt from these, so a damaged blob must stop the rebuild rather than
        become a wrong neighbour (:func:`~indexer.store.catalog_reader.sound_stack`).
        """
        return sound_stack(self.path, ids, blobs)

    def get_images(self, ids: Iterable[int]) -> dict[int, dict]:
        """Metadata rows (without vectors) for the given ids, keyed by id."""
        columns = [c for c in images.c if c.name != "vector"]
        ids = [int(i) for i in ids]
        out: dict[int, dict] = {}
        for start in range(0, len(ids), 500):
            query = select(*columns).where(images.c.id.in_(ids[start : start + 500]))
            with self.engine.connect() as conn:
                out.update({row.id: _real_path(row._mapping) for row in conn.execute(query)})
        return out

    def id_for_path(self, path: str) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(select(images.c.id).where(images.c.path == to_db(path))).scalar()

    def ids_where(self, where: str, params: Sequence[object] = ()) -> np.ndarray:
        """Ids of the images whose row satisfies ``where``, ascending.

        ``where`` is a plain SQLite boolean expression over the columns of ``images`` (it
        may name ``tags`` in a sub-query) with ``?`` placeholders bound to ``params``. The
        catalog knows nothing of what the condition means: the query side writes it, in
        plain SQL so that any reader of the file (this one or a bare ``sqlite3`` one) can
        run it. Never format user text into ``where``; bind it.
        """
        # Sorted here, not by ORDER BY id: that would have SQLite walk the table in id order
        # rather than answer from an index (a date range, a folder) and sort what it found.
        sql = f"SELECT id FROM images WHERE {where}"
        with self.engine.connect() as conn:
            rows = conn.exec_driver_sql(sql, tuple(params)).all()
        return np.sort(np.asarray([row[0] for row in rows], dtype=np.int64))

    def raw_files(self) -> list[tuple[int, str]]:
        """(id, path) of every camera RAW file in the library, through the partial index
        ``ix_images_raw`` (:mod:`indexer.store.rawindex`): costs what the RAWs are."""
        return [(i, from_db(path)) for i, path in self._run(RAW_FILES_SQL)]

    def formats(self) -> list[str]:
        """The distinct image formats in the library (for error messages)."""
        query = select(images.c.format).distinct().where(images.c.format.is_not(None))
        with self.engine.connect() as conn:
            return sorted(conn.execute(query).scalars().all())

    # -- words (FTS5; see indexer.store.textsearch) ----------------------------------------
    def _run(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self.engine.connect() as conn:
            return [tuple(row) for row in conn.exec_driver_sql(sql, tuple(params)).all()]

    def has_text(self) -> bool:
        """Whether any photo has words stored (names, keywords, OCR...)."""
        return textsearch.has_text(self._run)

    def text_search(
        self, terms: Sequence[TextTerm], limit: int, allowed_ids: np.ndarray | None = None
    ) -> list[TextHit]:
        """Photos whose words match any of ``terms``, best first (bm25), at most ``limit``."""
        return textsearch.text_search(self._run, terms, limit, allowed_ids)

    def text_ids(self, term: TextTerm, allowed_ids: np.ndarray | None = None) -> np.ndarray:
        """Ids of every photo whose words hold ``term`` (a phrase as a whole)."""
        return textsearch.ids_with(self._run, term, allowed_ids)

    def text_snippets(
        self, image_ids: Sequence[int], terms: Sequence[TextTerm]
    ) -> dict[int, list[dict]]:
        """Where ``terms`` stand in the given photos' words, marked ``[[...]]``."""
        return textsearch.snippets(self._run, image_ids, terms)

    # -- tags -----------------------------------------------------------------------------
    def tag_counts(self) -> list[tuple[str, int]]:
        """Every stored label with the number of images carrying it, most frequent first."""
        count = func.count().label("n")
        query = (
            select(tags.c.label, count).group_by(tags.c.label).order_by(count.desc(), tags.c.label)
        )
        with self.engine.connect() as conn:
            return [(row.label, row.n) for row in conn.execute(query)]

    def has_tags(self) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(select(tags.c.image_id).limit(1)).first() is not None

    def has_videos(self) -> bool:
        """Whether any row is a video (through the videos' partial index: at once)."""
        with self.engine.connect() as conn:
            return conn.exec_driver_sql(ANY_VIDEO).first() is not None

    def tags_for(self, ids: Iterable[int]) -> dict[int, list[tuple[str, float]]]:
        """Stored (label, score) pairs of the given images, best first; untagged ids absent."""
        ids = [int(i) for i in ids]
        out: dict[int, list[tuple[str, float]]] = {}
        for start in range(0, len(ids), 500):
            query = (
                select(tags.c.image_id, tags.c.label, tags.c.score)
                .where(tags.c.image_id.in_(ids[start : start + 500]))
                .order_by(tags.c.image_id, tags.c.score.desc(), tags.c.label)
            )
            with self.engine.connect() as conn:
                for row in conn.execute(query):
                    out.setdefault(row.image_id, []).append((row.label, float(row.score)))
        return out

    def untagged(self, labelset: str, after_id: int = 0, limit: int = 2000) -> list[int]:
        """Ids above ``after_id`` not yet tagged with ``labelset``, ascending, at most ``limit``."""
        done = exists().where(and_(tagged.c.image_id == images.c.id, tagged.c.labelset == labelset))
        query = (
            select(images.c.id)
            .where(images.c.id > after_id, ~done)
            .order_by(images.c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(query).scalars())

    def forget_tagged(self) -> None:
        """Mark every image untagged (its tags stay until it is tagged again)."""
        with self.engine.begin() as conn:
            conn.execute(delete(tagged))

    def store_tags(
        self, labelset: str, assignments: dict[int, Sequence[tuple[str, float]]]
    ) -> None:
        """Replace the tags of the given images and mark them tagged with ``labelset``."""
        now = _now()
        ids = [int(i) for i in assignments]
        with self.engine.begin() as conn:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                conn.execute(delete(tags).where(tags.c.image_id.in_(chunk)))
                conn.execute(delete(tagged).where(tagged.c.image_id.in_(chunk)))
            rows = [
                {"image_id": int(i), "label": label, "score": float(score)}
                for i, pairs in assignments.items()
                for label, score in pairs
            ]
            if rows:
                conn.execute(insert(tags), rows)
            marks = [{"image_id": i, "labelset": labelset, "tagged_at": now} for i in ids]
            if marks:
                conn.execute(insert(tagged), marks)

    def list_failures(self) -> list[dict]:
        query = select(failures.c.path, failures.c.error).order_by(failures.c.path)
        with self.engine.connect() as conn:
            return [_real_path(row._mapping) for row in conn.execute(query)]

    # -- writes -------------------------------------------------------------------------
    def commit_batch(
        self,
        records: Sequence[ImageRecord],
        failed: Sequence[tuple[str, int | None, int | None, str]] = (),
        removed_paths: Sequence[str] = (),
    ) -> list[int]:
        """Store new images, failures and removals in ONE transaction; returns the new ids.

        A path that is stored again (changed file) replaces its old row and gets a new id,
        so a stale vector in the index can never be returned under the new content. A
        video's frames are stored with its row (their ids land in ``record.frame_ids``), so
        a video is in the catalog whole or not at all.
        """
        new_ids: list[int] = []
        now = _now()
        with self.engine.begin() as conn:
            paths = [r.path for r in records] + [f[0] for f in failed] + list(removed_paths)
            self._delete_paths(conn, paths)
            if records:
                self._sequence_past_frames(conn)
            roots = self._text_roots(conn)
            if any(len(r.frame_times) > 1 for r in records):  # a video reserves ids after
                for record in records:  # its row's: one row at a time
                    result = conn.execute(insert(images).values(**_image_row(record, now)))
                    new_ids.append(int(result.inserted_primary_key[0]))
                    self._insert_frames(conn, new_ids[-1], record)
                    self._insert_record_texts(conn, new_ids[-1], record, roots)
            elif records:  # one multi-row INSERT ... RETURNING per ~1000 rows, ids in order
                returning = insert(images).returning(images.c.id, sort_by_parameter_order=True)
                rows = [_image_row(record, now) for record in records]
                new_ids = [int(row[0]) for row in conn.execute(returning, rows)]
                for image_id, record in zip(new_ids, records):
                    self._insert_frames(conn, image_id, record)  # no video: no frames
                    self._insert_record_texts(conn, image_id, record, roots)
            for path, size, mtime_ns, error in failed:
                conn.execute(
                    insert(failures).values(
                        path=to_db(path),
                        size=size,
                        mtime_ns=mtime_ns,
                        error=error,
                        failed_at=_now(),
                    )
                )
            self._bump(conn)
        return new_ids

    @staticmethod
    def _sequence_past_frames(conn: Connection) -> None:
        """Keep the images id sequence above every frame id, so a new row never takes a
        frame's id (a salvaged catalog's sequence is rebuilt from the images table alone)."""
        conn.exec_driver_sql(
            "UPDATE sqlite_sequence SET seq = (SELECT max(id) FROM frames) "
            "WHERE name = 'images' AND seq < (SELECT coalesce(max(id), 0) FROM frames)"
        )

    @staticmethod
    def _insert_frames(conn: Connection, image_id: int, record: ImageRecord) -> None:
        """A video's frames after its first, with ids reserved from the images sequence (the
        row just inserted is the sequence's last value, so the reserved ids follow it)."""
        record.frame_ids = []
        extra = len(record.frame_times) - 1
        if extra <= 0 or record.frame_vectors is None:
            return
        conn.exec_driver_sql(
            "UPDATE sqlite_sequence SET seq = seq + ? WHERE name = 'images'", (extra,)
        )
        record.frame_ids = list(range(image_id + 1, image_id + 1 + extra))
        rows = [
            {"id": i, "image_id": image_id, "time": float(t), "vector": vector_to_blob(v)}
            for i, t, v in zip(record.frame_ids, record.frame_times[1:], record.frame_vectors[1:])
        ]
        conn.execute(insert(frames), rows)

    @staticmethod
    def _insert_record_texts(
        conn: Connection, image_id: int, record: ImageRecord, roots: Sequence[str]
    ) -> None:
        """A stored image's words: its path's (name, folders) and its content's."""
        texts = textindex.path_texts(record.path, roots)
        for source, text, confidence in record.texts:
            if source in textindex.CONTENT_SOURCES:
                text = textindex.clean_text(text)
                if text:
                    texts.append((source, text, confidence))
        Catalog._insert_texts(conn, [(image_id, *text) for text in texts])

    @staticmethod
    def _insert_texts(conn: Connection, rows: Sequence[tuple]) -> None:
        """(image_id, source, text, confidence) rows into ``image_text`` and, with the same
        ids, into ``text_fts`` (CJK spaced: :func:`indexer.store.textindex.fts_text`)."""
        for image_id, source, text, confidence in rows:
            result = conn.execute(
                insert(image_text).values(
                    image_id=image_id, source=source, text=text, confidence=confidence
                )
            )
            conn.exec_driver_sql(
                "INSERT INTO text_fts (rowid, text, image_id, source) VALUES (?, ?, ?, ?)",
                (result.inserted_primary_key[0], textindex.fts_text(text), image_id, source),
            )

    @staticmethod
    def _text_roots(conn: Connection) -> list[str]:
        value = conn.execute(
            select(meta_table.c.value).where(meta_table.c.key == TEXT_ROOTS_KEY)
        ).scalar()
        try:
            roots = json.loads(value) if value else []
        except ValueError:
            return []
        return [r for r in roots if isinstance(r, str)] if isinstance(roots, list) else []

    def rebuild_text_index(self) -> int:
        """Fill ``text_fts`` again from ``image_text`` (after a salvage); returns the rows."""
        with self.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM text_fts")
            rows = conn.exec_driver_sql(
                "SELECT id, image_id, source, text FROM image_text ORDER BY id"
            ).all()
            if rows:
                conn.exec_driver_sql(
                    "INSERT INTO text_fts (rowid, text, image_id, source) VALUES (?, ?, ?, ?)",
                    [(r[0], textindex.fts_text(r[3]), r[1], r[2]) for r in rows],
                )
        return len(rows)

    def add_text_roots(self, roots: Iterable[str]) -> None:
        """Remember indexed root folders: a photo's folder words start at its root's name."""
        with self.engine.begin() as conn:
            known = self._text_roots(conn)
            new = [str(r) for r in roots if str(r) not in known]
            if new:
                self._set(conn, TEXT_ROOTS_KEY, json.dumps(known + new))

    def texts_for(self, ids: Iterable[int]) -> dict[int, list[tuple[str, str, float | None]]]:
        """Stored (source, text, confidence) rows of the given images, by source order."""
        order = {source: i for i, source in enumerate(textindex.SOURCES)}
        ids = [int(i) for i in ids]
        out: dict[int, list[tuple[str, str, float | None]]] = {}
        columns = (image_text.c.image_id, image_text.c.source, image_text.c.text)
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                query = select(*columns, image_text.c.confidence).where(
                    image_text.c.image_id.in_(ids[start : start + 500])
                )
                for row in conn.execute(query):
                    out.setdefault(row.image_id, []).append((row.source, row.text, row.confidence))
        for rows in out.values():
            rows.sort(key=lambda r: order.get(r[0], len(order)))
        return out

    @staticmethod
    def _delete_paths(conn: Connection, paths: Sequence[str]) -> None:
        for start in range(0, len(paths), 500):
            chunk = [to_db(p) for p in paths[start : start + 500]]
            conn.execute(delete(images).where(images.c.path.in_(chunk)))
            conn.execute(delete(failures).where(failures.c.path.in_(chunk)))

    def forget_failures_under(self, under: str, keep: set[str]) -> None:
        """Drop failure rows of files inside ``under`` that are no longer on disk."""
        low, high = _prefix_range(under)
        query = select(failures.c.path).where(failures.c.path >= low, failures.c.path < high)
        with self.engine.begin() as conn:
            gone = [p for p in conn.execute(query).scalars() if from_db(p) not in keep]
            for start in range(0, len(gone), 500):
                conn.execute(delete(failures).where(failures.c.path.in_(gone[start : start + 500])))

    def delete_ids(self, ids: Sequence[int]) -> None:
        with self.engine.begin() as conn:
            for start in range(0, len(ids), 500):
                chunk = [int(i) for i in ids[start : start + 500]]
                conn.execute(delete(images).where(images.c.id.in_(chunk)))
            self._bump(conn)

    def unsound_vectors(self, batch: int = 5000) -> list[tuple[int, str]]:
        """(id, real path) of every row whose stored vector is damaged, or the vector of one
        of its video frames (repair's input: the row goes, its frames with it, and its file
        is encoded again), in id order."""
        bad: dict[int, str] = {}
        for rows in self._row_batches((images.c.id, images.c.path, images.c.vector), batch):
            bad.update({r.id: from_db(r.path) for r in rows if not vector_is_sound(r.vector)})
        owners: set[int] = set()
        columns = (frames.c.id, frames.c.image_id, frames.c.vector)
        for rows in self._row_batches(columns, batch, frames):
            owners.update(r.image_id for r in rows if not vector_is_sound(r.vector))
        owners -= set(bad)
        if owners:
            query = select(images.c.id, images.c.path).where(images.c.id.in_(sorted(owners)))
            with self.engine.connect() as conn:
                bad.update({r.id: from_db(r.path) for r in conn.execute(query)})
        return sorted(bad.items())

    def touch(
        self,
        image_id: int,
        size: int,
        mtime_ns: int,
        device: int | None = None,
        inode: int | None = None,
    ) -> None:
        """Record a new stat (and file identity) for a file whose content did not change."""
        values = {"size": size, "mtime_ns": mtime_ns}
        if inode is not None:
            values.update(device=device, inode=inode)
        with self.engine.begin() as conn:
            conn.execute(update(images).where(images.c.id == image_id).values(**values))

    def record_file_keys(self, keys: Sequence[tuple]) -> None:
        """Store (id, device, inode[, real_path]) identities of unchanged files, e.g. of rows
        from before schema 4 or 5, or of files a user's link now reaches by another path."""
        if not keys:
            return
        rows = [
            {"row_id": key[0], "device": key[1], "inode": key[2], "real_path": _maybe_db(key)}
            for key in keys
        ]
        with self.engine.begin() as conn:
            conn.execute(update(images).where(images.c.id == bindparam("row_id")), rows)

    # -- the re-index queue -------------------------------------------------------------
    def queue_reindex(self, image_id: int, reason: str) -> bool:
        """Mark a photo for re-indexing (the server found another file at its path).

        The next ``clipdex index`` of its folder reads the file again whatever its stat
        says. One small transaction, no generation bump (no vector changes); marking a
        photo twice keeps the first mark. True when the photo is (now) queued.
        """
        with self.engine.begin() as conn:
            if conn.execute(select(images.c.id).where(images.c.id == image_id)).first() is None:
                return False  # replaced or removed meanwhile: nothing to queue
            conn.execute(
                insert(reindex)
                .prefix_with("OR IGNORE")
                .values(image_id=image_id, reason=reason[:500], queued_at=_now())
            )
        return True

    def reindex_count(self) -> int:
        """How many photos are queued for re-indexing."""
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(reindex)).scalar_one()


def _maybe_db(key: tuple) -> str | None:
    return to_db(key[3]) if len(key) > 3 and key[3] else None
