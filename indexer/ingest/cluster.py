"""Indexing on a Ray cluster: this process plans and commits, Ray Data does the work.

The coordinator (the process that runs ``clipdex index --cluster``) holds the writer lock and
diffs the folders against the catalog exactly as a local run does
(:func:`indexer.ingest.pipeline.plan`: unchanged files cost nothing, moved ones are matched by
content hash here and reuse their vectors). Only the files to read, decode and encode go to
Ray Data, one *shard* of files per call of an actor that loads the model once (``auto``:
ONNX Runtime on a CPU worker, torch on a GPU worker) and runs the shard through
:func:`indexer.ingest.pipeline.run_files`, the local path itself: decode worker processes
with the same pixel, time and memory limits and the same failure reasons.

Each finished shard comes back as an Arrow table (path, size, mtime, identity, hash,
metadata, vector or error, node), is written atomically as Parquet under the library
(:attr:`~indexer.store.library.Library.shard_dir`) and committed in one transaction through
the local pipeline's writer, in discovery order (ids follow the files' order). A killed
actor is restarted and its shard retried by Ray; a killed coordinator leaves its shards
behind, and the next run commits the rows that still match the files instead of encoding
them again. The shards are deleted once a run completes.

The index is built on the cluster too: while a cluster run holds the library, every ivf base
it builds (a compaction at a shard's checkpoint, a kind switch or re-training at the end) is
trained once here and its batches of vectors encoded by Ray tasks (:class:`RayParts`), then
merged here into the index a local build makes (:meth:`indexer.store.ivf.IVFIndex.build`).

Ray (and pyarrow, which comes with it) is imported only here, and only when a cluster is
asked for (``pip install 'clipdex[ray]'``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import ClipdexError, ClusterUnavailable, ConfigError
from indexer.fsutil import child_pythonpath, write_atomic
from indexer.ingest import objectstore
from indexer.ingest import ocr as ocr_module
from indexer.ingest.discover import FoundFile, resolve_root
from indexer.ingest.pipeline import (
    HashMemo,
    IndexOptions,
    IndexReport,
    Progress,
    _Writer,
    decode_pool,
    finish_run,
    plan,
    run_files,
    start_run,
    write_known,
)
from indexer.ingest.workers import Outcome, hash_file
from indexer.model.identity import Encoder
from indexer.store.library import Library

SHARD_SUFFIX = ".parquet"
NO_KEY = -1  # a file's device/inode when unknown (Arrow int64 columns have no None here)
EncoderSource = Any  # an encoder, or a picklable zero-argument callable that builds one


@dataclass
class ClusterOptions:
    """Where and how to run on Ray; resolved at the edge."""

    address: str = "auto"  # "auto": the running cluster (RAY_ADDRESS); "local": start one here
    shard_size: int = 64  # files per actor call = per shard = per commit
    actors: int | None = None  # None: as many as the cluster's CPUs (or GPUs) allow
    cpus_per_actor: float | None = None  # None: 1 (a GPU actor: its node's CPUs per GPU)
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    # What the actors build their model from (a picklable factory such as the CLI's
    # EncoderLoader, or an encoder); None: the collection's own encoder source.
    encoder_source: Any = None


# -- connecting --------------------------------------------------------------------------------
def connect(address: str):
    """The ``ray`` module, connected to the cluster at ``address`` (once per process)."""
    try:
        import ray
    except ImportError as exc:
        raise ClusterUnavailable(
            "indexing on a cluster needs Ray: pip install 'clipdex[ray]'", setting="cluster"
        ) from exc
    if not ray.is_initialized():
        _init(ray, address)
    _quiet_ray_data()
    return ray


def _init(ray, address: str) -> None:
    # Workers import this very copy of clipdex, as the local decode workers do.
    runtime_env = {"env_vars": {"PYTHONPATH": child_pythonpath()}}
    settings = {"runtime_env": runtime_env, "log_to_driver": False, "logging_level": "ERROR"}
    try:
        if address == "local":  # a new private instance, even beside a running cluster
            ray.init(address="local", include_dashboard=False, **settings)
        else:
            ray.init(address=address, **settings)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterUnavailable(
            f"cannot reach the Ray cluster at {address!r} ({exc}): start one with `ray start "
            "--head` (see the README), give its address, or use --cluster local",
            setting="cluster",
        ) from exc


def _quiet_ray_data() -> None:
    """Ray Data's own progress bars and banners would garble clipdex's bar."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.execution_options.preserve_order = True  # commits (and ids) in discovery order
    logging.getLogger("ray.data").setLevel(logging.ERROR)


