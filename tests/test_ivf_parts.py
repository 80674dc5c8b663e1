"""An ivf index built from parts (train once, encode batches elsewhere, merge the lists) is
the index a one-process build makes, and a coordinator killed mid-build leaves the library's
previous index whole. The parts are encoded in this process here (``serial_parts``);
tests/test_cluster.py has Ray's tasks encode them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pytest

from indexer.model.identity import ModelIdentity
from indexer.store import ivf
from indexer.store.catalog import ImageRecord
from indexer.store.ivf import IVFIndex, serial_parts
from indexer.store.library import Library
from tests.clipvectors import ArraySource, ClipLike
from tests.conftest import REPO

SIZE, LISTS, BATCH = 3_000, 12, 700  # several batches, several lists, uneven last batch


def list_contents(store: IVFIndex) -> list[tuple[list[int], bytes]]:
    """Per list: its ids in order and its codes' bytes."""
    index, out = store.index, []
    for number in range(index.nlist):
        size = index.invlists.list_size(number)
        ids = faiss.rev_swig_ptr(index.invlists.get_ids(number), size).tolist() if size else []
        codes = index.invlists.get_codes(number)
        out.append((ids, bytes(faiss.rev_swig_ptr(codes, size * index.code_size)) if size else b""))
    return out


def assert_same_index(one: IVFIndex, other: IVFIndex, queries: np.ndarray) -> None:
    """Same lists (ids in the same order, same codes), same build report, same answers."""
    assert list_contents(one) == list_contents(other)
    assert one.params == other.params
    assert len(one) == len(other)
    for k in (1, 10):
        np.testing.assert_array_equal(one.search(queries, k)[1], other.search(queries, k)[1])
        np.testing.assert_array_equal(one.search(queries, k)[0], other.search(queries, k)[0])


@pytest.fixture
def few_lists(monkeypatch):
    """A small library with several lists (a real one gets ~sqrt(n), one below 2000)."""
    monkeypatch.setattr(ivf, "nlist_for", lambda count: LISTS)


def test_an_index_built_from_parts_is_the_one_process_build(few_lists):
    generator = ClipLike(SIZE, seed=5)
    ids = np.arange(SIZE, dtype=np.int64) * 3 + 2
    source = ArraySource(ids, generator.vectors(), batch=BATCH)  # several parts
    whole = IVFIndex.build(source)
    seen = []

    def counting(job, batches):
        for part in serial_parts(job, batches):
            seen.append(part.count)
            yield part

    merged = IVFIndex.build(source, parts=counting)
    assert seen == [BATCH] * (SIZE // BATCH) + [SIZE % BATCH]  # one part per batch
    assert whole.nlist == LISTS and 1 <= whole.nprobe <= LISTS
    queries = np.vstack([generator.text_queries(20, seed=7), generator.image_queries(20, seed=8)])
    assert_same_index(whole, merged, queries)


def test_compaction_uses_the_library_s_part_encoder(few_lists, tmp_path):
    """Library.compact hands the batches to ``part_encoder`` when one is set (a cluster
    run's tasks) and installs the same base as a compaction without it."""
    vectors = ClipLike(SIZE, seed=9).vectors()
    results = {}
    for name in ("here", "parts"):
        with _library(tmp_path / name, vectors) as library:
            calls = []
            if name == "parts":

                def recorded(job, batches, calls=calls):
                    calls.append(job)
                    yield from serial_parts(job, batches)

                library.part_encoder = recorded
            library.compact("ivf")
            assert library.index.kind == "ivf"
            assert len(calls) == (name == "parts")
            results[name] = library.index.base
    queries = ClipLike(SIZE, seed=9).text_queries(10, seed=1)
    assert_same_index(results["here"], results["parts"], queries)


def _library(root, vectors) -> Library:
    library = Library.open(root, create=True)
    library.acquire_lock()
    library.bind_model(ModelIdentity(weights="fake"))
    records = [
        ImageRecord(f"/p/{i}.jpg", 1, 1, f"{i:064x}", vectors[i], 64, 48)
        for i in range(len(vectors))
    ]
    ids = np.asarray(library.catalog.commit_batch(records), np.int64)
    library.index.add(ids, vectors)
    library.checkpoint()
    return library


KILLED_MID_BUILD = """
import os, signal, sys
from indexer.store import ivf
from indexer.store.ivf import serial_parts
from indexer.store.library import Library

ivf.nlist_for = lambda count: {lists}

def small(batches):  # the catalog's batches in pieces: several parts to merge
    for ids, vectors in batches:
        for start in range(0, len(ids), 500):
            yield ids[start : start + 500], vectors[start : start + 500]

def dying(job, batches):
    for number, part in enumerate(serial_parts(job, small(batches))):
        if number == 2:  # two parts merged: the coordinator dies mid-build
            os.kill(os.getpid(), signal.SIGKILL)
        yield part

with Library.open(sys.argv[1]) as library, library.writing():
    library.part_encoder = dying
    library.compact("ivf")
"""


def test_a_coordinator_killed_mid_build_leaves_the_previous_index(few_lists, tmp_path):
    vectors = ClipLike(SIZE, seed=4).vectors()
    root = tmp_path / "library"
    with _library(root, vectors) as library:
        query = vectors[17:18]
        before = library.index.search(query, 10)
        kind, files = library.index.kind, sorted(p.name for p in root.iterdir())
    script = textwrap.dedent(KILLED_MID_BUILD.format(lists=LISTS))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", script, str(root)], env=env, timeout=300)
    assert run.returncode == -signal.SIGKILL
    with Library.open(root, read_only=True) as library:
        assert library.index.kind == kind == "exact"  # the previous base, still whole
        assert len(library.index) == SIZE
        after = library.index.search(query, 10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0])
    left = sorted(p.name for p in root.iterdir())
    assert [name for name in left if name not in files] == []  # the build wrote no file yet
    with Library.open(root) as library, library.writing():
        library.compact("ivf")  # the next build completes from the catalog
        assert library.index.kind == "ivf" and len(library.index) == SIZE
