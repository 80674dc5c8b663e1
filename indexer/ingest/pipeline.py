"""Indexing: discover -> read + hash -> (reuse | decode -> encode) -> checkpointed storage.

Reading, hashing and decoding run in worker processes (:mod:`indexer.ingest.workers`) while this
process runs the model on the previous batch, so decoding overlaps with inference. A file
whose content hash is already in the catalog (or was encoded earlier in the run) is neither
decoded nor encoded. At most ``batch_size + 2 * workers`` files are in flight plus one batch
being encoded, which bounds memory; a file that hangs, crashes its worker or needs too much
memory is recorded as failed and costs only itself.

Results are committed in checkpoints: the catalog first (one transaction with new rows,
failures and replaced rows), then the index file, so a process killed at any moment leaves a
library that opens, and the next run resumes where it was.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.fsutil import file_key
from indexer.ingest import ocr as ocr_module
from indexer.ingest.decode import DEFAULT_MAX_MEGAPIXELS
from indexer.ingest.discover import (
    FoundFile,
    Root,
    discover,
    has_indexable_suffix,
    resolve_root,
)
from indexer.ingest.objectstore import is_uri
from indexer.ingest.ocr import OcrStage, OcrStats
from indexer.ingest.workers import DEFAULT_DECODER, DecodeLimits, DecodePool, Outcome
from indexer.model.identity import Encoder
from indexer.store.catalog import FileState, ImageRecord
from indexer.store.kindchoice import check_choice, ensure_kind
from indexer.store.library import Library


@dataclass
class IndexOptions:
    """How to index; resolved at the edge and passed in."""

    excludes: Sequence[str] = ()
    within: Sequence[str] = ()  # real folders symlinks may lead into (the server's roots)
    batch_size: int = 16
    workers: int = max(1, min(4, (os.cpu_count() or 2)))
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    checkpoint_every: int = 256  # images
    checkpoint_seconds: float = 60.0
    decode_seconds: float = 30.0  # per-file time limit in the decode workers
    decode_memory_mb: int = 2048  # per-file memory a decode worker may add (Linux)
    decoder: str = DEFAULT_DECODER  # "module:function" run by the workers; tests swap it
    index_kind: str | None = None  # auto | exact | ivf (None: keep the library's choice)
    ocr: str | None = None  # auto | always | never (None: indexer.ingest.ocr.DEFAULT_MODE)
    ocr_threshold: float = ocr_module.DEFAULT_THRESHOLD  # the gate's text likelihood

    def limits(self) -> DecodeLimits:
        return DecodeLimits(self.max_megapixels, self.decode_seconds, self.decode_memory_mb)


@dataclass
class IndexReport:
    """What one run did; ``as_dict`` is the CLI's ``--json`` document."""

    indexed: int = 0
    unchanged: int = 0
    reused: int = 0
    removed: int = 0
    failed: int = 0
    frames: int = 0  # video frames encoded (a video's other frames are not "indexed" files)
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    index_rebuilt: str | None = None  # the kind the index was rebuilt as (switch, re-train)
    # A cluster run (indexer.ingest.cluster): files per node, and files committed from the
    # shards an interrupted run left (not encoded again). None/0 for a local run.
    nodes: dict[str, int] | None = None
    resumed: int = 0
    index_parts: int = 0  # batches of the index build encoded by the cluster's tasks
    ocr: OcrStats = field(default_factory=OcrStats)  # photos read for text, and the cost

    def as_dict(self) -> dict:
        extra = {}
        if self.nodes is not None:  # a cluster run
            extra = {"nodes": dict(self.nodes), "resumed": self.resumed}
            extra["index_parts"] = self.index_parts
        return {
            "indexed": self.indexed,
            "unchanged": self.unchanged,
            "reused": self.reused,
            "removed": self.removed,
            "failed": self.failed,
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "index_rebuilt": self.index_rebuilt,
            **extra,
            "ocr_read": self.ocr.read,
            "ocr_with_text": self.ocr.with_text,
            "ocr_seconds": round(self.ocr.seconds, 3),
        }


