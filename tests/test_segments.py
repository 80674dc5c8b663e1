"""The index in segments: checkpoints append what changed, compaction folds it into a base.

Search over base + delta - tombstones is exact (top-k, range, allowed ids) and agrees with
a brute-force scan of the live vectors; checkpoints write only what changed; compaction is
automatic past a threshold and asked for by `clipdex optimize`; readers during compaction
see exactly one checkpoint; a writer killed mid-compaction leaves a library that opens
whole; renamed and deleted photos leave no stale vector behind.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from indexer.ingest.pipeline import IndexOptions, index_paths
from indexer.model.identity import l2_normalise
from indexer.store import segments
from indexer.store.catalog import ImageRecord
from indexer.store.library import Library, index_problem
from indexer.store.segments import read_manifest
from indexer.store.vectors import VectorIndex
from tests.clirun import cli_env, optimize
from tests.records import random_records, store


def _remove(library: Library, ids) -> None:
    library.catalog.delete_ids(list(ids))
    library.index.remove(np.asarray(ids))
    library.checkpoint()


def _brute(library: Library) -> tuple[np.ndarray, np.ndarray]:
    """The live (ids, vectors) according to the catalog: what the index must answer over."""
    return library.catalog.vectors(library.catalog.ids())


@pytest.fixture
def mixed(tmp_path):
    """A library with a base (compacted), then additions and removals on top of it, some of
    the removals hitting the base and some the delta."""
    root = tmp_path / "lib"
    library = Library.open(root, create=True)
    base_ids = store(library, random_records(60))
    library.compact()
    delta_ids = store(library, random_records(25, start=100))
    _remove(library, base_ids[::7] + delta_ids[::5])
    yield library
    library.close()


def _check_exact(library: Library, rng) -> None:
    ids, vectors = _brute(library)
    assert sorted(library.index.ids()) == sorted(ids) and len(library.index) == len(ids)
    queries = l2_normalise(rng.standard_normal((4, 512))).astype(np.float32)
    queries[0] = vectors[3]  # a stored vector finds itself first
    truth = queries @ vectors.T
    scores, found = library.index.search(queries, 10)
    for row in range(len(queries)):
        order = np.argsort(-truth[row])[:10]
        assert list(found[row]) == list(ids[order])
        np.testing.assert_allclose(scores[row], truth[row][order], atol=1e-5)
    allowed = ids[::3]
    scores, found = library.index.search(queries, 5, allowed)
    sub = queries @ vectors[::3].T
    for row in range(len(queries)):
        assert list(found[row]) == list(allowed[np.argsort(-sub[row])[:5]])
    lims, scores, hits = library.index.range_search(queries, 0.05)
    for row in range(len(queries)):
        got = sorted(hits[lims[row] : lims[row + 1]])
        assert got == sorted(ids[truth[row] > 0.05])
    lims, _, hits = library.index.range_search(queries, -np.inf, allowed)
    assert all(sorted(hits[lims[r] : lims[r + 1]]) == sorted(allowed) for r in range(4))


def test_search_over_base_delta_and_tombstones_is_exact(mixed):
    manifest = read_manifest(mixed.root)
    assert manifest.base is not None and manifest.rows == 25 and manifest.deleted > 0
    _check_exact(mixed, np.random.default_rng(1))
    root = mixed.root
    mixed.close()
    with Library.open(root, read_only=True) as reopened:  # the same, read back from disk
        _check_exact(reopened, np.random.default_rng(2))
    with Library.open(root) as writer:
        writer.compact()
        _check_exact(writer, np.random.default_rng(3))
        assert read_manifest(root).rows == 0


def test_a_checkpoint_writes_what_changed_and_a_noop_run_writes_nothing(tmp_path, fake_encoder):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (40, 30), (i * 40, 10, 200 - i * 30)).save(folder / f"{i}.png")
    root = tmp_path / "lib"
    with Library.open(root, create=True) as library:
        index_paths(library, fake_encoder, [folder], IndexOptions(workers=1))
        library.compact()
    base = next(root.glob("vectors.*.faiss"))
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.iterdir()}
    with Library.open(root) as library:
        index_paths(library, fake_encoder, [folder], IndexOptions(workers=1))
        generation = library.catalog.generation()
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in root.iterdir()}
    index_files = [n for n in before if n.startswith(("vectors", "delta", "segments"))]
    assert {n: after[n] for n in index_files} == {n: before[n] for n in index_files}
    Image.new("RGB", (40, 30), (1, 2, 3)).save(folder / "new.png")
    with Library.open(root) as library:
        index_paths(library, fake_encoder, [folder], IndexOptions(workers=1))
        assert library.catalog.generation() > generation
    assert base.stat().st_mtime_ns == before[base.name][0]  # the base is not rewritten
    assert (root / "delta.{}.vec".format(base.name.split(".")[1])).stat().st_size == 8 + 2048


def test_compaction_is_automatic_past_the_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(segments, "COMPACT_MIN", 10)
    root = tmp_path / "lib"
    with Library.open(root, create=True) as library:
        store(library, random_records(6))
        assert read_manifest(root).base is None  # below the threshold: delta only
        store(library, random_records(6, start=10))  # 12 >= 10: folded into a base
        manifest = read_manifest(root)
        assert manifest.base is not None and manifest.rows == 0
        assert len(library.index) == 12 and len(library.index.base) == 12


def test_a_kind_that_wants_rebuilding_is_compacted(tmp_path, monkeypatch):
    """The retrain hook: a base kind says when it has grown too far past its training."""
    seen = []

    def wants_rebuild(self, live: int) -> bool:
        seen.append(live)
        return live > 2 * len(self)

    monkeypatch.setattr(VectorIndex, "wants_rebuild", wants_rebuild, raising=False)
    root = tmp_path / "lib"
    with Library.open(root, create=True) as library:
        store(library, random_records(4))  # empty base: 4 > 0, rebuilt at once
        assert len(library.index.base) == 4
        store(library, random_records(4, start=10))  # 8 > 8? no: stays in the delta
        assert len(library.index.base) == 4 and read_manifest(root).rows == 4
        store(library, random_records(1, start=20))  # 9 > 8: rebuilt
        assert len(library.index.base) == 9
    assert seen


def test_optimize_command_folds_the_delta(tmp_path):
    root = tmp_path / "lib"
    with Library.open(root, create=True) as library:
        ids = store(library, random_records(8))
        _remove(library, ids[:3])
    output = optimize(root)
    assert '"photos": 5' in output and '"folded_removals": 3' in output
    manifest = read_manifest(root)
    assert manifest.rows == manifest.deleted == 0 and manifest.base is not None
    assert index_problem(root) is None


def test_renamed_and_deleted_photos_leave_no_stale_vector(tmp_path, fake_encoder):
    """A renamed file gets a new id and its vector moves with it (reused by hash, not
    encoded again); the old id is tombstoned; a deleted file's id is tombstoned too."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        Image.new("RGB", (40, 30), (i * 50, 100, 30)).save(folder / f"{i}.png")
    root = tmp_path / "lib"
    with Library.open(root, create=True) as library:
        index_paths(library, fake_encoder, [folder], IndexOptions(workers=1))
        library.compact()  # the originals live in the base: tombstones must hide them there
        old_id = library.catalog.id_for_path(str(folder / "0.png"))
        gone_id = library.catalog.id_for_path(str(folder / "1.png"))
        vector = library.index.reconstruct(old_id)
    (folder / "0.png").rename(folder / "renamed.png")
    (folder / "1.png").unlink()
    with Library.open(root) as library:
        report = index_paths(library, fake_encoder, [folder], IndexOptions(workers=1))
        assert report.reused == 1 and report.indexed == 0 and report.removed == 2
    for _ in range(2):  # as read back from disk, then after a compaction
        with Library.open(root, read_only=True) as library:
            new_id = library.catalog.id_for_path(str(folder / "renamed.png"))
            assert new_id != old_id and old_id not in set(library.index.ids())
            assert gone_id not in set(library.index.ids()) and len(library.index) == 4
            np.testing.assert_allclose(library.index.reconstruct(new_id), vector, atol=1e-6)
            _, found = library.index.search(vector[None], 4)
            assert found[0][0] == new_id and old_id not in found[0] and gone_id not in found[0]
        with Library.open(root) as library:
            library.compact()