# -- the coordinator ---------------------------------------------------------------------------
def index_on_cluster(
    library: Library,
    encoder: Encoder,
    make_encoder: EncoderSource,
    paths: Sequence[str | os.PathLike],
    options: IndexOptions | None = None,
    cluster: ClusterOptions | None = None,
    progress: Progress | None = None,
) -> IndexReport:
    """Index (or update) folders into ``library`` with Ray workers doing the encoding.

    ``encoder`` gives the model's identity (this process does not encode); ``make_encoder``
    is shipped to the workers, which build their own model from it once per actor.
    """
    options = options or IndexOptions()
    cluster = cluster or ClusterOptions()
    progress = progress or Progress()
    started = time.monotonic()
    roots = [resolve_root(p) for p in paths]
    ray = connect(cluster.address)
    report = IndexReport(nodes={})
    with library.writing():
        library.bind_model(encoder.identity)
        library.catalog.add_text_roots(str(r if r.is_dir() else r.parent) for r in roots)
        work = plan(library, roots, options.excludes, options.within)
        writer = start_run(library, work, options, report, progress)
        sink = Committer(writer, report, progress)
        shards = library.shard_dir
        todo = commit_leftover_shards(shards, work.todo, sink)
        todo = _reuse_moved(library, work.vanished, todo, sink)
        # Every index build of the run (a compaction at a checkpoint, a kind switch or
        # re-training at the end) has its batches encoded by the cluster's tasks.
        parts = library.part_encoder = RayParts(ray)
        try:
            if todo:
                _run_on_cluster(ray, todo, make_encoder, options, cluster, shards, sink)
            sink.write_known_until(None)  # known files after the last one of the cluster
            # Every shard's rows are committed: the shards go before a long index build.
            clear_shards(shards)
            finish_run(library, writer, report, options, started)
        finally:
            library.part_encoder = None
            report.index_parts = parts.count
    return report


def _reuse_moved(
    library: Library,
    vanished: Sequence[str],
    todo: list[FoundFile],
    sink: Committer,
) -> list[FoundFile]:
    """Files whose content the catalog already has (a moved or renamed photo) take its
    vector here, as a local run does, instead of going to the cluster; ``sink`` writes them
    in discovery order among the cluster's files. Only files as large as a vanished row are
    hashed: a move keeps the size."""
    sizes = {state.size for state in library.catalog.file_states_at(list(vanished)).values()}
    if not sizes:
        return todo
    rest = []
    for found in todo:
        known = None
        if found.size in sizes:
            try:
                sha256 = hash_file(found.path)
            except OSError:
                sha256 = None
            known = library.catalog.find_by_hash(sha256) if sha256 else None
        if known is None:
            rest.append(found)
            continue
        fields, vector = known
        item = Outcome(found, sha256, fields=dict(fields), vector=vector)
        # Written where a local run writes it: before the file that follows it in
        # discovery order (its seq in the cluster's work list), so the ids are the same.
        sink.known.append((len(rest), item))
    return rest