class Progress:
    """Receives progress; the CLI subclasses it to draw a bar. The default does nothing."""

    def start(self, total: int) -> None:
        pass

    def advance(self, count: int = 1) -> None:
        pass

    def fail(self, path: str, reason: str) -> None:
        """One file could not be indexed (called before its ``advance``)."""


@dataclass
class _Plan:
    todo: list[FoundFile] = field(default_factory=list)
    unchanged: int = 0
    vanished: list[str] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)
    old_ids: dict[str, int] = field(default_factory=dict)  # path -> id it had before
    # (id, device, inode, real path) of unchanged files whose row lacks or differs in these
    keys_to_record: list[tuple[int, int | None, int | None, str | None]] = field(
        default_factory=list
    )


def is_unchanged(state: FileState | None, item: FoundFile) -> bool:
    """Whether a catalogued file is still the one indexed: same size, mtime and identity.

    A file replaced by another with the same size and mtime (``cp -p``, a restore) has a
    new inode: it is indexed again, which also records the identity the server checks. A
    photo the server queued for re-indexing (it found another file there) is read again
    whatever its stat says.
    """
    if state is None or state.queued:
        return False
    if (state.size, state.mtime_ns) != (item.size, item.mtime_ns):
        return False
    return state.inode is None or (state.device, state.inode) == (item.device, item.inode)


def plan(
    library: Library, roots: Iterable[Root], excludes: Sequence[str], within: Sequence[str] = ()
) -> _Plan:
    """Split what is on disk into unchanged, to do and vanished, by path, size, mtime and
    identity; unchanged rows from before the catalog kept identities get theirs."""
    result = _Plan()
    for root in roots:
        found = discover(root, excludes, within)
        result.problems.extend(found.problems)
        if root.is_dir():
            states = library.catalog.file_states(str(root))
        else:
            states = library.catalog.file_states(str(root.parent))
            states = {str(root): states[str(root)]} if str(root) in states else {}
        on_disk = {f.path for f in found.files}
        for item in found.files:
            state = states.get(item.path)
            if is_unchanged(state, item):
                result.unchanged += 1
                if _identity_to_record(state, item):
                    key = (state.id, item.device, item.inode, item.real_path)
                    result.keys_to_record.append(key)
                continue
            if state:
                result.old_ids[item.path] = state.id
            result.todo.append(item)
        for path, state in states.items():
            if path not in on_disk:
                result.vanished.append(path)
                result.old_ids[path] = state.id
        if root.is_dir():
            library.catalog.forget_failures_under(str(root), on_disk)
    library.catalog.record_file_keys(result.keys_to_record)
    return result


def _identity_to_record(state: FileState, item: FoundFile) -> bool:
    """An unchanged file whose row lacks its identity or real path (rows from before schema
    4 or 5), or reaches it by another real path now (a user's link moved to the same files)."""
    if state.inode is None and item.inode is not None:
        return True
    return item.real_path is not None and state.real_path != item.real_path


class HashMemo:
    """Content hashes encoded in this run or, through ``find`` (e.g. the catalog's
    ``find_by_hash``), stored before; asked by the decode pool's thread."""

    def __init__(self, find: Callable[[str], tuple[dict, np.ndarray] | None] | None = None):
        self._find = find
        self._seen: dict[str, tuple[dict, np.ndarray]] = {}
        self._lock = threading.Lock()

    def lookup(self, sha256: str) -> tuple[dict, np.ndarray] | None:
        with self._lock:
            hit = self._seen.get(sha256)
        if hit is not None or self._find is None:
            return hit
        return self._find(sha256)

    def remember(self, sha256: str, fields: dict, vector: np.ndarray) -> None:
        with self._lock:
            self._seen[sha256] = (fields, vector)