def test_readers_during_compaction_see_exactly_one_checkpoint(tmp_path, monkeypatch):
    """A writer adds, removes and compacts (a compaction every third checkpoint) while
    readers in threads open the library and refresh it: every view they get is exactly
    the set of ids of one checkpoint, never a mix of two."""
    monkeypatch.setattr(segments, "COMPACT_MIN", 10**9)
    root = tmp_path / "lib"
    writer = Library.open(root, create=True)
    states: dict[int, frozenset] = {}
    stop = threading.Event()
    problems: list[str] = []
    views = [0]

    def check(library: Library) -> None:
        generation = library.index_generation
        seen = frozenset(int(i) for i in library.index.ids())
        expected = states.get(generation)
        if expected is not None and seen != expected:
            problems.append(f"generation {generation}: {len(seen)} ids, not {len(expected)}")
        views[0] += 1

    def reader() -> None:
        while not stop.is_set():
            try:
                with Library.open(root, read_only=True) as library:
                    check(library)
                    for _ in range(3):
                        library.refresh()
                        check(library)
            except Exception as exc:
                problems.append(repr(exc))

    ids = store(writer, random_records(5))
    states[writer.index_generation] = frozenset(ids)
    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    live = set(ids)
    try:
        for step in range(30):
            added = _commit(writer, random_records(3, start=1000 + 10 * step))
            live |= set(added)
            dropped = sorted(live)[::4][:2]
            writer.catalog.delete_ids(dropped)
            writer.index.remove(np.asarray(dropped))
            live -= set(dropped)
            states[writer.catalog.generation()] = frozenset(live)
            if step % 3 == 2:
                writer.compact()
                states[writer.index_generation] = frozenset(live)
            else:
                writer.checkpoint()
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        writer.close()
    assert not problems, problems[:3]
    assert views[0] > 30