def _run_on_cluster(
    ray,
    todo: list[FoundFile],
    make_encoder: EncoderSource,
    options: IndexOptions,
    cluster: ClusterOptions,
    shard_dir: Path,
    sink: Committer,
) -> None:
    """Stream ``todo`` through the actors; write and commit each shard as it comes back."""
    size = max(1, cluster.shard_size)
    tables = [_todo_table(todo[i : i + size], i) for i in range(0, len(todo), size)]
    actors, cpus, gpus = actor_shape(ray, cluster, len(tables))
    worker_options = replace(options, workers=max(1, int(cpus)))
    dataset = ray.data.from_arrow(tables).map_batches(
        ShardEncoder,
        batch_size=None,  # one input block (one shard) per call
        batch_format="pyarrow",
        # All actors start at once; the pool may shrink when a node is lost.
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors, initial_size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
        fn_constructor_kwargs={
            "make_encoder": make_encoder,
            "options": worker_options,
            "store_env": objectstore.forwarded_env(),  # s3:// settings, as here
        },
    )
    run = f"{int(time.time() * 1000):x}"
    results = dataset.iter_batches(batch_size=None, batch_format="pyarrow")
    for number, table in enumerate(_translated(results)):
        write_shard(shard_dir / f"{run}-{number:06d}{SHARD_SUFFIX}", table)
        sink.commit(shard_rows(table))


def _translated(results, get=None):
    """Ray's errors (an actor that cannot load the model, a lost cluster) as clipdex's: a
    ClipdexError raised in an actor keeps its type and message; anything else is named.
    ``get``: turns each item (an object ref) into its value first."""
    try:
        for item in results:
            yield get(item) if get is not None else item
    except ClipdexError:
        raise
    except Exception as exc:  # the boundary with Ray: no traceback for the user
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if isinstance(cause, ClipdexError):
            raise cause from exc
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[-1]
        raise ClusterUnavailable(
            f"the Ray run failed ({type(cause).__name__}: {first}); the shards committed so far "
            "are kept, and the next run resumes from them",
            setting="cluster",
        ) from exc