class _Writer:
    """Accumulates results and commits them in checkpoints."""

    def __init__(self, library: Library, plan_: _Plan, options: IndexOptions) -> None:
        self.library = library
        self.plan = plan_
        self.options = options
        self.records: list[ImageRecord] = []
        self.failed: list[tuple[str, int | None, int | None, str]] = []
        self.last = time.monotonic()
        self.wrote = False  # whether any checkpoint stored something

    def add(self, item: Outcome, vector: np.ndarray) -> None:
        found = item.found
        self.records.append(
            ImageRecord(
                found.path,
                found.size,
                found.mtime_ns,
                item.sha256,
                vector,
                **item.fields,
                device=found.device,
                inode=found.inode,
                real_path=found.real_path,
            )
        )

    def fail(self, found: FoundFile, reason: str) -> None:
        self.failed.append((found.path, found.size, found.mtime_ns, reason))

    def maybe_checkpoint(self) -> None:
        due = time.monotonic() - self.last >= self.options.checkpoint_seconds
        if len(self.records) + len(self.failed) >= self.options.checkpoint_every or due:
            self.checkpoint()

    def checkpoint(self, removed: Sequence[str] = ()) -> None:
        """Catalog transaction first, then the index's changes under the new generation.

        Nothing to store (a run that found nothing new): nothing is written at all.
        """
        if not (self.records or self.failed or removed):
            self.last = time.monotonic()
            return
        self.wrote = True
        index = self.library.index  # read (and reconciled) before the catalog moves on
        touched = [r.path for r in self.records] + [f[0] for f in self.failed] + list(removed)
        replaced = [self.plan.old_ids[p] for p in touched if p in self.plan.old_ids]
        catalog = self.library.catalog
        replaced += catalog.frame_ids_of(replaced).tolist()  # a replaced video's frames go too
        ids = catalog.commit_batch(self.records, self.failed, removed)
        index.remove(np.asarray(replaced, dtype=np.int64))
        if self.records:
            index.add(*_index_entries(ids, self.records))
        self.library.checkpoint()
        self.records, self.failed = [], []
        self.last = time.monotonic()


def _index_entries(ids: Sequence[int], records: Sequence[ImageRecord]):
    """(ids, vectors) for the index: each row's own vector, then each video's other frames."""
    all_ids = list(ids)
    vectors = [r.vector[None] for r in records]
    for record in records:
        if record.frame_ids and record.frame_vectors is not None:
            all_ids += record.frame_ids
            vectors.append(record.frame_vectors[1 : 1 + len(record.frame_ids)])
    return np.asarray(all_ids, np.int64), np.vstack(vectors).astype(np.float32)


def index_paths(
    library: Library,
    encoder: Encoder,
    paths: Sequence[str | os.PathLike],
    options: IndexOptions | None = None,
    progress: Progress | None = None,
) -> IndexReport:
    """Index (or update) the given folders/files into ``library`` with ``encoder``."""
    options = options or IndexOptions()
    progress = progress or Progress()
    started = time.monotonic()
    roots = [resolve_root(p) for p in paths]
    report = IndexReport()
    with library.writing():
        library.bind_model(encoder.identity)
        library.catalog.add_text_roots(str(r if r.is_dir() else r.parent) for r in roots)
        work = plan(library, roots, options.excludes, options.within)
        writer = start_run(library, work, options, report, progress)
        memo = HashMemo(library.catalog.find_by_hash)
        ocr = ocr_stage(library, encoder, options)
        run_files(work.todo, memo, encoder, options, writer, report, progress, ocr=ocr)
        return finish_run(library, writer, report, options, started)


