"""`clipdex repair`: make a damaged library whole again from its source of truth.

All under the writer lock, in this order:

1. **catalog** — header, length and SQLite's full ``integrity_check``. If it fails, every
   readable row is salvaged into a fresh catalog (:mod:`indexer.store.salvage`), the damaged file
   is kept beside it as ``catalog.sqlite.damaged-<UTC time>``, and the fresh one takes its
   place (an atomic rename);
2. **stored vectors** — rows whose vector is not a finite unit vector of the model's size
   are deleted; their files are encoded again below;
3. **index** — every byte of the index files checked (the base's CRC-32 against its stamp,
   the delta's against the manifest: the full check an open skips), what was wrong reported,
   then the index rebuilt from the catalog's vectors alone under a new generation; older
   index files, stamps, deltas and abandoned temporary files are removed;
4. **re-encoding** — the files of step 2 that still exist, then the ``paths`` given (an
   ordinary incremental index run, which re-encodes whatever the salvage lost).

Steps 1-3 need no model; step 4 loads one only when there is something to encode.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from indexer.errors import ClipdexError, LibraryDamaged, LibraryError
from indexer.ingest import objectstore
from indexer.ingest.pipeline import IndexOptions, IndexReport, Progress, index_paths
from indexer.model.identity import Encoder
from indexer.store.catalog import Catalog
from indexer.store.catalog_reader import sqlite_file_problem
from indexer.store.kindchoice import repair_kind
from indexer.store.library import Library, index_problem, take_lock
from indexer.store.salvage import salvage

SIDE_FILES = ("", "-wal", "-shm")  # a SQLite database and its WAL companions


@dataclass
class RepairReport:
    """What `clipdex repair` found and did; ``as_dict`` is its ``--json`` document."""

    catalog: str = "ok"  # "ok" or "salvaged"
    catalog_problem: str | None = None
    damaged_copy: str | None = None
    rows_lost: int = 0
    unreadable_tables: list[str] = field(default_factory=list)
    vectors_damaged: int = 0
    reencoded: int = 0
    not_recovered: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    index_problem: str | None = None  # what the full check found in the index files
    index_images: int = 0
    indexed: IndexReport | None = None

    def as_dict(self) -> dict:
        document = {
            key: getattr(self, key)
            for key in (
                "catalog",
                "catalog_problem",
                "damaged_copy",
                "rows_lost",
                "unreadable_tables",
                "vectors_damaged",
                "reencoded",
                "index_problem",
                "index_images",
            )
        }
        document["not_recovered"] = [{"path": p, "reason": r} for p, r in self.not_recovered]
        document["indexed"] = self.indexed.as_dict() if self.indexed else None
        return document


EncoderFactory = Callable[[], Encoder]


def repair_library(
    root: str | os.PathLike,
    encoder_factory: EncoderFactory | None = None,
    paths: Sequence[str | os.PathLike] = (),
    options: IndexOptions | None = None,
    progress: Progress | None = None,
) -> RepairReport:
    """Check and rebuild the library at ``root``; see the module docstring for the steps."""
    root = Path(root).expanduser()
    if not Library.exists(root):
        raise LibraryError(
            f"no clipdex library at {root}: nothing to repair (check the library folder)",
            setting="library",
        )
    report = RepairReport()
    handle = take_lock(root)
    try:
        _repair_catalog(root, report)
        library = Library.open(root, load_index=False)
    except BaseException:
        handle.close()
        raise
    library.adopt_lock(handle)
    with library:
        damaged = _drop_unsound_vectors(library, report)
        report.index_problem = index_problem(root)
        report.index_images = library.rebuild_index(repair_kind(library))
        _reencode(library, encoder_factory, damaged, paths, options, progress, report)
    return report


# -- 1. the catalog -------------------------------------------------------------------------------
def catalog_problem(path: Path) -> str | None:
    """What is wrong with the catalog file (full integrity check), or None if it is sound.

    Problems other than damage (a newer schema, no permission) are raised, not salvaged.
    """
    problem = sqlite_file_problem(path)
    if problem is not None:
        return problem
    try:
        catalog = Catalog(path)
    except LibraryDamaged as exc:
        return exc.detail
    try:
        result = catalog.integrity_check()
    finally:
        catalog.close()
    return None if result == "ok" else result


def _repair_catalog(root: Path, report: RepairReport) -> None:
    """Salvage a damaged catalog into a fresh file and swap it in; keep the damaged one."""
    path = Library.catalog_path(root)
    problem = catalog_problem(path)
    if problem is None:
        return
    fresh = path.with_name(f"{path.name}.salvage")
    _remove_database(fresh)
    Catalog(fresh).close()  # an empty catalog at the current schema
    result = salvage(path, fresh)
    with contextlib.closing(Catalog(fresh)) as salvaged:
        salvaged.rebuild_text_index()  # derived from the salvaged image_text rows
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    kept = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}{suffix}", f"{kept}{suffix}")
    os.replace(fresh, path)
    _sync_folder(root)
    report.catalog, report.catalog_problem, report.damaged_copy = "salvaged", problem, str(kept)
    # A photo's words (image_text) go with its row and come back when it is indexed again:
    # counted with the photo, not as rows of their own.
    report.rows_lost = result.rows_lost - result.lost.get("image_text", 0)
    report.unreadable_tables = result.unreadable_tables


def _sync_folder(folder: Path) -> None:
    """Make the renames durable (a crash after repair must not bring the damage back)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_database(path: Path) -> None:
    for suffix in SIDE_FILES:
        Path(f"{path}{suffix}").unlink(missing_ok=True)


# -- 2. stored vectors ----------------------------------------------------------------------------
def _drop_unsound_vectors(library: Library, report: RepairReport) -> list[str]:
    """Delete rows whose stored vector is damaged; returns their paths, to encode again."""
    unsound = library.catalog.unsound_vectors()
    report.vectors_damaged = len(unsound)
    if unsound:
        library.catalog.delete_ids([image_id for image_id, _ in unsound])
    return [path for _, path in unsound]


# -- 4. re-encoding -------------------------------------------------------------------------------
def _reencode(
    library: Library,
    encoder_factory: EncoderFactory | None,
    damaged: list[str],
    paths: Sequence[str | os.PathLike],
    options: IndexOptions | None,
    progress: Progress | None,
    report: RepairReport,
) -> None:
    """Encode the damaged rows' files that still exist, then index ``paths``."""
    present = [p for p in damaged if _still_there(p)]
    report.not_recovered += [(p, "the file is gone") for p in damaged if p not in set(present)]
    if not present and not paths:
        return
    if encoder_factory is None:
        report.not_recovered += [(p, "no model to encode it with") for p in present]
        return
    encoder = encoder_factory()
    if present:
        again = index_paths(library, encoder, present, options)
        report.reencoded = again.indexed + again.reused
        report.not_recovered += again.failures
    if paths:
        report.indexed = index_paths(library, encoder, paths, options, progress)


def _still_there(path: str) -> bool:
    """Whether a damaged row's file (or object, for a URI) can still be encoded again."""
    if not objectstore.is_uri(path):
        return os.path.isfile(path)
    try:
        return objectstore.stat(path) is not None
    except (OSError, ClipdexError):
        return True  # the store cannot say now: the index run reports the reason