def _commit(library: Library, records: list[ImageRecord]) -> list[int]:
    ids = library.catalog.commit_batch(records)
    library.index.add(np.asarray(ids), np.vstack([r.vector for r in records]))
    return ids


COMPACTING_WRITER = r"""
import sys, numpy as np
from indexer.store.catalog import ImageRecord
from indexer.store.library import Library
root = sys.argv[1]
rng = np.random.default_rng(int(sys.argv[2]))
with Library.open(root, create=True) as lib:
    lib.acquire_lock()
    for step in range(10**6):
        v = rng.standard_normal((50, 512)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        recs = [ImageRecord(f"/k/{sys.argv[2]}-{step}-{i}", 1, 1, f"{step}-{i}", v[i], 8, 8)
                for i in range(50)]
        ids = lib.catalog.commit_batch(recs)
        lib.index.add(np.asarray(ids), v)
        lib.checkpoint()
        lib.compact()
        print(step, flush=True)
"""


def test_kill_during_compaction_leaves_a_whole_library(tmp_path):
    """SIGKILL a writer that compacts after every checkpoint, at random moments (half of
    them while a new base file is being written): the library opens with every committed
    photo exactly once, and the next writer clears the litter."""
    root = tmp_path / "lib"
    rng = random.Random(7)
    mid_write = 0
    for kill in range(8):
        writer = subprocess.Popen(
            [sys.executable, "-c", COMPACTING_WRITER, str(root), str(kill)],
            env=cli_env(),
            stdout=subprocess.PIPE,
        )
        writer.stdout.readline()  # one whole step done: the library exists
        deadline = time.monotonic() + rng.uniform(0.05, 1.0)
        while time.monotonic() < deadline:
            if kill % 2 and any(p.name.endswith(".tmp") for p in root.iterdir()):
                mid_write += 1
                break
            time.sleep(0.002)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        with Library.open(root) as library:
            ids = library.catalog.ids()
            assert sorted(library.index.ids()) == sorted(ids)
            assert len(library.index) == len(ids) == len(set(library.index.ids()))
    with Library.open(root) as library:
        library.acquire_lock()
        library.checkpoint()
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]
    assert index_problem(root) is None
    assert mid_write >= 1, "no kill landed during a base write"


def test_a_library_from_before_segments_opens_and_carries_on(tmp_path):
    """An older clipdex left one stamped vectors.N.faiss and no manifest: it is the base."""
    root = tmp_path / "lib"
    with Library.open(root, create=True) as library:
        ids = store(library, random_records(5))
        library.compact()
    (root / "segments.json").unlink()
    with Library.open(root) as library:
        assert sorted(library.index.ids()) == sorted(ids)
        more = store(library, random_records(2, start=50))
    with Library.open(root, read_only=True) as library:
        assert sorted(library.index.ids()) == sorted(ids + more)
    assert os.path.exists(root / "segments.json")


def _ivf_library_with_changes(root):
    """An ivf base of 2,900 CLIP-like photos, then 100 near-copies of its first photos in the
    delta and 60 deletions (50 from the base, 10 from the delta), checkpointed."""
    from tests.clipvectors import ClipLike

    vectors = ClipLike(3_000, seed=5).vectors()
    library = Library.open(root, create=True)
    records = [
        ImageRecord(f"/p/{i}.jpg", 1, 1, f"{i:064x}", vectors[i], 8, 8) for i in range(2_900)
    ]
    base_ids = library.catalog.commit_batch(records)
    library.compact("ivf")
    copy = vectors[:100].copy()
    copy[:, :8] += 0.01
    copy /= np.linalg.norm(copy, axis=1, keepdims=True)
    added = _commit(
        library, [ImageRecord(f"/q/{i}.jpg", 1, 1, f"q{i:063x}", copy[i], 8, 8) for i in range(100)]
    )
    dead = base_ids[:50] + added[50:60]
    library.catalog.delete_ids(dead)
    library.index.remove(np.asarray(dead))
    library.checkpoint()
    return SimpleNamespace(
        library=library, vectors=vectors, copy=copy, added=added, dead=dead, base_ids=base_ids
    )


