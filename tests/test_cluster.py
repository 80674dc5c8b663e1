"""Indexing on a Ray cluster (indexer.ingest.cluster) against a local index of the same files.

The tests start their own two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``,
one CPU per node, small object stores) and skip when Ray is not installed
(``pip install 'clipdex[ray]'``). They check that a cluster run builds the same library as a
local run (same ids, vectors, failures and reasons), that a coordinator killed after its first
shard resumes from the shards without encoding them again, that an actor that dies
mid-shard, or a whole node lost mid-run, costs only its shard (every file indexed exactly
once), and that an ivf index built by Ray tasks is the one a local build makes.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, FakeEncoder

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'clipdex[ray]'")
pytest.importorskip("pyarrow")

from indexer.ingest.cluster import ClusterOptions  # noqa: E402
from indexer.ingest.pipeline import IndexOptions  # noqa: E402
from retrieval.collection import Collection, EncoderLoader  # noqa: E402

pytestmark = pytest.mark.ray
# The fault tests (a killed coordinator, a killed actor, a lost node) take ~2 minutes
# together on a 2-core machine (mostly Ray actors starting): they run in CI;
# CLIPDEX_RAY_FAULTS=0 skips them for a quick local run.
faults = pytest.mark.skipif(
    os.environ.get("CLIPDEX_RAY_FAULTS") == "0",
    reason="CLIPDEX_RAY_FAULTS=0: the Ray fault tests are skipped",
)

GOOD, BROKEN = 8, 2  # corpus files that index, and that fail with a reason


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes on this machine, one CPU each; this process is connected as a driver."""
    from ray.cluster_utils import Cluster

    small = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**small, "include_dashboard": False})
    cluster.add_node(**small)
    cluster.wait_for_nodes()
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def corpus_sample(corpus, tmp_path_factory) -> Path:
    """A few small real photos and two files the MANIFEST says must fail, in one folder."""
    good, broken = [], []
    with open(corpus / "MANIFEST.tsv", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            path = corpus / row["path"]
            if not path.is_file() or path.stat().st_size > 400_000:
                continue
            if row["expected"].startswith("should-index") and path.suffix.lower() == ".jpg":
                good.append(path)
            elif row["expected"].startswith("should-reject") and path.suffix.lower() == ".png":
                broken.append(path)
    folder = tmp_path_factory.mktemp("sample")
    for i, path in enumerate(sorted(good)[:GOOD] + sorted(broken)[:BROKEN]):
        shutil.copy(path, folder / f"{i:02d}_{path.name}")
    return folder


@pytest.fixture(scope="module")
def scenes(corpus) -> list[Path]:
    """Six corpus photos (scenes for a test video, photos beside it)."""
    folder = corpus / "photos" / "debian-mate"
    names = ("Blinds.jpg", "Dune.jpg", "GreenMeadow.jpg", "LadyBird.jpg", "Storm.jpg", "Wood.jpg")
    return [folder / name for name in names]


def library_rows(root: Path) -> tuple[dict, dict]:
    """path -> (id, sha256, width, height, format, vector) and path -> failure reason."""
    with sqlite3.connect(root / "catalog.sqlite") as db:
        images = db.execute(
            "SELECT path, id, sha256, width, height, format, vector FROM images"
        ).fetchall()
        failures = db.execute("SELECT path, error FROM failures").fetchall()
    rows = {r[0]: (*r[1:6], np.frombuffer(r[6], np.float32)) for r in images}
    return rows, dict(failures)


def test_cluster_builds_the_same_library_as_a_local_run(
    ray_cluster, corpus_sample, spread_checkpoint, model_cache, tmp_path
):
    loader = EncoderLoader(spread_checkpoint, "cpu", "onnx", model_cache)
    with Collection.open(tmp_path / "local", encoder=loader) as photos:
        local = photos.index(corpus_sample, IndexOptions(workers=1))
    cluster = ClusterOptions(ray_cluster.address, shard_size=3)
    with Collection.open(tmp_path / "ray", encoder=loader) as photos:
        remote = photos.index(corpus_sample, IndexOptions(workers=1), cluster=cluster)

    assert (remote.indexed, remote.failed) == (local.indexed, local.failed) == (GOOD, BROKEN)
    assert sum(remote.nodes.values()) == GOOD + BROKEN
    local_rows, local_failures = library_rows(tmp_path / "local")
    remote_rows, remote_failures = library_rows(tmp_path / "ray")
    assert remote_failures == local_failures and len(local_failures) == BROKEN
    assert remote_rows.keys() == local_rows.keys()
    for path, (*fields, vector) in local_rows.items():
        *remote_fields, remote_vector = remote_rows[path]
        assert remote_fields == fields, path  # same id, hash and metadata
        np.testing.assert_allclose(remote_vector, vector, atol=2e-5)


def test_a_folder_with_a_video_gets_the_same_ids_on_the_cluster(ray_cluster, scenes, tmp_path):
    """A video between photos takes its id in discovery order on both paths (locally it
    once jumped ahead of the photos waiting in the encoder's batch)."""
    from tests.videogen import write_video

    folder = tmp_path / "media"
    folder.mkdir()
    for i, scene in enumerate(scenes[:2]):
        shutil.copy(scene, folder / f"p{i}.jpg")
    write_video(folder / "p2_clip.mp4", scenes[2:4], 1.0)
    for i, scene in enumerate(scenes[4:6], start=3):
        shutil.copy(scene, folder / f"p{i}.jpg")
    options = IndexOptions(workers=1, batch_size=4)
    with Collection.open(tmp_path / "local", encoder=FakeEncoder()) as photos:
        photos.index(folder, options)
    cluster = ClusterOptions(ray_cluster.address, shard_size=2, encoder_source=FakeEncoder())
    with Collection.open(tmp_path / "ray", encoder=FakeEncoder()) as photos:
        photos.index(folder, options, cluster=cluster)
    local, _ = library_rows(tmp_path / "local")
    remote, _ = library_rows(tmp_path / "ray")
    assert {p: r[0] for p, r in remote.items()} == {p: r[0] for p, r in local.items()}
    assert len(local) == 5


def test_a_moved_photo_takes_its_vector_on_the_coordinator(ray_cluster, photo_folder, tmp_path):
    """A renamed photo is a known content: it takes its catalogued vector before the
    cluster is asked (nothing encoded), as a local run does, and is written where a local
    run writes it (in discovery order among the new files): the same ids."""
    from PIL import Image

    cluster = ClusterOptions(ray_cluster.address, shard_size=2, encoder_source=FakeEncoder())
    options = IndexOptions(workers=1)
    runs = {"local": None, "ray": cluster}
    for name, where in runs.items():
        with Collection.open(tmp_path / name, encoder=FakeEncoder()) as photos:
            photos.index(photo_folder, options, cluster=where)
    before, _ = library_rows(tmp_path / "ray")
    old, new = photo_folder / "photo_1.jpg", photo_folder / "photo_3b.jpg"
    old.rename(new)  # now between photo_3 and photo_4, after a new photo_0b
    for number, name in enumerate(("photo_0b.jpg", "photo_9.jpg")):
        Image.new("RGB", (90, 70 + number), (30, 160, 90 * number)).save(photo_folder / name)
    reports = {}
    for name, where in runs.items():
        with Collection.open(tmp_path / name, encoder=FakeEncoder()) as photos:
            reports[name] = photos.index(photo_folder, options, cluster=where)
    after, _ = library_rows(tmp_path / "ray")
    local, _ = library_rows(tmp_path / "local")
    for report in reports.values():
        assert (report.indexed, report.reused, report.failed) == (2, 1, 0)
    assert str(old) not in after and len(after) == len(before) + 2
    assert after[str(new)][1] == before[str(old)][1]  # the same content (hash)
    np.testing.assert_array_equal(after[str(new)][-1], before[str(old)][-1])
    assert {path: row[0] for path, row in after.items()} == {
        path: row[0] for path, row in local.items()
    }


def test_cluster_indexes_a_bucket_as_a_local_run_indexes_the_folder(
    ray_cluster, tmp_path, monkeypatch
):
    """s3:// on the cluster: the coordinator lists the bucket (a local S3 server, moto), the
    actors read the objects with the coordinator's settings; same library as a local run of
    the same files, with the URIs as paths."""
    from tests.s3server import BROKEN as S3_BROKEN
    from tests.s3server import PHOTOS as S3_PHOTOS
    from tests.s3server import s3_server, sample_folder

    folder = sample_folder(tmp_path / "sample", video=False)
    with s3_server() as s3:
        for name, value in s3.environ().items():
            monkeypatch.setenv(name, value)
        s3.client.create_bucket(Bucket="photos")
        s3.upload(folder, "photos", "trip")
        one = IndexOptions(workers=1)
        with Collection.open(tmp_path / "local", encoder=FakeEncoder()) as photos:
            local = photos.index(folder, one)
        cluster = ClusterOptions(ray_cluster.address, shard_size=3, encoder_source=FakeEncoder())
        with Collection.open(tmp_path / "ray", encoder=FakeEncoder()) as photos:
            remote = photos.index("s3://photos/trip", one, cluster=cluster)

    expected = (S3_PHOTOS, S3_BROKEN)
    assert (remote.indexed, remote.failed) == (local.indexed, local.failed) == expected
    local_rows, local_failures = library_rows(tmp_path / "local")
    remote_rows, remote_failures = library_rows(tmp_path / "ray")
    cut = len(str(folder))
    assert {"s3://photos/trip" + p[cut:]: e for p, e in local_failures.items()} == remote_failures
    assert {"s3://photos/trip" + p[cut:] for p in local_rows} == set(remote_rows)
    for path, (*fields, vector) in local_rows.items():
        *remote_fields, remote_vector = remote_rows["s3://photos/trip" + path[cut:]]
        assert remote_fields == fields, path  # same id, hash and metadata
        np.testing.assert_allclose(remote_vector, vector, atol=2e-5)


def cli_index(folder: Path, library: Path, address: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "retrieval.cli", "index", str(folder), "--json"]
    command += ["--library", str(library), "--cluster", address, "--shard-size", "2", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@faults
def test_a_killed_coordinator_resumes_from_its_shards(
    ray_cluster, corpus_sample, spread_checkpoint, tmp_path
):
    library = tmp_path / "library"
    args = ("--weights", str(spread_checkpoint), "--backend", "onnx", "--workers", "1")
    first = cli_index(corpus_sample, library, ray_cluster.address, *args)
    shards = library / "shards"
    deadline = time.monotonic() + 600  # a loaded 2-core machine starts Ray actors slowly
    try:
        while not any(shards.glob("*.parquet")) and first.poll() is None:
            assert time.monotonic() < deadline, "no shard was written"
            time.sleep(0.02)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    import pyarrow.parquet as pq

    in_shards = {p for f in shards.glob("*.parquet") for p in pq.read_table(f)["path"].to_pylist()}
    committed = set(library_rows(library)[0]) | set(library_rows(library)[1])
    assert in_shards, "the coordinator was killed before its first shard"

    second = cli_index(corpus_sample, library, ray_cluster.address, *args)
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, err.decode()
    report = json.loads(out)
    resumed = in_shards - committed
    assert report["resumed"] == len(resumed)  # taken from the shards, not encoded again
    assert report["unchanged"] == len({p for p in committed if p in library_rows(library)[0]})
    assert sum(report["nodes"].values()) == GOOD + BROKEN - len(committed) - len(resumed)
    rows, failures = library_rows(library)
    assert len(rows) == GOOD and len(failures) == BROKEN  # every file exactly once
    assert not shards.exists()  # a completed run leaves no shards


class DyingOnce:
    """An encoder factory whose first model call, in any actor, kills that actor's process."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __call__(self):
        return _DyingEncoder(self.flag)


class _DyingEncoder(FakeEncoder):
    def __init__(self, flag: Path) -> None:
        super().__init__()
        self.flag = flag

    def encode_images(self, batch):
        try:
            os.close(os.open(self.flag, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return super().encode_images(batch)
        os._exit(1)  # the actor dies mid-shard, as a lost worker would


@faults
def test_an_actor_killed_mid_shard_is_retried(ray_cluster, photo_folder, tmp_path):
    flag = tmp_path / "died"
    cluster = ClusterOptions(ray_cluster.address, shard_size=2, encoder_source=DyingOnce(flag))
    with Collection.open(tmp_path / "library", encoder=FakeEncoder()) as photos:
        report = photos.index(photo_folder, IndexOptions(workers=1), cluster=cluster)
    files = sorted(str(p) for p in photo_folder.rglob("*") if p.is_file())
    rows, failures = library_rows(tmp_path / "library")
    assert flag.exists()  # an actor did die
    assert sorted(rows) == files and not failures and report.indexed == len(files)


def test_shard_rows_round_trip_into_the_catalog_without_ray(fake_encoder, tmp_path):
    """A shard as an actor writes it (metadata with a datetime, caption texts, a video's
    frames, a failure) is committed from disk as if a killed run had left it; a row whose
    file changed since is not used (that file is encoded again)."""
    import datetime as dt

    from indexer.ingest import cluster as cl
    from indexer.ingest.discover import FoundFile
    from indexer.ingest.pipeline import IndexReport, Progress, _Plan, _Writer
    from indexer.ingest.workers import Outcome
    from indexer.store.library import Library

    rng = np.random.default_rng(0)
    frames = rng.standard_normal((3, 512)).astype(np.float32)
    frames /= np.linalg.norm(frames, axis=1, keepdims=True)
    taken = dt.datetime(2024, 5, 1, 12, 30)
    photo = FoundFile("/p/a.jpg", 10, 1, 5, 7, None)
    video = FoundFile("/p/b.mp4", 20, 2, 5, 8, None)
    broken = FoundFile("/p/c.png", 30, 3, None, None, None)
    changed = FoundFile("/p/d.jpg", 40, 4, 5, 9, None)
    shard = cl._ShardWriter()
    fields = {"width": 64, "height": 48, "format": "JPEG", "taken_at": taken,
              "texts": [("description", "a kite", None)]}  # fmt: skip
    shard.add(Outcome(photo, "a" * 64, fields=fields), frames[0])
    video_fields = {"width": 64, "height": 48, "kind": "video", "frame_time": 0.0,
                    "frame_times": [0.0, 1.0, 2.0], "frame_vectors": frames}  # fmt: skip
    shard.add(Outcome(video, "b" * 64, fields=video_fields), frames[0])
    shard.fail(broken, "not an image: truncated")
    shard.add(Outcome(changed, "d" * 64, fields={"width": 1, "height": 1}), frames[1])
    table = shard.table({f.path: i for i, f in enumerate([photo, video, broken, changed])}, "n")
    cl.write_shard(tmp_path / "library" / "shards" / "x-000000.parquet", table)

    now_changed = FoundFile("/p/d.jpg", 41, 5, 5, 9, None)  # rewritten since the shard
    with Library.open(tmp_path / "library", create=True) as library, library.writing():
        library.bind_model(fake_encoder.identity)
        report = IndexReport(nodes={})
        sink = cl.Committer(_Writer(library, _Plan(), IndexOptions()), report, Progress())
        todo = [photo, video, broken, now_changed]
        left = cl.commit_leftover_shards(library.shard_dir, todo, sink)
        assert left == [now_changed] and report.resumed == 3
        assert report.failures == [("/p/c.png", "not an image: truncated")]
        catalog = library.catalog
        assert catalog.count() == 2
        row_fields, vector = catalog.find_by_hash("a" * 64)
        assert row_fields["taken_at"] == taken and row_fields["format"] == "JPEG"
        np.testing.assert_array_equal(vector, frames[0])
        video_fields, _ = catalog.find_by_hash("b" * 64)
        np.testing.assert_array_equal(video_fields["frame_vectors"], frames)
        assert len(library.index) == 2 + 2  # two rows and the video's two other frames


def test_without_ray_the_error_names_the_extra(monkeypatch):
    from indexer.errors import ClusterUnavailable
    from indexer.ingest.cluster import connect

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ClusterUnavailable, match=r"pip install 'clipdex\[ray\]'") as caught:
        connect("auto")
    assert caught.value.setting == "cluster"



# -- the index built from parts on the cluster ---------------------------------------------------
def test_ray_tasks_build_the_same_ivf_index_as_one_process(ray_cluster, monkeypatch):
    """Train once here, encode each batch in a Ray task, merge: the same lists (ids in the
    same order, same codes), the same tuned nprobe and the same answers as a local build."""
    from indexer.ingest.cluster import RayParts
    from indexer.store import ivf
    from tests.clipvectors import ArraySource, ClipLike
    from tests.test_ivf_parts import BATCH, LISTS, SIZE, assert_same_index

    monkeypatch.setattr(ivf, "nlist_for", lambda count: LISTS)  # a small library, 12 lists
    generator = ClipLike(SIZE, seed=6)
    source = ArraySource(np.arange(SIZE, dtype=np.int64) * 2 + 5, generator.vectors(), BATCH)
    local = ivf.IVFIndex.build(source)
    parts = RayParts(ray)
    sharded = ivf.IVFIndex.build(source, parts=parts)
    assert parts.count == -(-SIZE // BATCH)  # every batch went through a task
    queries = np.vstack([generator.text_queries(20, seed=3), generator.image_queries(20, seed=4)])
    assert_same_index(local, sharded, queries)


def test_a_cluster_run_builds_its_ivf_index_on_the_cluster(ray_cluster, photo_folder, tmp_path):
    """`--index ivf` on a cluster run: the build's batches go to Ray tasks (index_parts),
    and the base is the one a local compaction of the same catalog makes."""
    from indexer.store.library import Library
    from tests.test_ivf_parts import assert_same_index

    cluster = ClusterOptions(ray_cluster.address, shard_size=2)
    with Collection.open(tmp_path / "library", encoder=FakeEncoder()) as photos:
        options = IndexOptions(workers=1, index_kind="ivf")
        report = photos.index(photo_folder, options, cluster=cluster)
    assert report.index_rebuilt == "ivf" and report.as_dict()["index_parts"] == 1
    with Library.open(tmp_path / "library") as library, library.writing():
        on_cluster = library.index.base.in_memory()
        assert on_cluster.kind == "ivf" and len(on_cluster) == 6
        _, queries = library.catalog.vectors(library.catalog.ids()[:3])
        library.compact("ivf")  # the same catalog, built here
        assert_same_index(on_cluster, library.index.base, queries)


FILES_FOR_NODE_LOSS = 40


class SlowEncoder(FakeEncoder):
    """A fake model that takes its time, so every actor is mid-shard when a node goes; it
    leaves a file named after its node when it starts a batch there."""

    def __init__(self, marks: Path) -> None:
        super().__init__()
        self.marks = marks

    def encode_images(self, batch):
        node = ray.get_runtime_context().get_node_id()
        (self.marks / node).touch()
        time.sleep(0.4)
        return super().encode_images(batch)


class _NodeKiller:
    """A progress receiver that removes a Ray node (its raylet and workers are killed) at
    the first committed shard, once the node's actor has started encoding one: the run is
    midway and that actor mid-shard (Ray Data goes on feeding actors meanwhile)."""

    def __init__(self, cluster, node, marks: Path) -> None:
        self.cluster, self.node, self.marks, self.killed = cluster, node, marks, False

    def start(self, total: int) -> None:
        pass

    def fail(self, path: str, reason: str) -> None:
        pass

    def advance(self, count: int = 1) -> None:
        if self.killed:
            return
        deadline = time.monotonic() + 300  # a loaded 2-core machine starts actors slowly
        while not (self.marks / self.node.node_id).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.killed = True
        self.cluster.remove_node(self.node, allow_graceful=False)


@faults
def test_a_node_lost_mid_run_costs_only_its_shard(ray_cluster, tmp_path):
    """A worker node killed while its actor encodes a shard: Ray runs the shard again
    elsewhere and the run completes with every file exactly once."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(FILES_FOR_NODE_LOSS):
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        Image.new("RGB", (64 + i, 48), colour).save(folder / f"p{i:02d}.jpg")
    node = ray_cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    ray_cluster.wait_for_nodes()
    marks = tmp_path / "marks"
    marks.mkdir()
    killer = _NodeKiller(ray_cluster, node, marks)
    slow = SlowEncoder(marks)
    cluster = ClusterOptions(ray_cluster.address, shard_size=2, encoder_source=slow)
    with Collection.open(tmp_path / "library", encoder=FakeEncoder()) as photos:
        report = photos.index(folder, IndexOptions(workers=1), killer, cluster)
    assert killer.killed
    assert (marks / node.node_id).exists()  # the lost node was encoding when it went
    rows, failures = library_rows(tmp_path / "library")
    files = sorted(str(p) for p in folder.iterdir())
    assert sorted(rows) == files and not failures
    assert report.indexed == len(files) == sum(report.nodes.values())
    ids = [row[0] for row in rows.values()]
    assert len(set(ids)) == len(ids) == FILES_FOR_NODE_LOSS  # each file once


def test_compactions_during_a_cluster_run_build_on_the_cluster(
    ray_cluster, photo_folder, tmp_path, monkeypatch
):
    """A compaction due at a shard's checkpoint that trains the ivf base again (here every
    one: a compaction that is not due for re-training folds the delta into the base, with
    no build) has its batches encoded by Ray tasks while the encoding actors still hold
    their CPUs: no wait on each other."""
    from PIL import Image

    from indexer.store import library as library_module
    from indexer.store import segments

    with Collection.open(tmp_path / "library", encoder=FakeEncoder()) as photos:
        photos.index(photo_folder, IndexOptions(workers=1, index_kind="ivf"))
    more = tmp_path / "more"
    more.mkdir()
    for i in range(6):
        Image.new("RGB", (80 + i, 60), (40 * i, 200 - 30 * i, 90)).save(more / f"n{i}.jpg")
    monkeypatch.setattr(segments, "COMPACT_MIN", 1)  # every checkpoint compacts
    monkeypatch.setattr(library_module, "needs_retraining", lambda facts, count: True)
    cluster = ClusterOptions(ray_cluster.address, shard_size=2)
    with Collection.open(tmp_path / "library", encoder=FakeEncoder()) as photos:
        report = photos.index(more, IndexOptions(workers=1), cluster=cluster)
        assert report.indexed == 6 and report.index_parts == 3  # one build per shard
    rows, _ = library_rows(tmp_path / "library")
    assert len(rows) == 12
    from indexer.store.library import Library

    with Library.open(tmp_path / "library", read_only=True) as library:
        assert library.index.kind == "ivf" and len(library.index.base) == 12
        assert library.index.manifest.rows == 0  # the last shard's compaction holds all
