"""Query arithmetic: the grammar, its error positions, and the combined query vector."""

from __future__ import annotations

import json

import numpy as np
import pytest

from indexer.ingest.pipeline import index_paths
from indexer.model.identity import l2_normalise
from indexer.store.library import Library
from retrieval.search.engine import SearchEngine
from retrieval.search.errors import QueryError
from retrieval.search.options import SearchOptions
from retrieval.search.query import QuerySyntaxError, Term, combine, describe, parse_query
from tests.clirun import run
from tests.margins import assert_clear_order


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("a dog", [("a dog", 1.0)]),
        ("beach + sunset - people", [("beach", 1), ("sunset", 1), ("people", -1)]),
        ("2:dog + cat", [("dog", 2), ("cat", 1)]),
        ("0.5:cat - 1.5 : dog", [("cat", 0.5), ("dog", -1.5)]),
        (".5:cat + dog", [("cat", 0.5), ("dog", 1)]),
        ("beach -people", [("beach", 1), ("people", -1)]),
        ("-people + beach", [("people", -1), ("beach", 1)]),
        ("well-lit t-shirt on a half-pipe", [("well-lit t-shirt on a half-pipe", 1)]),
        ("C++ book", [("C++ book", 1)]),
        ('"salt + pepper" - 2:"rock-n-roll"', [("salt + pepper", 1), ("rock-n-roll", -2)]),
        ('"12:30" + clock', [("12:30", 1), ("clock", 1)]),
        ("  spaced   out  ", [("spaced   out", 1)]),
    ],
)
def test_grammar_parses_weighted_terms(query, expected):
    assert [(t.text, t.weight) for t in parse_query(query)] == [(a, float(b)) for a, b in expected]


@pytest.mark.parametrize(
    ("query", "position", "reason"),
    [
        ("beach + + sunset", 8, "two operators in a row"),
        ("beach +", 7, "expected a phrase after '+'"),
        ("beach - ", 8, "expected a phrase after '-'"),
        ('cat + "open quote', 6, "never closed"),
        ('"" + cat', 0, "empty quoted phrase"),
        ('red "car"', 4, "quote inside a phrase"),
        ('"red" car', 6, "expected + or - between"),
        ("0:dog + cat", 0, "greater than 0"),
        ("cat + 2:", 8, "expected a phrase after the weight"),
        ("cat + 2: - dog", 9, "expected a phrase after the weight"),
        ("+", 1, "expected a phrase"),
    ],
)
def test_malformed_queries_point_at_the_error(query, position, reason):
    with pytest.raises(QuerySyntaxError) as caught:
        parse_query(query)
    error = caught.value
    assert error.position == position
    assert reason in str(error)
    assert f"character {position + 1}" in str(error)
    # The message shows the query with the offending spot marked.
    assert f"{query[:position]}«" in str(error)


def test_empty_query_is_a_query_error():
    with pytest.raises(QueryError, match="empty"):
        parse_query("   ")


def test_describe_round_trips():
    for query in ['2:dog + cat - "a + b"', "beach -people", '"3:00" + 0.5:clock']:
        terms = parse_query(query)
        assert parse_query(describe(terms)) == terms


def test_combine_is_the_renormalised_weighted_sum():
    rng = np.random.default_rng(0)
    a, b, c = l2_normalise(rng.standard_normal((3, 512)))
    combined = combine(np.vstack([a, b, c]), [2.0, 1.0, -1.0])
    expected = 2 * a + b - c
    assert np.allclose(combined, expected / np.linalg.norm(expected), atol=1e-6)
    assert np.linalg.norm(combined) == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(combine(a[None], [1.0]), a, atol=1e-7)


def test_combine_refuses_nothing_positive_and_cancelling_terms():
    rng = np.random.default_rng(1)
    a, b = l2_normalise(rng.standard_normal((2, 512)))
    with pytest.raises(QueryError, match="positive term"):
        combine(np.vstack([a, b]), [-1.0, -2.0])
    with pytest.raises(QueryError, match="cancel"):
        combine(np.vstack([a, a]), [1.0, -1.0])


@pytest.fixture
def engine(tmp_path, photo_folder, fake_encoder):
    with Library.open(tmp_path / "lib", create=True) as library:
        index_paths(library, fake_encoder, [photo_folder])
        yield SearchEngine(library, fake_encoder)


def test_single_term_query_is_exactly_the_text_vector(engine, fake_encoder):
    vector, terms = engine.query_vector("a red ball")
    assert terms == [Term("a red ball", 1.0)]
    assert np.array_equal(vector, fake_encoder.encode_texts(["a red ball"])[0])


def test_query_vector_mixes_texts_and_photos_without_decoding_indexed_ones(
    engine, fake_encoder, photo_folder
):
    photo_id = engine.library.catalog.id_for_path(str(photo_folder / "photo_2.jpg"))
    other_id = engine.library.catalog.id_for_path(str(photo_folder / "photo_4.jpg"))
    fake_encoder.images_encoded = 0
    vector, terms = engine.query_vector("2:dog - cat", like=[str(photo_id)], unlike=[str(other_id)])
    assert fake_encoder.images_encoded == 0  # stored vectors, no decode, no image model call
    dog, cat = fake_encoder.encode_texts(["dog", "cat"])
    expected = 2 * dog - cat + engine.vector_of(photo_id) - engine.vector_of(other_id)
    assert np.allclose(vector, expected / np.linalg.norm(expected), atol=1e-6)
    assert [t.kind for t in terms] == ["text", "text", "photo", "photo"]


def test_like_alone_finds_that_photo_first(engine, photo_folder):
    target = photo_folder / "photo_3.jpg"
    vector, _ = engine.query_vector(None, like=[str(target)])
    assert engine.search(vector, SearchOptions(k=1)).results[0].path == str(target)


def test_text_search_uses_the_grammar(engine, fake_encoder):
    dog, cat = fake_encoder.encode_texts(["dog", "cat"])
    expected = l2_normalise(dog - cat)
    options = SearchOptions(k=6)
    by_grammar = [r.id for r in engine.search(engine.query_vector("dog - cat")[0], options).results]
    reference = engine.search(expected, options).results
    # Two code paths make the two query vectors: their orders agree only where no two
    # scores are closer than rounding (measured: 4e-4 apart at the least).
    assert_clear_order([r.score for r in reference])
    assert by_grammar == [r.id for r in reference]


# -- CLI ------------------------------------------------------------------------------------
def test_cli_bad_query_exits_1_with_the_position(fake_model, photo_folder):
    run("index", str(photo_folder), "--json")
    result = run("search", "beach + + sunset")
    assert result.exit_code == 1
    assert "character 9" in result.output and "Traceback" not in result.output


def test_cli_search_json_lists_terms_and_like(fake_model, photo_folder):
    run("index", str(photo_folder), "--json")
    liked = str(photo_folder / "photo_1.jpg")
    document = json.loads(run("search", "2:dog - cat", "--like", liked, "--json").stdout)
    assert document["query"] == "2:dog - cat"
    assert [(t["kind"], t["weight"]) for t in document["terms"]] == [
        ("text", 2.0),
        ("text", -1.0),
        ("photo", 1.0),
    ]
    only_like = json.loads(run("search", "--like", liked, "-k", "1", "--json").stdout)
    assert only_like["results"][0]["path"] == liked
    assert run("search").exit_code == 2  # neither a query nor --like
