"""One query, meaning and words: the word index reader, the grammar's phrases and prefixes,
fused ranking with its "matched" explanation, the cut-off on the fused list, hostile words.

The word side is decided by the stored words alone, so a FakeEncoder (noise for meaning) is
what these tests rank with: an exact word match must come first whatever the noise says.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from indexer.ingest.pipeline import index_paths
from indexer.store.catalog_reader import CatalogReader
from indexer.store.library import Library
from indexer.store.textsearch import TextTerm, match_expression, words_of
from retrieval.cli import app
from retrieval.search.engine import SearchEngine
from retrieval.search.errors import QueryError
from retrieval.search.fusion import word_query
from retrieval.search.options import SearchOptions
from retrieval.search.query import QuerySyntaxError, describe, parse_query
from tests.conftest import FakeEncoder
from tests.textfixtures import add_text, drop_all_text

runner = CliRunner()
REAL_WEIGHTS = os.environ.get("CLIPDEX_WEIGHTS")  # read before the autouse fixture clears it
SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
HOSTILE = [
    '"',
    '"unbalanced',
    "*",
    "receipt*",
    "NEAR(receipt total)",
    "NEAR(",
    "- receipt",
    "receipt OR total",
    "OR",
    "AND NOT",
    "text:*",
    'name:"',
    "{source}: receipt",
    "^receipt",
    "receipt:total",
    "€ £ ¥",
    "a" * 10_000,
    "receipt " * 2_000,
    "col:umn\"'; DROP TABLE images; --",
]


def make_photos(folder: Path, n: int = 12) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(n):
        image = Image.new("RGB", (200, 160), tuple(int(c) for c in rng.integers(0, 255, 3)))
        ImageDraw.Draw(image).rectangle(
            (10 * i, 20, 60 + 10 * i, 120), fill=tuple(int(c) for c in rng.integers(0, 255, 3))
        )
        image.save(folder / f"img_{i:02d}.jpg", quality=90)
    return folder


@pytest.fixture(scope="module")
def texts_library(tmp_path_factory):
    """Twelve photos; a few with words stored (built once: tests only read it).
    Returns (root, {name: id})."""
    tmp_path = tmp_path_factory.mktemp("fusion")
    root = tmp_path / "lib"
    photos = make_photos(tmp_path / "photos")
    with Library.open(root, create=True) as library:
        index_paths(library, FakeEncoder(), [photos])
        ids = {Path(p).name: i for i, p in ((i, r["path"]) for i, r in _rows(library).items())}
    add_text(
        root,
        [
            (ids["img_03.jpg"], "ocr", "CAFÉ DU MONDE receipt total 12.50 EUR"),
            (ids["img_05.jpg"], "ocr", "OUT OF ORDER please use the other machine"),
            (ids["img_06.jpg"], "ocr", "order out of the box"),
            (ids["img_07.jpg"], "name", "receipt scan"),
            (ids["img_08.jpg"], "folder", "Italy 2019"),
            (ids["img_09.jpg"], "keywords", "italy venice gondola"),
        ],
    )
    return root, ids


def _rows(library) -> dict:
    return library.catalog.get_images(library.catalog.ids().tolist())


@pytest.fixture
def engine(texts_library, fake_encoder):
    root, _ = texts_library
    with Library.open(root, read_only=True) as library:
        yield SearchEngine(library, fake_encoder)


def search(engine: SearchEngine, query: str, **options):
    vector, terms = engine.query_vector(query)
    return engine.search(vector, SearchOptions(**options), terms)


# -- the reader ---------------------------------------------------------------------------
def test_reader_finds_words_with_bm25_sources_and_matched_terms(texts_library):
    root, ids = texts_library
    reader = CatalogReader(root / "catalog.sqlite")
    hits = reader.text_search([TextTerm("receipt cafe")], limit=10)
    assert [h.image_id for h in hits][:1] == [ids["img_03.jpg"]]  # both words beat one
    assert {h.image_id for h in hits} == {ids["img_03.jpg"], ids["img_07.jpg"]}
    assert hits[0].terms == ["receipt", "cafe"] and hits[0].sources == ["ocr"]
    assert hits[0].score > hits[1].score > 0
    only_names = reader.text_search([TextTerm("receipt", sources=frozenset({"name"}))], 10)
    assert [h.image_id for h in only_names] == [ids["img_07.jpg"]]
    allowed = np.asarray([ids["img_07.jpg"]])
    assert [h.image_id for h in reader.text_search([TextTerm("receipt")], 10, allowed)] == [
        ids["img_07.jpg"]
    ]
    phrase = reader.text_ids(TextTerm("out of order", phrase=True))
    assert phrase.tolist() == [ids["img_05.jpg"]]  # img_06 has the words, not the phrase
    snippets = reader.text_snippets([ids["img_03.jpg"]], [TextTerm("receipt")])
    assert snippets == {
        ids["img_03.jpg"]: [{"source": "ocr", "text": "CAFÉ DU MONDE [[receipt]] total 12.50 EUR"}]
    }
    reader.close()


def test_user_words_never_reach_fts_syntax():
    assert match_expression([TextTerm('a"b OR NEAR(c')]) == '"a" OR "b" OR "or" OR "near" OR "c"'
    assert match_expression([TextTerm("*")]) is None  # no word: nothing is sent
    assert match_expression([TextTerm('say "hi"', phrase=True)]) == '"say hi"'
    assert words_of("Ça-va_Été") == ["ca", "va", "ete"]
    assert match_expression([TextTerm("東京 tower")]) == '"東 京" OR "tower"'  # CJK: per character


def test_no_text_rows_means_no_hits(tmp_path, photo_folder, fake_encoder):
    with Library.open(tmp_path / "lib", create=True) as library:
        index_paths(library, fake_encoder, [photo_folder])
        assert library.catalog.has_text()  # file and folder names
        assert [len(library.catalog.text_search([TextTerm("photo")], 10))] == [6]
    drop_all_text(tmp_path / "lib")
    with Library.open(tmp_path / "lib") as library:
        assert not library.catalog.has_text()
        assert library.catalog.text_search([TextTerm("photo")], 10) == []


def test_the_index_and_the_reader_space_cjk_alike():
    from indexer.store import textindex
    from indexer.store.textsearch import _CJK_CLASS

    assert textindex._CJK.pattern == f"({_CJK_CLASS})"


# -- grammar --------------------------------------------------------------------------------
def test_grammar_phrases_and_prefixes():
    terms = parse_query('"out of order" + text:receipt - name:"tmp files" + 2:Name:Italy')
    assert [(t.text, t.weight, t.quoted, t.field) for t in terms] == [
        ("out of order", 1.0, True, None),
        ("receipt", 1.0, False, "text"),
        ("tmp files", -1.0, True, "name"),
        ("Italy", 2.0, False, "name"),
    ]
    assert parse_query(describe(terms)) == terms
    assert [t.encoded for t in terms] == [True, False, False, False]
    words = word_query(terms)
    assert [t.text for t in words.required] == ["out of order"]
    assert [t.text for t in words.excluded] == ["tmp files"]
    assert words.scoring[1].sources == frozenset({"ocr", "description", "keywords"})
    assert words.scoring[2].sources == frozenset({"name", "folder"})
    # Filler words are not looked up: "a photo of the beach" looks for "beach".
    assert [t.text for t in word_query(parse_query("a photo of the beach")).scoring] == ["beach"]


@pytest.mark.parametrize("query", ["text:", "beach + name:", "text: - dog", "text:+dog"])
def test_a_prefix_needs_a_phrase(query):
    with pytest.raises(QuerySyntaxError, match="expected a phrase after"):
        parse_query(query)


# -- fused ranking --------------------------------------------------------------------------
def test_exact_word_match_comes_first_over_semantic_noise(engine, texts_library):
    _, ids = texts_library
    page = search(engine, "gondola", k=12)
    assert [r.id for r in search(engine, "text:gondola").results] == [ids["img_09.jpg"]]
    assert search(engine, "name:gondola").results == []
    assert page.results[0].id == ids["img_09.jpg"]
    assert page.fusion == "calibrated"
    first = page.results[0].matched
    assert first["text"] == ["gondola"] and first["sources"] == ["keywords"]
    assert -1 <= first["semantic"] <= 1
    assert first["snippets"][0]["text"] == "italy venice [[gondola]]"
    # Photos without the word keep their cosine as score and say so.
    rest = page.results[1]
    assert rest.matched == {
        "semantic": pytest.approx(rest.score, abs=1e-4),
        "text": [],
        "sources": [],
    }
    assert len(page.results) == 12


def test_the_word_match_would_not_be_first_by_meaning_alone(engine, texts_library):
    """The test above can fail: without the words the target ranks elsewhere."""
    _, ids = texts_library
    vector, _ = engine.query_vector("gondola")
    plain = engine.search(vector, SearchOptions(k=12))  # no terms: meaning only
    assert plain.fusion is None and plain.results[0].matched is None
    assert plain.results[0].id != ids["img_09.jpg"]


def test_quoted_phrase_is_required(engine, texts_library):
    _, ids = texts_library
    page = search(engine, '"out of order"', k=12)
    assert [r.id for r in page.results] == [ids["img_05.jpg"]]
    assert page.results[0].matched["text"] == ["out of order"]
    assert len(search(engine, '"€"', k=12).results) == 12  # no word to require: meaning only
    excluded = search(engine, 'machine - "out of order"', k=12)
    assert ids["img_05.jpg"] not in [r.id for r in excluded.results]
    assert len(excluded.results) == 11


def test_prefixes_restrict_the_sources(engine, texts_library):
    _, ids = texts_library
    assert [r.id for r in search(engine, "name:receipt", k=12).results] == [ids["img_07.jpg"]]
    assert [r.id for r in search(engine, "text:receipt", k=12).results] == [ids["img_03.jpg"]]
    names = search(engine, "name:italy", k=12)  # folder names count as names
    assert [r.id for r in names.results] == [ids["img_08.jpg"]]
    assert names.results[0].matched == {
        "semantic": None,
        "text": ["italy"],
        "sources": ["folder"],
        "snippets": [{"source": "folder", "text": "[[Italy]] 2019"}],
    }
    both = search(engine, "italy", k=2)
    assert {r.id for r in both.results} == {ids["img_08.jpg"], ids["img_09.jpg"]}


def test_cutoff_on_the_fused_list_keeps_the_word_matches(engine, texts_library):
    _, ids = texts_library
    page = search(engine, "receipt", cutoff="auto")
    kept = [r.id for r in page.results]
    assert kept[:2] == [ids["img_03.jpg"], ids["img_07.jpg"]] or kept[:2] == [
        ids["img_07.jpg"],
        ids["img_03.jpg"],
    ]
    assert page.total == len(kept) and page.cutoff is not None
    assert all(r.score >= page.cutoff.threshold for r in page.results)
    filtered = search(engine, "receipt", cutoff="auto", min_size="10000x10000")
    assert filtered.results == [] and filtered.total == 0


def test_filters_apply_to_the_word_side(engine, texts_library):
    root, ids = texts_library
    inside = search(engine, "name:receipt", folders=(str(root.parent / "photos"),))
    assert [r.id for r in inside.results] == [ids["img_07.jpg"]]
    assert search(engine, "name:receipt", folders=(str(root.parent / "elsewhere"),)).results == []
    assert search(engine, "receipt", k=12, min_size="10000x10000").results == []


def test_library_without_words_searches_as_before(tmp_path, photo_folder, fake_encoder):
    with Library.open(tmp_path / "lib", create=True) as library:
        index_paths(library, fake_encoder, [photo_folder])
    drop_all_text(tmp_path / "lib")
    with Library.open(tmp_path / "lib") as library:
        engine = SearchEngine(library, fake_encoder)
        vector, terms = engine.query_vector('"out of order" + beach')
        with_terms = engine.search(vector, SearchOptions(k=6), terms)
        without = engine.search(vector, SearchOptions(k=6))
        assert with_terms.as_dict() == without.as_dict()
        assert "fusion" not in with_terms.as_dict()
        assert all("matched" not in r for r in with_terms.as_dict()["results"])
        with pytest.raises(QueryError, match="has none yet"):
            search(engine, "name:italy")


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_words_give_results_or_a_query_error(engine, query):
    try:
        page = search(engine, query, k=5)
    except QueryError as error:
        assert str(error)  # a clear message, never an SQLite or FTS5 error
        return
    assert len(page.results) <= 5


def test_rrf_is_available_for_comparison(engine, texts_library):
    _, ids = texts_library
    vector, terms = engine.query_vector("gondola")
    page = engine.search(vector, SearchOptions(k=3), terms, fusion="rrf")
    assert page.fusion == "rrf" and page.results[0].id == ids["img_09.jpg"]
    with pytest.raises(QueryError, match="fusion"):
        engine.search(vector, SearchOptions(k=3), terms, fusion="nope")


# -- interfaces -----------------------------------------------------------------------------
def test_cli_search_json_carries_matched(fake_model, texts_library, monkeypatch):
    root, ids = texts_library
    result = runner.invoke(app, ["search", "gondola", "--library", str(root), "--json", "-k", "3"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["fusion"] == "calibrated"
    assert document["results"][0]["id"] == ids["img_09.jpg"]
    assert document["results"][0]["matched"]["text"] == ["gondola"]
    assert document["terms"] == [{"kind": "text", "text": "gondola", "weight": 1.0}]
    table = runner.invoke(app, ["search", "name:italy", "--library", str(root)])
    assert table.exit_code == 0 and "italy" in table.stdout and "folder" in table.stdout
    bad = runner.invoke(app, ["search", "text:", "--library", str(root)])
    assert bad.exit_code == 1 and "Traceback" not in bad.output


def test_rest_search_carries_matched(texts_library, fake_encoder):
    from tests.live_server import served

    root, ids = texts_library
    with served(root, fake_encoder) as (_, http):
        answer = http.get("/api/search", params={"q": '"out of order"', "k": 5})
        assert answer.status_code == 200, answer.text
        document = answer.json()
        assert document["fusion"] == "calibrated"
        assert [r["id"] for r in document["results"]] == [ids["img_05.jpg"]]
        matched = document["results"][0]["matched"]
        assert matched["text"] == ["out of order"] and matched["sources"] == ["ocr"]
        assert matched["snippets"][0]["text"].startswith("[[OUT OF ORDER]]")
        for query in HOSTILE[:8]:
            response = http.get("/api/search", params={"q": query})
            assert response.status_code in (200, 400), (query, response.text)
            if response.status_code == 400:
                assert response.json()["error"]["code"] == "bad_query"


@pytest.mark.real_weights
@pytest.mark.skipif(not REAL_WEIGHTS, reason="needs CLIPDEX_WEIGHTS (real MobileCLIP-S2)")
def test_real_model_fuses_meaning_and_words(tmp_path):
    """With real weights the meaning side means something: the guitar photo (by its look
    and its file name) comes first, the puppy photo keyworded "guitar lessons" second (by
    its words alone), and meaning alone would not keep the puppy."""
    from indexer.model.encoders import load_encoder

    encoder = load_encoder(Path(REAL_WEIGHTS))
    root = tmp_path / "lib"
    with Library.open(root, create=True) as library:
        index_paths(library, encoder, [SAMPLES])
        guitar = library.catalog.id_for_path(str(SAMPLES / "guitar.jpg"))
        puppy = library.catalog.id_for_path(str(SAMPLES / "puppy.jpg"))
    add_text(root, [(puppy, "keywords", "guitar lessons")])
    with Library.open(root, read_only=True) as library:
        engine = SearchEngine(library, encoder)
        vector, terms = engine.query_vector("a guitar")
        fused = engine.search(vector, SearchOptions(cutoff="auto"), terms)
        assert [r.id for r in fused.results][:2] == [guitar, puppy]
        first, second = fused.results[:2]
        assert first.matched["sources"] == ["name"] and second.matched["sources"] == ["keywords"]
        assert first.matched["semantic"] > second.matched["semantic"]
        by_meaning = engine.search(vector, SearchOptions(cutoff="auto"))
        assert by_meaning.results[0].id == guitar
        assert puppy not in [r.id for r in by_meaning.results]


def test_words_read_in_photos_find_them_first(tmp_path, fake_encoder):
    """End to end: text drawn on photos, read at indexing (OCR), found by one query. The
    fake encoder's meaning is noise; the words must carry it."""
    import tests.textphotos as tp
    from indexer.ingest.pipeline import IndexOptions

    easy = {"sizes": (64,), "angles": (0.0,), "contrasts": ("high",), "image_size": (640, 480)}
    made = tp.make_text_set(tmp_path / "photos" / "text", 3, seed=11, **easy)
    tp.make_plain_set(tmp_path / "photos" / "plain", 6, seed=11)
    root = tmp_path / "lib"
    with Library.open(root, create=True) as library:
        index_paths(library, fake_encoder, [tmp_path / "photos"], IndexOptions(ocr="always"))
        ids = {str(photo.path): library.catalog.id_for_path(str(photo.path)) for photo in made}
    with Library.open(root, read_only=True) as library:
        engine = SearchEngine(library, fake_encoder)
        firsts = []
        for photo in made:
            for word in photo.words:
                top = search(engine, word, k=3).results[0]
                firsts.append(top.id == ids[str(photo.path)] and "ocr" in top.matched["sources"])
            assert any(firsts[-len(photo.words) :]), photo  # every photo found by its words
    assert sum(firsts) >= 0.8 * len(firsts), firsts


def test_fused_pages_page_and_sort_by_date(engine, texts_library):
    _, ids = texts_library
    whole = [r.id for r in search(engine, "italy receipt", k=12).results]
    pages = [
        r.id for o in (0, 4, 8) for r in search(engine, "italy receipt", k=4, offset=o).results
    ]
    assert pages == whole and len(set(whole)) == 12  # no repeat, no gap
    dated = search(engine, "receipt", sort="date")  # a date sort implies the auto cut-off
    assert dated.cutoff is not None and dated.total == len(dated.results)
    assert {ids["img_03.jpg"], ids["img_07.jpg"]} <= {r.id for r in dated.results}
