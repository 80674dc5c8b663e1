"""The ``ivf`` vector store: recall against exact search, exact scores, exact filters,
switching kinds, duplicates through the lists, its file and stamp; and `--index` / info."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import indexer.model.encoders
from indexer.errors import ConfigError, LibraryDamaged
from indexer.model.identity import ModelIdentity
from indexer.store import ivf
from indexer.store.catalog import ImageRecord
from indexer.store.ivf import RECALL_TARGET, IVFIndex
from indexer.store.kindchoice import AUTO_IVF_PHOTOS, check_choice, wanted_kind
from indexer.store.library import Library
from indexer.store.vectors import VectorIndex
from indexer.store.vectorstore import load_store, open_store, stamp_path, verify_file
from retrieval.cli import app
from retrieval.search.duplicates import find_duplicates
from retrieval.search.options import SearchOptions
from retrieval.search.ranking import rank
from tests.clipvectors import ArraySource, ClipLike

RECALL_SIZE = 100_000  # the size issue 10 names: 632 lists (Zipf-sized), ~15 s to build


@pytest.fixture(scope="module")
def built():
    """A seeded synthetic library (odd ids, so ids are not row numbers), its ivf index
    (re-ranking from the array source) and the exact index over the same vectors."""
    generator = ClipLike(RECALL_SIZE, seed=3)
    vectors = generator.vectors()
    ids = np.arange(RECALL_SIZE, dtype=np.int64) * 2 + 1
    source = ArraySource(ids, vectors)
    store = IVFIndex.build(source)
    exact = VectorIndex()
    exact.add(ids, vectors)
    return generator, source, store, exact


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def test_recall_at_10_reaches_the_target_on_fresh_queries(built):
    generator, _, store, exact = built
    facts = store.describe()
    assert facts["kind"] == "ivf" and facts["recall_at_10"] >= RECALL_TARGET
    assert 1 < facts["nprobe"] < facts["nlist"]  # tuned: neither everything nor one list
    for queries in (generator.image_queries(200, seed=11), generator.text_queries(200, seed=12)):
        _, found = store.search(queries, 10)
        _, truth = exact.search(queries, 10)
        # Fresh queries (not the tuning ones): within sampling noise of the tuned target.
        assert _recall(found, truth) >= RECALL_TARGET - 0.02


def test_returned_scores_are_exact_cosines(built):
    generator, source, store, _ = built
    queries = generator.text_queries(20, seed=5)
    scores, ids = store.search(queries, 10)
    for row in range(len(queries)):
        _, vectors = source.vectors(ids[row])
        assert np.allclose(scores[row], vectors @ queries[row], atol=1e-6)
        assert list(scores[row]) == sorted(scores[row], reverse=True)


def test_selective_filter_is_exact_and_broad_filter_stays_inside(built):
    generator, source, store, exact = built
    rng = np.random.default_rng(0)
    queries = generator.text_queries(30, seed=6)
    selective = np.sort(rng.choice(source.ids(), 2_000, replace=False))
    assert len(selective) <= ivf.EXACT_FILTER_LIMIT
    got_scores, got = store.search(queries, 10, selective)
    want_scores, want = exact.search(queries, 10, selective)
    assert np.array_equal(got, want)  # brute force over the allowed photos
    assert np.allclose(got_scores, want_scores, atol=1e-6)
    broad = np.sort(rng.choice(source.ids(), 30_000, replace=False))
    assert len(broad) > ivf.EXACT_FILTER_LIMIT
    got_scores, got = store.search(queries, 10, broad)
    _, want = exact.search(queries, 10, broad)
    assert np.isin(got, broad).all()
    assert _recall(got, want) >= RECALL_TARGET - 0.02
    _, vectors = source.vectors(got[0])
    assert np.allclose(got_scores[0], vectors @ queries[0], atol=1e-6)


def test_excluded_ids_are_skipped_in_the_scan_not_re_ranked(built):
    """Tombstones passed as ``excluded_ids`` never come back, the answer is the exact top-10
    of the rest (within the recall), and the re-rank reads no more than without them."""
    generator, source, store, exact = built
    queries = generator.text_queries(30, seed=21)
    _, before = exact.search(queries, 10)
    excluded = np.unique(before[:, :5])  # every query's 5 best are deleted
    live = np.setdiff1d(source.ids(), excluded)
    _, want = exact.search(queries, 10, live)
    asked = []
    store.attach_source(lambda ids: (asked.append(len(ids)), source.vectors(ids))[1])
    try:
        _, found = store.search(queries, 10, excluded_ids=excluded)
    finally:
        store.attach_source(source.vectors)
    assert not set(found.ravel().tolist()) & set(excluded.tolist())
    assert _recall(found, want) >= RECALL_TARGET - 0.02
    assert sum(asked) <= len(queries) * (10 + ivf.RERANK_EXTRA)


def test_range_search_is_exact_above_the_radius(built):
    generator, source, store, exact = built
    queries = generator.image_queries(5, seed=7)
    selective = source.ids()[::40]  # 1,500 photos: brute force
    for allowed in (None, selective):
        lims, scores, ids = store.range_search(queries, 0.8, allowed)
        want_lims, _, want_ids = exact.range_search(queries, 0.8, allowed)
        assert (scores > 0.8).all()
        for row in range(len(queries)):
            got = set(ids[lims[row] : lims[row + 1]].tolist())
            want = set(want_ids[want_lims[row] : want_lims[row + 1]].tolist())
            assert got <= want and len(got) >= RECALL_TARGET * len(want) - 1
            if allowed is not None:
                assert got == want


def test_near_pairs_equal_all_pairs_on_a_small_set():
    generator = ClipLike(6_000, seed=9)
    vectors = generator.vectors()
    ids = np.arange(len(vectors), dtype=np.int64) + 100
    source = ArraySource(ids, vectors)
    store = IVFIndex.build(source)
    a, b, scores = store.near_pairs(0.95)
    got = {tuple(sorted(pair)) for pair in zip(a.tolist(), b.tolist())}
    gram = vectors @ vectors.T
    rows, cols = np.nonzero(np.triu(gram > 0.95, k=1))
    want = {(int(ids[r]), int(ids[c])) for r, c in zip(rows, cols)}
    assert len(want) > 50  # the generator makes bursts of near-copies
    assert got == want
    assert np.allclose(scores, np.einsum("ij,ij->i", vectors[a - 100], vectors[b - 100]))


def test_near_pairs_in_blocks_equal_near_pairs_whole(monkeypatch):
    """A crowded list is compared in blocks of rows: the same pairs and scores as whole."""
    vectors = ClipLike(3_000, seed=4).vectors()
    ids = np.arange(len(vectors), dtype=np.int64) * 3 + 7
    store = IVFIndex.build(ArraySource(ids, vectors))
    whole = _pair_scores(*store.near_pairs(0.9))
    monkeypatch.setattr(ivf, "PAIR_BLOCK", 7)  # several blocks in every list
    blocks = _pair_scores(*store.near_pairs(0.9))
    assert len(whole) > 50
    # BLAS may round a block's products differently: pairs on the radius itself may flip
    clear = {pair for pair, score in whole.items() if score > 0.9 + 1e-4}
    assert clear <= blocks.keys() <= whole.keys() | {p for p, s in blocks.items() if s < 0.9001}
    assert all(abs(blocks[pair] - whole[pair]) < 1e-5 for pair in clear)


def _pair_scores(a, b, scores) -> dict:
    return {tuple(sorted(pair)): float(s) for pair, s in zip(zip(a.tolist(), b.tolist()), scores)}


def test_near_pairs_without_a_source_come_from_the_codes():
    """A bare store (no vector source) compares decoded vectors: it finds the clear pairs,
    nothing far below the radius, and its scores are within the codes' error. (sq8 codes:
    RaBitQ's decoded vectors are far coarser than its distance estimates, up to 0.24 off
    here, which is why a store with a source never compares decoded vectors.)"""
    vectors = ClipLike(6_000, seed=9).vectors()
    ids = np.arange(len(vectors), dtype=np.int64) + 100
    store = IVFIndex.build(ArraySource(ids, vectors), codes="sq8")
    store.attach_source(None)
    a, b, scores = store.near_pairs(0.95)
    exact = np.einsum("ij,ij->i", vectors[a - 100], vectors[b - 100])
    error = 2 * store.margin  # both sides decoded
    assert len(a) > 50 and (a != b).all()
    assert np.all(exact > 0.95 - error) and np.all(np.abs(scores - exact) < error)
    gram = vectors @ vectors.T
    rows, cols = np.nonzero(np.triu(gram > 0.95 + error, k=1))
    clear = {(int(r) + 100, int(c) + 100) for r, c in zip(rows, cols)}
    got = {tuple(sorted(pair)) for pair in zip(a.tolist(), b.tolist())}
    assert clear and clear <= got


def test_untrained_store_trains_on_first_add_and_round_trips_its_stamp(tmp_path):
    vectors = ClipLike(3_000, seed=4).vectors()
    store = open_store("ivf")
    assert len(store) == 0 and store.search(vectors[:1], 5)[1].shape == (1, 0)
    store.save(tmp_path / "empty.faiss")
    assert len(load_store(tmp_path / "empty.faiss")) == 0
    store.add(np.arange(3_000), vectors)
    assert store.describe()["nlist"] == ivf.nlist_for(3_000) and "recall_at_10" in store.params
    path = tmp_path / "vectors.1.faiss"
    store.save(path)
    stamp = json.loads(stamp_path(path).read_text())
    assert stamp["kind"] == "ivf" and stamp["params"]["nprobe"] == store.nprobe
    loaded = load_store(path)
    assert isinstance(loaded, IVFIndex) and loaded.describe() == store.describe()
    assert sorted(loaded.ids().tolist()) == list(range(3_000))
    assert loaded.search(vectors[7], 1)[1][0, 0] == 7
    assert loaded.remove(np.arange(10)) == 10 and len(loaded) == 2_990
    mapped = load_store(path, mmap=True)  # lists mapped from the file, read-only
    assert mapped.mmapped and mapped.search(vectors[7], 1)[1][0, 0] == 7
    copy = mapped.in_memory()
    assert not copy.mmapped and copy.remove(np.arange(10)) == 10 and len(mapped) == 3_000
    copy.add(np.arange(10), vectors[:10])
    assert copy.search(vectors[3], 1)[1][0, 0] == 3
    # A bit flip is found by the full check (repair's: every byte's CRC; a load checks
    # size, header and count), truncation by any load; both name `clipdex repair`.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LibraryDamaged, match="clipdex repair"):
        verify_file(path)
    path.write_bytes(bytes(data[:-100]))
    with pytest.raises(LibraryDamaged, match="truncated"):
        load_store(path)


@pytest.mark.parametrize("codes", ivf.CODES)
def test_each_code_kind_round_trips_mapped_and_answers_exactly(tmp_path, codes):
    """New indexes use RaBitQ codes; an sq8 index (built before them) still loads, maps,
    copies and answers: the same exact top-10 (re-ranked) as the exact kind."""
    vectors = ClipLike(6_000, seed=6).vectors()
    ids = np.arange(len(vectors), dtype=np.int64) * 3 + 5
    source = ArraySource(ids, vectors)
    store = IVFIndex.build(source, codes=codes)
    assert store.params["codes"] == codes and store.describe()["codes"] == codes
    path = tmp_path / "vectors.1.faiss"
    store.save(path)
    mapped = load_store(path, mmap=True)
    assert mapped.codes == codes and mapped.mmapped
    # FAISS maps the lists as OnDiskInvertedLists, which would start 32 read-ahead threads
    # per search (~3.5 ms a query at 1M on 2 cores): they are switched off.
    lists = ivf.faiss.downcast_InvertedLists(mapped.index.invlists)
    assert isinstance(lists, ivf.faiss.OnDiskInvertedLists) and lists.prefetch_nthread == 0
    copy = mapped.in_memory()
    assert copy.codes == codes and not copy.mmapped
    exact = VectorIndex()
    exact.add(ids, vectors)
    queries = vectors[:40] + 0.02
    want_scores, want = exact.search(queries, 10)
    for answer in (store, mapped, copy):
        answer.attach_source(source.vectors)
        scores, found = answer.search(queries, 10)
        assert _recall(found, want) >= RECALL_TARGET - 0.02
        hit = found == want
        assert np.allclose(scores[hit], want_scores[hit], atol=1e-5)
    with pytest.raises(ValueError, match="codes"):
        IVFIndex(codes="pq")


# -- in a library ---------------------------------------------------------------------------
def _library(root, count: int, seed: int = 2):
    """A library of ``count`` synthetic photos (catalog + exact index), still open."""
    vectors = ClipLike(count, seed=seed).vectors()
    library = Library.open(root, create=True)
    library.bind_model(ModelIdentity(weights="fake"))
    records = [
        ImageRecord(f"/p/{i // 100}/{i}.jpg", 1, 1, f"{i:064x}", vectors[i], 64 + i % 7, 48)
        for i in range(count)
    ]
    ids = np.asarray(library.catalog.commit_batch(records), np.int64)
    library.index.add(ids, vectors)
    library.checkpoint()
    return library, ids, vectors


def test_switching_kinds_rebuilds_from_the_catalog_and_keeps_the_answers(tmp_path):
    library, ids, vectors = _library(tmp_path / "lib", 4_000)
    with library:
        query = ClipLike(4_000, seed=2).text_queries(1, seed=3)[0]
        folder = SearchOptions(k=15, folders=("/p/1*",))
        before = {
            name: rank(library, query, options, 1000)
            for name, options in (
                ("top", SearchOptions(k=15)),
                ("folder", folder),
                ("page2", SearchOptions(k=5, offset=5)),
            )
        }
        library.rebuild_index("ivf")
        assert library.index.kind == "ivf" and len(library.index) == 4_000
        for name, options in (
            ("top", SearchOptions(k=15)),
            ("folder", folder),
            ("page2", SearchOptions(k=5, offset=5)),
        ):
            after = rank(library, query, options, 1000)
            assert after.ids == before[name].ids, name
            assert np.allclose(after.scores, before[name].scores, atol=1e-6)
    with Library.open(tmp_path / "lib", read_only=True) as reopened:  # kind from the stamp
        assert reopened.index.kind == "ivf"
        assert rank(reopened, query, SearchOptions(k=15), 1000).ids == before["top"].ids
        cut = rank(reopened, query, SearchOptions(k=50, cutoff="auto"), 1000)
        assert cut.cutoff is not None and all(s > cut.cutoff.threshold for s in cut.scores)
        assert np.allclose(cut.scores, vectors[np.searchsorted(ids, cut.ids)] @ query, atol=1e-6)
        groups = find_duplicates(reopened, 0.95)
    with Library.open(tmp_path / "lib") as library:
        library.rebuild_index("exact")
        assert [sorted(m.id for m in g.members) for g in groups] == [
            sorted(m.id for m in g.members) for g in find_duplicates(library, 0.95)
        ]
        assert groups  # the generator's bursts


def test_auto_choice_and_bad_choice():
    assert wanted_kind("auto", 1_000, "exact") == "exact"
    assert wanted_kind("auto", AUTO_IVF_PHOTOS, "exact") == "ivf"
    assert wanted_kind("auto", AUTO_IVF_PHOTOS * 3 // 4, "ivf") == "ivf"  # no flip-flopping
    assert wanted_kind("auto", AUTO_IVF_PHOTOS // 3, "ivf") == "exact"
    assert wanted_kind("exact", 10**7, "ivf") == "exact"
    assert check_choice(" IVF ") == "ivf" and check_choice(None) is None
    with pytest.raises(ConfigError, match="auto, exact, ivf") as caught:
        check_choice("hnsw")
    assert caught.value.setting == "index"


def test_index_flag_switches_kind_and_info_shows_it(
    tmp_path, monkeypatch, fake_encoder, photo_folder
):
    monkeypatch.setattr(indexer.model.encoders, "load_encoder", lambda *a, **k: fake_encoder)
    runner = CliRunner()
    library = str(tmp_path / "lib")

    def run(*args):
        result = runner.invoke(app, [*args, "--library", library], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    report = json.loads(run("index", str(photo_folder), "--json"))
    assert report["index_rebuilt"] is None
    assert json.loads(run("info", "--json"))["index"]["kind"] == "exact"
    report = json.loads(run("index", str(photo_folder), "--index", "ivf", "--json"))
    assert report["index_rebuilt"] == "ivf" and report["indexed"] == 0
    facts = json.loads(run("info", "--json"))["index"]
    assert facts["kind"] == "ivf" and facts["choice"] == "ivf" and facts["count"] == 6
    assert "recall@10" in run("info") and "ivf" in run("info")
    found = json.loads(run("search", "a red ball", "-k", "3", "--json"))
    assert len(found["results"]) == 3
    report = json.loads(run("index", str(photo_folder), "--json"))  # the choice is kept
    assert report["index_rebuilt"] is None
    assert json.loads(run("info", "--json"))["index"]["kind"] == "ivf"
    bad = runner.invoke(app, ["index", str(photo_folder), "--index", "hnsw", "--library", library])
    assert bad.exit_code != 0 and "auto, exact, ivf" in bad.output