def actor_shape(ray, cluster: ClusterOptions, shards: int) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for the cluster as it is now."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    total_gpus = sum(node.get("GPU", 0) for node in nodes)
    gpus = cluster.gpus_per_actor if cluster.gpus_per_actor is not None else min(1, total_gpus)
    if cluster.cpus_per_actor is not None:
        cpus = cluster.cpus_per_actor
    elif gpus:  # a GPU actor decodes with its share of its node's CPUs
        cpus = min(node["CPU"] // max(1, node["GPU"]) for node in nodes if node.get("GPU"))
    else:
        cpus = 1.0
    cpus = max(cpus, 0.5) if cpus else 1.0
    if cluster.actors is not None:
        actors = cluster.actors
    elif gpus:
        actors = int(total_gpus // gpus)
    else:
        actors = int(sum(node.get("CPU", 0) // cpus for node in nodes))
    if actors < 1:
        raise ConfigError(
            f"the Ray cluster has no room for an actor of {cpus:g} CPU(s) and {gpus:g} GPU(s): "
            "add nodes or lower --cluster-cpus",
            setting="cluster",
        )
    return min(actors, shards), float(cpus), float(gpus)


# -- the index build's tasks -----------------------------------------------------------------------
class RayParts:
    """An ivf build's batches encoded by Ray tasks across the cluster
    (:class:`indexer.store.ivf.PartEncoder`): the coordinator trains once and ships the
    trained index to the tasks once; each task assigns one batch's vectors to their lists,
    quantises them and computes their exact top-10 for the tuning queries; the coordinator
    merges the parts in the batches' order (a copy of codes), so the index is the one a
    local build makes. A task lost with its worker or node is run again by Ray.

    At most ``window`` batches are in flight (the coordinator reads the next batches from
    the catalog meanwhile): one per CPU of the cluster by default, spread over the nodes.
    The tasks reserve no CPU: a compaction due at a shard's checkpoint runs while the
    encoding actors still hold theirs (they idle meanwhile: the coordinator is building,
    not taking shards); each task runs FAISS on one thread.
    """

    def __init__(self, ray, window: int | None = None) -> None:
        self.ray = ray
        self.window = window
        self.count = 0  # parts encoded by the tasks (all builds of the run)

    def __call__(self, job, batches):
        ray = self.ray
        window = self.window or max(2, int(ray.cluster_resources().get("CPU", 1)))
        encode = ray.remote(num_cpus=0, max_retries=5, scheduling_strategy="SPREAD")(
            _encode_part
        )
        shared = ray.put(job)  # the trained index goes to each node once
        pending: deque = deque()
        for ids, vectors in batches:
            pending.append(encode.remote(shared, ids, vectors))
            if len(pending) >= window:
                yield self._result(pending.popleft())
        while pending:
            yield self._result(pending.popleft())

    def _result(self, ref):
        part = next(_translated(iter([ref]), get=self.ray.get))
        self.count += 1
        return part


def _encode_part(job, ids, vectors):
    """A Ray task: one batch of the index build (:func:`indexer.store.ivf.encode_part`)."""
    from indexer.store.ivf import encode_part
    from indexer.store.vectors import set_search_threads

    set_search_threads(1)  # one task per CPU: no thread team per task
    return encode_part(job, ids, vectors)


# -- the actors --------------------------------------------------------------------------------
class ShardEncoder:
    """A Ray Data actor: loads the model once, then turns one shard of files per call into
    result rows through the local pipeline's :func:`run_files`."""

    def __init__(
        self,
        make_encoder: EncoderSource,
        options: IndexOptions,
        store_env: dict[str, str] | None = None,
    ) -> None:
        # How the coordinator reaches object storage (s3:// files): this actor and its
        # decode processes read the objects the same way.
        os.environ.update(store_env or {})
        is_factory = callable(make_encoder) and not hasattr(make_encoder, "encode_images")
        self.encoder = make_encoder() if is_factory else make_encoder
        prepare = getattr(self.encoder, "prepare", None)
        if prepare is not None:
            prepare()
        self.options = options
        self.memo = HashMemo()  # contents this actor encoded (copies reuse them)
        self.pool = decode_pool(options, self.memo)  # its processes serve every shard
        # The text-reading stage (OCR, when the mode and its gate choose it) runs here too,
        # set up once per actor (the gate's prompt vectors are encoded once).
        mode = ocr_module.check_mode(options.ocr)
        self.ocr = ocr_module.make_stage(
            mode, self.encoder, None, options.ocr_threshold, options.max_megapixels
        )
        self.node = _node_name()

    def __del__(self) -> None:
        self.pool.close()

    def __call__(self, batch) -> Any:
        columns = batch.to_pydict()
        todo = [
            FoundFile(path, size, mtime, _key(device), _key(inode), real)
            for path, size, mtime, device, inode, real in zip(
                columns["path"],
                columns["size"],
                columns["mtime_ns"],
                columns["device"],
                columns["inode"],
                columns["real_path"],
            )
        ]
        writer = _ShardWriter()
        report, progress = IndexReport(), Progress()
        encoder, options = self.encoder, self.options
        run_files(todo, self.memo, encoder, options, writer, report, progress, self.pool, self.ocr)
        return writer.table(dict(zip(columns["path"], columns["seq"])), self.node)


def _node_name() -> str:
    """'IP/node-id prefix' of the node this actor runs on (two nodes may share an IP)."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    return f"{ray.util.get_node_ip_address()}/{node_id[:8]}"


class _ShardWriter:
    """What :func:`run_files` hands a writer, kept as rows of one shard."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._encoded: set[str] = set()

    def add(self, item: Outcome, vector: np.ndarray) -> None:
        fields = dict(item.fields or {})
        frames = fields.pop("frame_vectors", None)
        encoded = item.vector is None and item.sha256 not in self._encoded
        self._encoded.add(item.sha256)
        self.rows.append(
            _row(item.found, item.sha256, fields_to_json(fields), vector, frames, None, encoded)
        )

    def fail(self, found: FoundFile, reason: str) -> None:
        self.rows.append(_row(found, "", "{}", None, None, reason, False))

    def maybe_checkpoint(self) -> None:
        """The coordinator commits; a shard is one transaction there."""

    def table(self, seq_of: dict[str, int], node: str):
        import pyarrow as pa

        for row in self.rows:
            row["seq"], row["node"] = seq_of[row["path"]], node
        self.rows.sort(key=lambda row: row["seq"])
        return pa.Table.from_pylist(self.rows, schema=shard_schema())


def _row(found, sha256, fields, vector, frames, error, encoded) -> dict:
    def blob(array):
        return None if array is None else np.ascontiguousarray(array, np.float32).tobytes()

    return {
        "path": found.path,
        "size": found.size,
        "mtime_ns": found.mtime_ns,
        "device": _or_no_key(found.device),
        "inode": _or_no_key(found.inode),
        "real_path": found.real_path,
        "sha256": sha256,
        "fields": fields,
        "vector": blob(vector),
        "frames": blob(frames),
        "error": error,
        "encoded": encoded,
    }


def _key(value: int) -> int | None:
    return None if value == NO_KEY else value


def _or_no_key(value: int | None) -> int:
    return NO_KEY if value is None else value


# -- shards ------------------------------------------------------------------------------------
def shard_schema():
    """The columns of a shard (Parquet on disk, Arrow in flight)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("seq", pa.int64()),  # the file's place in the run's work list
            ("path", pa.string()),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("device", pa.int64()),
            ("inode", pa.int64()),
            ("real_path", pa.string()),
            ("sha256", pa.string()),
            ("fields", pa.string()),  # the catalog's metadata, JSON
            ("vector", pa.binary()),  # float32[dim]; null for a failure
            ("frames", pa.binary()),  # a video's frame vectors, float32[n * dim]
            ("error", pa.string()),  # the failure reason, or null
            ("encoded", pa.bool_()),  # encoded by the model (not a copy of another file)
            ("node", pa.string()),
        ]
    )


def _todo_table(files: Sequence[FoundFile], start: int):
    """One shard's work list as an Arrow table (one Ray Data block)."""
    import pyarrow as pa

    return pa.table(
        {
            "seq": pa.array(range(start, start + len(files)), pa.int64()),
            "path": pa.array([f.path for f in files], pa.string()),
            "size": pa.array([f.size for f in files], pa.int64()),
            "mtime_ns": pa.array([f.mtime_ns for f in files], pa.int64()),
            "device": pa.array([_or_no_key(f.device) for f in files], pa.int64()),
            "inode": pa.array([_or_no_key(f.inode) for f in files], pa.int64()),
            "real_path": pa.array([f.real_path for f in files], pa.string()),
        }
    )


def write_shard(path: Path, table) -> None:
    """Write one shard atomically (a temporary file and a rename): a reader or a crash sees
    the whole shard or none of it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table.cast(shard_schema()), sink)
    write_atomic(path, sink.getvalue().to_pybytes())


def read_shards(folder: Path) -> list[list[dict]]:
    """The rows of every complete shard in ``folder``, oldest first (unreadable ones skipped:
    their files are simply encoded again)."""
    import pyarrow.parquet as pq

    found = []
    for path in sorted(folder.glob(f"*{SHARD_SUFFIX}")) if folder.is_dir() else []:
        try:
            found.append(shard_rows(pq.read_table(path)))
        except (OSError, ValueError) as exc:
            logging.getLogger("clipdex").warning("skipping unreadable shard %s: %s", path, exc)
    return found


def shard_rows(table) -> list[dict]:
    return table.to_pylist()


def clear_shards(folder: Path) -> None:
    """Delete the shards of a completed run (and temporary files of a killed one)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        path.unlink(missing_ok=True)
    folder.rmdir()


def commit_leftover_shards(folder: Path, todo: list[FoundFile], sink: Committer) -> list[FoundFile]:
    """Commit the rows an interrupted run left in shards whose files are still as they were
    (same path, size, mtime and identity); return the files still to do."""
    pending = {found.path: found for found in todo}
    for rows in read_shards(folder):
        usable = [row for row in rows if _still_matches(row, pending.get(row["path"]))]
        for row in usable:
            del pending[row["path"]]
        if usable:
            sink.report.resumed += len(usable)
            sink.commit(usable, resumed=True)
    return [found for found in todo if found.path in pending]


def _still_matches(row: dict, found: FoundFile | None) -> bool:
    if found is None or (row["size"], row["mtime_ns"]) != (found.size, found.mtime_ns):
        return False
    known = row["inode"] != NO_KEY and found.inode is not None
    return not known or (row["device"], row["inode"]) == (found.device, found.inode)


@dataclass
class Committer:
    """Shard rows into the library through the local pipeline's writer, counted in the
    report and shown on the progress bar."""

    writer: _Writer
    report: IndexReport
    progress: Progress
    # (seq of the cluster's file it goes before, item): known contents, in discovery order
    known: list[tuple[int, Outcome]] = field(default_factory=list)

    def commit(self, rows: list[dict], *, resumed: bool = False) -> None:
        """One shard's rows in ONE checkpoint (catalog transaction, then the index); the
        known files due before each row are written before it (not for a resumed shard:
        its rows are from another run's work list)."""
        for row in sorted(rows, key=lambda row: row["seq"]):
            if not resumed:
                self.write_known_until(row["seq"])
            found = FoundFile(
                row["path"],
                row["size"],
                row["mtime_ns"],
                _key(row["device"]),
                _key(row["inode"]),
                row["real_path"],
            )
            if row["error"] is not None:
                self._fail(found, row["error"])
            else:
                self._add(found, row, resumed)
            if not resumed:
                nodes = self.report.nodes
                if nodes is not None:
                    nodes[row["node"]] = nodes.get(row["node"], 0) + 1
            self.progress.advance()
        self.writer.checkpoint()

    def write_known_until(self, seq: int | None) -> None:
        """Write the known files due before the cluster's file ``seq`` (None: all left)."""
        while self.known and (seq is None or self.known[0][0] <= seq):
            _, item = self.known.pop(0)
            write_known(item, self.writer, self.report, self.progress)  # or fails it

    def _fail(self, found: FoundFile, reason: str) -> None:
        self.writer.fail(found, reason)
        self.report.failures.append((found.path, reason))
        self.progress.fail(found.path, reason)

    def _add(self, found: FoundFile, row: dict, resumed: bool) -> None:
        """Encoded files count as indexed, copies of another file's content as reused;
        rows from an earlier run's shards count only as ``resumed``."""
        vector = np.frombuffer(row["vector"], np.float32)
        fields = fields_from_json(row["fields"], row["frames"], len(vector))
        self.writer.add(Outcome(found, row["sha256"], fields=fields), vector)
        if resumed:
            return
        if not row["encoded"]:
            self.report.reused += 1
            return
        self.report.indexed += 1
        frames = fields.get("frame_vectors")
        self.report.frames += len(frames) if frames is not None else 0


# -- metadata as JSON ----------------------------------------------------------------------------
_DATETIME = "$datetime"


def fields_to_json(fields: dict) -> str:
    """The catalog's fields of one file as JSON (datetimes and numpy values kept)."""

    def encode(value):
        if isinstance(value, dt.datetime):
            return {_DATETIME: value.isoformat()}
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(f"cannot store {type(value).__name__} in a shard")

    return json.dumps(fields, default=encode)


def fields_from_json(text: str, frames: bytes | None, dim: int) -> dict:
    """The inverse of :func:`fields_to_json`, with a video's frame vectors put back."""

    def decode(value: dict):
        return dt.datetime.fromisoformat(value[_DATETIME]) if _DATETIME in value else value

    fields = json.loads(text, object_hook=decode)
    if frames is not None:
        fields["frame_vectors"] = np.frombuffer(frames, np.float32).reshape(-1, dim)
    return fields