def index_changes(
    library: Library,
    encoder: Encoder,
    paths: Sequence[str | os.PathLike],
    options: IndexOptions | None = None,
    progress: Progress | None = None,
    roots: Sequence[str | os.PathLike] = (),
) -> IndexReport:
    """Bring exactly these changed paths up to date (a watcher's batch), incrementally.

    A path may be a file (indexed if new or changed), a folder (walked as by
    :func:`index_paths`) or a path that is gone (its rows, and every row under it when it
    was a folder, leave the library). Unlike :func:`index_paths` nothing else is walked, so
    a batch costs what changed, not the size of the folders around it. A moved photo keeps
    its vector when its old and new paths are in the same batch (found by content hash
    before the old row is removed, in the same checkpoint). ``roots``: the watched folders
    the paths lie in (a photo's folder words start at its root, as with ``index_paths``).
    """
    options = options or IndexOptions()
    progress = progress or Progress()
    started = time.monotonic()
    report = IndexReport()
    with library.writing():
        library.bind_model(encoder.identity)
        library.catalog.add_text_roots(os.fspath(root) for root in roots)
        work, gone = plan_changes(library, [Path(p) for p in paths], options)
        writer = start_run(library, work, options, report, progress)
        memo = HashMemo(library.catalog.find_by_hash)
        ocr = ocr_stage(library, encoder, options)
        run_files(work.todo, memo, encoder, options, writer, report, progress, ocr=ocr)
        # Gone paths also drop their failure rows (a failed file that was deleted); a
        # growing library may cross into another kind, or its ivf lists need re-training.
        return finish_run(library, writer, report, options, started, gone=gone, check_kind=True)


def start_run(
    library: Library, work: _Plan, options: IndexOptions, report: IndexReport, progress: Progress
) -> _Writer:
    """The start of every run once planned (:func:`index_paths`, :func:`index_changes`, a
    cluster run): the plan's unchanged count and problems in the report, the progress
    total, and the writer that stores the run's files. The caller holds the writer lock."""
    report.unchanged = work.unchanged
    report.failures.extend(work.problems)
    progress.start(len(work.todo))
    return _Writer(library, work, options)


def finish_run(
    library: Library,
    writer: _Writer,
    report: IndexReport,
    options: IndexOptions,
    started: float,
    *,
    gone: Sequence[str] = (),
    check_kind: bool = False,
) -> IndexReport:
    """The end of every run (:func:`index_paths`, :func:`index_changes`, a cluster run):
    the last checkpoint, which also removes the rows of vanished files (and of ``gone``
    paths), the index kind the library asks for, and the report's totals.

    The kind check (a switch or an ivf re-training: rebuilt from the catalog, nothing
    encoded) runs when the run stored something, names a kind, or ``check_kind`` asks
    (a watcher's batch); a run that changed nothing does not look at the index for it.
    The caller holds the writer lock.
    """
    vanished = writer.plan.vanished
    writer.checkpoint(removed=list(dict.fromkeys([*vanished, *gone])))
    report.removed = len(vanished)
    if check_kind or writer.wrote or options.index_kind is not None:
        report.index_rebuilt = ensure_kind(library, check_choice(options.index_kind))
    report.failed = len(report.failures)
    report.seconds = time.monotonic() - started
    return report


def plan_changes(
    library: Library, paths: Sequence[Path], options: IndexOptions
) -> tuple[_Plan, list[str]]:
    """The plan for a set of changed paths, and the paths among them that are gone."""
    result, gone, files = _Plan(), [], []
    for path in paths:
        if path.is_dir():
            _merge_plan(result, plan(library, [path], options.excludes, options.within))
        elif path.exists():
            found = discover(path, options.excludes, options.within)
            result.problems.extend(found.problems)
            files.extend(found.files)
        else:
            gone.append(str(path))
    states = library.catalog.file_states_at([f.path for f in files])
    for item in files:
        state = states.get(item.path)
        if is_unchanged(state, item):
            result.unchanged += 1
            continue
        if state:
            result.old_ids[item.path] = state.id
        result.todo.append(item)
    _plan_gone(library, gone, result)
    return result, gone


def _plan_gone(library: Library, gone: list[str], result: _Plan) -> None:
    """Rows of gone paths: the file itself, or everything under it when it was a folder."""
    catalog = library.catalog
    exact = catalog.file_states_at(gone)
    for path in gone:
        if path in exact:
            states = {path: exact[path]}
        elif has_indexable_suffix(path):
            continue  # a file never indexed (perhaps failed: its row goes with ``gone``)
        else:  # perhaps a folder: everything under it goes, failure rows too
            states = catalog.file_states(path)
            catalog.forget_failures_under(path, set())
        for old, state in states.items():
            if old not in result.old_ids:
                result.vanished.append(old)
                result.old_ids[old] = state.id


