"""The background sample file: a fixed random sample of the library's vectors beside the base.

The cut-off and the fusion's calibration read it instead of thousands of random catalog
rows (indexer/store/background.py). Checked here: it is written by a compaction, holds
exactly the live photos whose id hashes below its rate (through adds, deletes, reopening
and compaction), its prefixes are nested samples, its vectors are the catalog's (float16),
and a missing, damaged, truncated or foreign file is never used: the query side falls back
to reading the catalog and the cut-off still comes out.
"""

from __future__ import annotations

import numpy as np
import pytest

from indexer.model.identity import l2_normalise
from indexer.store import background
from indexer.store.background import sample_hash, sample_path
from indexer.store.library import Library
from indexer.store.segments import read_manifest
from retrieval.search.cutoff import auto_cutoff, background_scores
from tests.records import random_records, store

SAMPLE = 300  # the test's sample size (the product's is 20,000)
N = 3000


def _catalog_copy(library: Library, ids: np.ndarray) -> np.ndarray:
    """The catalog's vectors of ``ids``, in that order."""
    found, vectors = library.catalog.vectors(ids.tolist())
    row = {i: at for at, i in enumerate(found.tolist())}
    return vectors[[row[i] for i in ids.tolist()]]


def _expected(library: Library, rate: float) -> set[int]:
    """The live ids the sample must hold: those hashing below the rate."""
    ids = library.catalog.ids()
    return set(ids[sample_hash(ids) < rate].tolist())


@pytest.fixture
def built(tmp_path, monkeypatch):
    monkeypatch.setattr(background, "SAMPLE", SAMPLE)
    root = tmp_path / "library"
    with Library.open(root, create=True) as library:
        library.acquire_lock()
        store(library, random_records(N))
        library.compact()
    return root


def _sample_file(root) -> object:
    return sample_path(root / read_manifest(root).base)


def test_compaction_writes_a_sample_of_the_live_photos(built):
    rate = SAMPLE / N
    assert _sample_file(built).exists()
    with Library.open(built, read_only=True) as library:
        ids, vectors = library.index.background(10 * SAMPLE)
        assert set(ids.tolist()) == _expected(library, rate)
        assert 0.7 * SAMPLE < len(ids) < 1.3 * SAMPLE
        exact = _catalog_copy(library, ids)
        assert vectors.dtype == np.float32 and np.abs(vectors - exact).max() < 2e-3


def test_prefixes_are_nested_uniform_samples(built):
    with Library.open(built, read_only=True) as library:
        small_ids, _ = library.index.background(50)
        all_ids, _ = library.index.background(10 * SAMPLE)
        assert len(small_ids) == 50 and set(small_ids.tolist()) <= set(all_ids.tolist())
        bound = sample_hash(small_ids).max()
        below = all_ids[sample_hash(all_ids) <= bound]
        assert set(below.tolist()) == set(small_ids.tolist())  # the lowest hashes, no gap


def test_the_sample_follows_adds_and_deletes_until_the_next_compaction(built):
    rate = SAMPLE / N
    with Library.open(built) as library:
        library.acquire_lock()
        first, _ = library.index.background(10 * SAMPLE)
        doomed = first[:20].tolist() + [int(i) for i in library.catalog.ids()[:50]]
        library.catalog.delete_ids(doomed)
        library.index.remove(np.asarray(doomed))
        store(library, random_records(400, start=N))  # into the delta
        live, _ = library.index.background(10 * SAMPLE)
        assert set(live.tolist()) == _expected(library, rate)
        assert not set(doomed) & set(live.tolist())
        assert read_manifest(built).rows == 400  # still the same base: no compaction
    with Library.open(built, read_only=True) as library:  # as a fresh process sees it
        ids, vectors = library.index.background(10 * SAMPLE)
        assert set(ids.tolist()) == _expected(library, rate)
        exact = _catalog_copy(library, ids)
        assert np.abs(vectors - exact).max() < 2e-3
    with Library.open(built) as library:
        library.acquire_lock()
        old = _sample_file(built)
        library.compact()
        assert not old.exists() and _sample_file(built).exists()
        ids, _ = library.index.background(10 * SAMPLE)
        assert set(ids.tolist()) == _expected(library, SAMPLE / len(library.index))


def _damage(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[-10] ^= 0xFF
    elif how == "truncate":
        data = data[: len(data) - 100]
    elif how == "header":
        data[0:8] = b"NOTMINE!"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["missing", "flip", "truncate", "header", "foreign"])
def test_an_unsound_sample_is_never_used(built, how, tmp_path):
    path = _sample_file(built)
    if how == "missing":
        path.unlink()
    elif how == "foreign":  # the sample of another library's base of another size
        other = tmp_path / "other"
        with Library.open(other, create=True) as library:
            library.acquire_lock()
            store(library, random_records(N + 10, start=7))
            library.compact()
        path.write_bytes(_sample_file(other).read_bytes())
    else:
        _damage(path, how)
    query = l2_normalise(np.random.default_rng(99).standard_normal((1, 512)))[0]
    with Library.open(built, read_only=True) as library:
        assert library.index.background(10 * SAMPLE) is None
        scores = background_scores(library.index, query, SAMPLE)  # read from the catalog
        assert len(scores) == SAMPLE
        cut = auto_cutoff(scores, len(library.index))
        assert np.isfinite(cut.threshold)


def test_the_cutoff_from_the_file_is_the_cutoff_from_the_catalog(built):
    """Same photos, float16 vs the catalog's float32: the threshold moves by < 1e-3."""
    query = l2_normalise(np.random.default_rng(5).standard_normal((1, 512)))[0]
    with Library.open(built, read_only=True) as library:
        ids, _ = library.index.background(10 * SAMPLE)
        stored = auto_cutoff(background_scores(library.index, query, 10 * SAMPLE), N)
        exact = _catalog_copy(library, ids)
        reference = auto_cutoff(exact @ query, N)
        assert abs(stored.threshold - reference.threshold) < 1e-3


def test_a_small_base_has_no_sample_file(tmp_path, monkeypatch):
    monkeypatch.setattr(background, "SAMPLE", SAMPLE)
    root = tmp_path / "small"
    with Library.open(root, create=True) as library:
        library.acquire_lock()
        store(library, random_records(SAMPLE))
        library.compact()
        assert not _sample_file(root).exists()
        assert library.index.background(SAMPLE) is None


def test_a_sample_left_by_an_interrupted_compaction_is_removed(built):
    litter = built / "vectors.999.faiss.sample"
    litter.write_bytes(b"left over")
    with Library.open(built) as library:
        library.acquire_lock()
        store(library, random_records(3, start=N))
        assert not litter.exists() and _sample_file(built).exists()


def test_a_checkpoint_draws_the_sample_a_base_lacks(built):
    """A base compacted by an older clipdex (no sample file) gets one at the next
    checkpoint, used at once and by every later reader."""
    path = _sample_file(built)
    path.unlink()
    with Library.open(built) as library:
        library.acquire_lock()
        assert library.index.background(10 * SAMPLE) is None
        store(library, random_records(3, start=N))
        assert path.exists()
        ids, _ = library.index.background(10 * SAMPLE)
        assert set(ids.tolist()) == _expected(library, SAMPLE / N)
    with Library.open(built, read_only=True) as library:
        assert library.index.background(10 * SAMPLE) is not None