def test_an_ivf_base_under_delta_and_tombstones(tmp_path):
    """The approximate kind as the base: tombstoned ids never come back, delta vectors are
    found, range search and near pairs cover base + delta - tombstones exactly."""
    root = tmp_path / "lib"
    made = _ivf_library_with_changes(root)
    copy, added, dead, base_ids, vectors = (
        made.copy,
        made.added,
        made.dead,
        made.base_ids,
        made.vectors,
    )
    made.library.close()
    with Library.open(root, read_only=True) as reader:
        assert len(reader.index) == 2_900 + 100 - 60
        _, found = reader.index.search(copy[60:70], 1)
        assert list(found[:, 0]) == added[60:70]  # a delta vector finds itself first
        _, found = reader.index.search(vectors[:50], 10)
        assert not set(found.ravel().tolist()) & set(dead)
        _, _, hits = reader.index.range_search(copy[:100], 0.95)
        assert not set(hits.tolist()) & set(dead)
        a, b, _ = reader.index.near_pairs(0.95)
        pairs = {frozenset(p) for p in zip(a.tolist(), b.tolist())}
        live = [(base_ids[i], added[i]) for i in range(50, 100) if added[i] not in dead]
        assert {frozenset(p) for p in live} <= pairs  # every live photo with its copy
        assert not {i for p in pairs for i in p} & set(dead)


def test_an_ivf_base_folds_its_delta_without_training_again(tmp_path, monkeypatch):
    """A compaction of an ivf base encodes the delta against the trained centroids (its cost
    follows the change): same centroids, same build report, the live photos exactly."""
    from indexer.store import ivf

    root = tmp_path / "lib"
    made = _ivf_library_with_changes(root)
    library, copy, added, dead = made.library, made.copy, made.added, made.dead
    before = library.index.base
    centroids, params = ivf._centroids(before.index).copy(), dict(before.params)

    def no_training(*args, **kwargs):
        raise AssertionError("a fold trains nothing")

    monkeypatch.setattr(ivf.IVFIndex, "build", no_training)
    monkeypatch.setattr(ivf.IVFIndex, "train", no_training)
    assert library.compact() == 2_900 + 100 - 60
    library.close()
    with Library.open(root, read_only=True) as reader:
        base = reader.index.base
        assert read_manifest(root).rows == 0 and base.kind == "ivf"
        assert np.array_equal(ivf._centroids(base.index), centroids)
        assert base.params == params
        assert sorted(base.ids().tolist()) == sorted(reader.catalog.ids().tolist())
        assert not set(base.ids().tolist()) & set(dead)
        _, found = reader.index.search(copy[60:70], 1)
        assert list(found[:, 0]) == added[60:70]  # folded delta vectors find themselves


def test_an_ivf_base_due_for_retraining_or_optimized_is_built_again(tmp_path, monkeypatch):
    """Past the growth that calls for new centroids, and under `clipdex optimize` (retrain),
    a compaction trains again from the catalog."""
    from indexer.store import ivf, kindchoice

    root = tmp_path / "lib"
    library = _ivf_library_with_changes(root).library
    builds = []
    real_build = ivf.IVFIndex.build.__func__

    def counted(cls, *args, **kwargs):
        builds.append(1)
        return real_build(cls, *args, **kwargs)

    monkeypatch.setattr(ivf.IVFIndex, "build", classmethod(counted))
    library.compact()
    assert builds == []  # folded
    library.compact(retrain=True)
    assert builds == [1]
    monkeypatch.setattr(kindchoice, "RETRAIN_GROWTH", 0.5)  # 2,940 live > 0.5 x 2,940
    library.compact()
    assert builds == [1, 1]
    library.close()


def test_info_reads_no_vector(tmp_path):
    """`clipdex info`'s index facts come from the manifest and the stamp: the index is not
    loaded for them, and they agree with the loaded index's own."""
    root = tmp_path / "lib"
    with Library.open(root, create=True) as library:
        ids = store(library, random_records(6))
        library.compact()
        store(library, random_records(3, start=20))
        _remove(library, ids[:2])
    with Library.open(root, read_only=True) as library:
        facts = library.index_summary()
        assert library._index is None  # nothing was read for them
        assert facts == {"kind": "exact", "count": 7, "delta": 3, "tombstones": 2}
        assert facts["count"] == len(library.index)