def _merge_plan(into: _Plan, other: _Plan) -> None:
    into.todo.extend(other.todo)
    into.unchanged += other.unchanged
    into.vanished.extend(other.vanished)
    into.problems.extend(other.problems)
    into.old_ids.update(other.old_ids)


def run_files(
    todo: list[FoundFile],
    memo: HashMemo,
    encoder: Encoder,
    options: IndexOptions,
    writer: _Writer,
    report: IndexReport,
    progress: Progress,
    pool: DecodePool | None = None,
    ocr: OcrStage | None = None,
) -> None:
    """Read, hash, decode and encode ``todo`` into ``writer`` (its ``add``, ``fail`` and
    ``maybe_checkpoint``): the one path every file takes, locally and on a cluster's
    workers (:mod:`indexer.ingest.cluster`), so both apply the same rules and limits.

    ``pool``: a :func:`decode_pool` kept by the caller for several runs (left open);
    None: one for this run, closed at its end. ``ocr``: the text-reading stage
    (:func:`indexer.ingest.ocr.make_stage`, ideally with the library's cache for the gate's
    prompt vectors, and kept across runs); None: one from ``options`` without a cache.
    Its counts go to ``report.ocr``.
    """
    if not todo:
        return
    batch: list[Outcome] = []
    if ocr is None:
        ocr = ocr_module.make_stage(
            ocr_module.check_mode(options.ocr or ocr_module.DEFAULT_MODE),
            encoder,
            None,
            options.ocr_threshold,
            options.max_megapixels,
        )
    ocr.stats = report.ocr
    owned = pool is None
    pool = pool or decode_pool(options, memo)
    with pool if owned else contextlib.nullcontext():
        pool.start(todo)
        # Load the model (a first-time ONNX export included) while the workers start up.
        prepare = getattr(encoder, "prepare", None)
        if prepare is not None:
            prepare()
        for item in pool.outcomes():
            if _is_video(item):
                # The photos before it first: ids follow discovery order, as on a cluster.
                if batch:
                    _encode(batch, encoder, memo, writer, report, progress, ocr)
                    batch = []
                _encode_video(item, encoder, options.batch_size, memo, writer, report, progress)
                writer.maybe_checkpoint()
                continue
            _route(item, batch, writer, report, progress)
            if len(batch) >= options.batch_size:
                _encode(batch, encoder, memo, writer, report, progress, ocr)
                batch = []
            writer.maybe_checkpoint()
    if batch:
        _encode(batch, encoder, memo, writer, report, progress, ocr)


def ocr_stage(library: Library, encoder: Encoder, options: IndexOptions) -> OcrStage:
    """The OCR stage for a run into ``library`` (the gate's prompt vectors cached there)."""
    mode = ocr_module.check_mode(options.ocr or ocr_module.DEFAULT_MODE)
    return ocr_module.make_stage(
        mode, encoder, library.label_cache_dir, options.ocr_threshold, options.max_megapixels
    )


def decode_pool(options: IndexOptions, memo: HashMemo) -> DecodePool:
    """The decode worker processes for a run with these options, asking ``memo`` whether a
    content is already known (such a file is not decoded)."""
    return DecodePool(
        options.workers,
        options.limits(),
        memo.lookup,
        capacity=options.batch_size + 2 * options.workers,
        decoder=options.decoder,
    )


def _route(
    item: Outcome, batch: list[Outcome], writer: _Writer, report: IndexReport, progress: Progress
) -> None:
    if not _failed(item, writer, report, progress):
        batch.append(item)  # to encode, or already known (its vector given): see _encode


def write_known(item: Outcome, writer: _Writer, report: IndexReport, progress: Progress) -> None:
    """Write a file whose content is already known (its vector given) at once, or fail it
    as a batch would when its file changed since discovery (a cluster run's moved photos)."""
    if not _failed(item, writer, report, progress):
        writer.add(item, item.vector)
        report.reused += 1
        progress.advance()


