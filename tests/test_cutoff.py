"""The adaptive cut-off (universal threshold on Fisher-transformed scores) and --min-score.

Evidence that the rule behaves: synthetic score distributions (a query that matches
nothing keeps ~nothing at any library size; a planted relevant tail is recovered even when
it is a fifth of the library), and the corpus with generated near-copies (an image query
keeps its photo and all its copies).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from indexer.model.identity import ModelIdentity, l2_normalise
from indexer.store.catalog import ImageRecord
from indexer.store.library import Library
from retrieval.search.cutoff import (
    Cutoff,
    auto_cutoff,
    background_ids,
    combine_cutoffs,
    resolve_cutoff,
    universal_z,
)
from retrieval.search.engine import SearchEngine
from retrieval.search.errors import QueryError
from retrieval.search.options import SearchOptions
from tests.imagefakes import ThumbnailEncoder, build_variant_library

REAL_WEIGHTS = os.environ.get("CLIPDEX_WEIGHTS")  # read before the autouse fixture clears it


def kept(scores: np.ndarray, population: int | None = None) -> np.ndarray:
    cut = auto_cutoff(scores, population or len(scores))
    return scores > cut.threshold


def test_universal_z_grows_slowly_with_the_library():
    assert universal_z(100) == pytest.approx(3.03, abs=0.01)
    assert universal_z(10_000) == pytest.approx(4.29, abs=0.01)
    assert universal_z(1_000_000) == pytest.approx(5.26, abs=0.01)
    assert universal_z(3) == 2.0  # floor


@pytest.mark.parametrize("n", [200, 5_000, 100_000])
def test_a_query_that_matches_nothing_keeps_almost_nothing_at_any_size(n):
    rng = np.random.default_rng(n)
    # 40 queries whose scores are all bulk: text-like level and spread.
    counts = [kept(rng.normal(0.18, 0.03, n)).sum() for _ in range(40)]
    # Theory: about 1 / (z * sqrt(2 pi)) ~ 0.1 false positives per query.
    assert np.mean(counts) <= 0.35 and max(counts) <= 3


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.2])
def test_a_planted_relevant_tail_is_recovered(fraction):
    rng = np.random.default_rng(1)
    n = 20_000
    relevant = int(n * fraction)
    bulk = rng.normal(0.15, 0.03, n - relevant)
    tail = rng.normal(0.15 + 8 * 0.03, 0.01, relevant)  # clearly matching photos
    mask = kept(np.concatenate([bulk, tail]))
    assert mask[n - relevant :].mean() >= 0.95  # recall
    assert mask[: n - relevant].sum() <= 3  # bulk let through


def test_fisher_scale_keeps_near_copies_where_a_raw_threshold_exceeds_one():
    raw_above_one = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        # An image query: a broad bulk of image-image cosines, the photo itself, 3 copies.
        bulk = np.clip(rng.normal(0.3, 0.25, 60), -1, 0.85)
        scores = np.concatenate([bulk, [1.0, 0.995, 0.99, 0.985]])
        median = np.median(scores)
        raw_sigma = 1.4826 * np.median(np.abs(scores - median))
        raw_above_one += median + universal_z(len(scores)) * raw_sigma > 1.0
        mask = kept(scores)
        assert mask[60:].all()  # the photo and its copies, always
        assert mask[:60].sum() <= 3  # at most the bulk's extreme tail
    assert raw_above_one >= 5  # where the raw-scale rule could keep nothing at all


def test_too_few_photos_keeps_everything():
    cut = auto_cutoff(np.array([0.1, 0.2, 0.3]), 3)
    assert cut.threshold == -math.inf


def test_min_score_and_auto_combine_to_the_stricter():
    auto = Cutoff("auto", 0.3, 0.1, 0.02, 3.0, 100)
    assert combine_cutoffs(None, None) is None
    assert combine_cutoffs(None, 0.25).threshold == 0.25
    assert combine_cutoffs(auto, None) is auto
    assert combine_cutoffs(auto, 0.2).threshold == 0.3
    stricter = combine_cutoffs(auto, 0.4)
    assert stricter.threshold == 0.4 and stricter.rule == "auto+min-score"


def test_flags_resolve_and_a_date_sort_implies_auto():
    assert resolve_cutoff(None, None, "score") == (False, None)
    assert resolve_cutoff("auto", None, "score") == (True, None)
    assert resolve_cutoff(None, None, "date") == (True, None)
    assert resolve_cutoff(None, 0.2, "date") == (False, 0.2)  # a fixed one is enough
    assert resolve_cutoff("none", None, "date") == (False, None)  # explicit: no cut-off
    with pytest.raises(QueryError, match="cut-off 'sometimes' is not one of") as bad_rule:
        resolve_cutoff("sometimes", None)
    assert bad_rule.value.setting == "cutoff"
    with pytest.raises(QueryError, match="minimum score must be between -1 and 1") as bad_min:
        resolve_cutoff(None, 2.0)
    assert bad_min.value.setting == "min_score"  # the CLI shows it as --min-score


def test_background_sample_is_fixed_and_bounded():
    ids = np.arange(1, 50_001)
    first, second = background_ids(ids, 1000), background_ids(ids, 1000)
    assert len(first) == 1000 and np.array_equal(first, second)
    assert background_ids(ids[:500], 1000) is None


# -- through the engine ---------------------------------------------------------------------
@pytest.fixture
def planted(tmp_path, fake_encoder):
    """2000 random photos, 15 of them close to a query vector."""
    rng = np.random.default_rng(4)
    query = l2_normalise(rng.standard_normal(512))
    vectors = l2_normalise(rng.standard_normal((2000, 512)))
    vectors[:15] = l2_normalise(query + 0.05 * rng.standard_normal((15, 512)) * 2)
    records = [
        ImageRecord(
            f"/p/{'match' if i < 15 else 'other'}/{i}.jpg", 1, 1, f"{i:064x}", vectors[i], 9, 9
        )
        for i in range(2000)
    ]
    with Library.open(tmp_path / "lib", create=True) as library:
        library.bind_model(ModelIdentity(weights="fake"))
        ids = library.catalog.commit_batch(records)
        library.index.add(np.asarray(ids), vectors)
        library.checkpoint()
        yield SearchEngine(library, fake_encoder), query, set(ids[:15])


def test_engine_auto_cutoff_keeps_exactly_the_planted_matches(planted):
    engine, query, matches = planted
    page = engine.search(query, SearchOptions(k=50, cutoff="auto"))
    assert {r.id for r in page.results} == matches and page.total == 15
    assert page.cutoff.rule == "auto" and page.cutoff.population == 2000
    fixed = engine.search(query, SearchOptions(k=50, min_score=0.99))
    assert fixed.total == 0 and fixed.cutoff.rule == "min-score"


def test_cutoff_background_is_the_library_even_when_a_filter_keeps_only_matches(planted):
    engine, query, matches = planted
    # The filtered set is all matches: judged against itself nothing would stand out.
    page = engine.search(query, SearchOptions(k=50, cutoff="auto", folders=("/p/match",)))
    assert {r.id for r in page.results} == matches and page.cutoff.population == 15


# -- the corpus ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def variant_library(corpus, tmp_path_factory):
    library, groups = build_variant_library(corpus, tmp_path_factory.mktemp("cutoff"))
    yield library, groups
    library.close()


def test_corpus_image_query_keeps_the_photo_and_all_its_copies(variant_library):
    library, groups = variant_library
    engine = SearchEngine(library, ThumbnailEncoder())
    for group in groups.values():
        for member in group:
            vector = engine.vector_of(library.catalog.id_for_path(member))
            page = engine.search(vector, SearchOptions(k=100, cutoff="auto"))
            paths = {r.path for r in page.results}
            assert group <= paths, (member, sorted(group - paths))
            assert len(paths) <= len(group) + 1, (member, sorted(paths - group))


def test_corpus_every_photo_keeps_itself_and_unrelated_queries_keep_little(variant_library):
    library, _ = variant_library
    encoder = ThumbnailEncoder()
    engine = SearchEngine(library, encoder)
    for image_id in library.catalog.ids():
        page = engine.search(engine.vector_of(int(image_id)), SearchOptions(cutoff="auto"))
        assert int(image_id) in {r.id for r in page.results}
    # Texts are random directions to this encoder: nothing should stand out.
    totals = [
        engine.search(v, SearchOptions(cutoff="auto")).total
        for v in encoder.encode_texts([f"unrelated {i}" for i in range(100)])
    ]
    assert np.mean(totals) < 1.0


@pytest.mark.real_weights
@pytest.mark.skipif(not REAL_WEIGHTS, reason="needs CLIPDEX_WEIGHTS (real MobileCLIP-S2)")
def test_real_model_text_cutoff_on_the_corpus(corpus, tmp_path):
    from indexer.ingest.pipeline import index_paths
    from indexer.model.encoders import load_encoder

    encoder = load_encoder(Path(REAL_WEIGHTS))
    with Library.open(tmp_path / "lib", create=True) as library:
        index_paths(library, encoder, [corpus / "photos"])
        engine = SearchEngine(library, encoder)
        for query, expected in [("a photo of a cat", "black_cat.jpg"), ("a guitar", "guitar.jpg")]:
            page = engine.search(engine.query_vector(query)[0], SearchOptions(cutoff="auto"))
            names = [Path(r.path).name for r in page.results]
            assert expected in names and len(names) <= 8, (query, names)