def _failed(item: Outcome, writer: _Writer, report: IndexReport, progress: Progress) -> bool:
    """Record ``item`` as failed when its worker failed it or its file changed since
    discovery (:func:`_unstable`); whether it was."""
    item.error = _unstable(item.found) or item.error
    if item.error is None:
        return False
    writer.fail(item.found, item.error)
    report.failures.append((item.found.path, item.error))
    progress.fail(item.found.path, item.error)
    progress.advance()
    return True


def _is_video(item: Outcome) -> bool:
    """A decoded video (a stack of frames to encode), not yet failed or reused."""
    return item.error is None and item.pixels is not None and item.pixels.ndim == 4


def _encode_video(
    item: Outcome,
    encoder: Encoder,
    batch_size: int,
    memo: HashMemo,
    writer: _Writer,
    report: IndexReport,
    progress: Progress,
) -> None:
    """Encode all of a video's frames, then hand the writer the whole video at once: a
    checkpoint never holds part of a video."""
    if _failed(item, writer, report, progress):
        return
    frames = item.pixels
    item.pixels = None
    chunks = range(0, len(frames), batch_size)
    vectors = np.vstack([encoder.encode_images(frames[i : i + batch_size]) for i in chunks])
    item.fields = {**item.fields, "frame_vectors": vectors}
    memo.remember(item.sha256, item.fields, vectors[0])
    writer.add(item, vectors[0])
    report.indexed += 1
    report.frames += len(vectors)
    progress.advance()


def _unstable(found: FoundFile) -> str | None:
    """Why a file's bytes may not match what discovery saw (so must not be stored), or None.

    The worker read the file after discovery stat'ed it. If it has gone, or its size or
    mtime moved since, the bytes read may be the old file, the new one or a mix: the file is
    recorded as failed (and so retried by the next run) instead of stored under a stale stat.
    A change after this check is caught by the next run, which sees a stat that differs.
    """
    if is_uri(found.path):
        # An object is replaced whole (a PUT is atomic): the bytes read are one complete
        # version, never a mix. Were they newer than the version listed, the row keeps the
        # listed size and LastModified, so the next run sees them differ and reads it again;
        # one deleted before it was read failed in the worker. No request needed here.
        return None
    try:
        stat = os.stat(found.path)
    except FileNotFoundError:
        return "the file disappeared while being indexed"
    except OSError:
        return None  # the worker's reason (e.g. permission denied) says more
    now = (stat.st_size, stat.st_mtime_ns)
    if found.inode is not None:  # replaced by another file with the same size and mtime?
        now += file_key(stat)
    if now != (found.size, found.mtime_ns, found.device, found.inode)[: len(now)]:
        return "the file changed while being indexed: index it again once it is complete"
    return None


def _encode(
    batch: list[Outcome],
    encoder: Encoder,
    memo: HashMemo,
    writer: _Writer,
    report: IndexReport,
    progress: Progress,
    ocr: OcrStage,
) -> None:
    """Encode each distinct content once and write the batch in its order (ids follow
    discovery order); copies decoded in the same batch share the vector (and the text OCR
    read in it, when the gate chose it); a known content (its vector given) is not encoded."""
    unique: dict[str, Outcome] = {}
    for item in batch:
        if item.vector is None:
            unique.setdefault(item.sha256, item)
    by_hash: dict[str, np.ndarray] = {}
    if unique:
        vectors = encoder.encode_images(np.stack([item.pixels for item in unique.values()]))
        firsts = list(unique.values())
        for item in firsts:
            item.fields = dict(item.fields or {})
        ocr.add_texts([i.found.path for i in firsts], [i.fields for i in firsts], vectors)
        for item in batch:  # copies in the batch take the first's fields (its OCR text)
            if item.vector is None:
                item.fields = unique[item.sha256].fields
        by_hash = dict(zip(unique, vectors))
        for sha256, vector in by_hash.items():
            memo.remember(sha256, unique[sha256].fields, vector)
    for item in batch:
        item.pixels = None
        writer.add(item, item.vector if item.vector is not None else by_hash[item.sha256])
    report.indexed += len(unique)
    report.reused += len(batch) - len(unique)
    progress.advance(len(batch))
