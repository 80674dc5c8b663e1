"""A RAW and a JPEG of one shot (same folder, same name stem) are one search result.

The library: three sample photos as JPEGs, DNGs (tests/rawfakes.py) of two of them beside
their JPEGs (pairs), and a DNG alone. The grouping (retrieval/search/pairs.py) is checked
with the fake encoder where only the grouping matters (every photo listed with
``min_score=-1``) and with the spread checkpoint where the order matters.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library
from retrieval.search.engine import SearchEngine
from retrieval.search.options import SearchOptions
from retrieval.search.pairs import find_faces
from tests.live_server import served
from tests.rawfakes import jpeg_bytes, write_dng

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"
EVERYTHING = {"min_score": -1.0, "k": 100}


def _shoot(folder: Path) -> Path:
    """IMG_1 (puppy) and IMG_2 (tent): JPEG + DNG; IMG_3 (rocket): JPEG; IMG_4 (snow): DNG."""
    folder.mkdir()
    for stem, sample, jpeg, raw in (
        ("IMG_1", "puppy.jpg", True, True),
        ("IMG_2", "tent.jpg", True, True),
        ("IMG_3", "rocket.jpg", True, False),
        ("IMG_4", "snow.jpg", False, True),
    ):
        photo = Image.open(SAMPLES / sample).convert("RGB")
        if jpeg:
            shutil.copy(SAMPLES / sample, folder / f"{stem}.JPG")
        if raw:
            write_dng(folder / f"{stem}.dng", photo, preview=jpeg_bytes(photo, 600))
    return folder


@pytest.fixture
def shots(tmp_path, fake_encoder) -> tuple[Path, Path]:
    folder = _shoot(tmp_path / "card")
    root = tmp_path / "library"
    with Library.open(root, create=True) as library:
        report = index_paths(library, fake_encoder, [folder])
    assert report.indexed == 6
    return root, folder


def _search(root: Path, encoder, vector=None, **options):
    with Library.open(root) as library:
        engine = SearchEngine(library, encoder)
        query = vector if vector is not None else encoder.encode_texts(["anything"])[0]
        return engine.search(query, SearchOptions(**options))


def _names(page) -> list[str]:
    return [Path(r.path).name for r in page.results]


def test_find_faces_pairs_raws_with_their_jpegs(shots):
    root, _ = shots
    with Library.open(root) as library:
        rows = library.catalog.get_images(library.catalog.ids())
        faces = find_faces(library.catalog)
    names = {Path(row["path"]).name: i for i, row in rows.items()}
    assert faces == {names["IMG_1.dng"]: names["IMG_1.JPG"], names["IMG_2.dng"]: names["IMG_2.JPG"]}


def test_a_pair_is_listed_once_as_the_jpeg_with_the_raw_noted(shots, fake_encoder):
    root, folder = shots
    page = _search(root, fake_encoder, **EVERYTHING)
    assert sorted(_names(page)) == ["IMG_1.JPG", "IMG_2.JPG", "IMG_3.JPG", "IMG_4.dng"]
    assert page.total == 4
    raws = {Path(r.path).name: r.raw for r in page.results}
    assert raws["IMG_1.JPG"]["path"] == str(folder / "IMG_1.dng")
    assert raws["IMG_2.JPG"]["path"] == str(folder / "IMG_2.dng")
    assert raws["IMG_3.JPG"] is None and raws["IMG_4.dng"] is None
    document = next(r for r in page.results if r.raw is not None).as_dict()
    assert set(document["raw"]) == {"id", "path"}
    assert "raw" not in next(r for r in page.results if r.raw is None).as_dict()


def test_raw_pairs_lists_both_files(shots, fake_encoder):
    root, _ = shots
    page = _search(root, fake_encoder, raw_pairs=True, **EVERYTHING)
    assert len(page.results) == page.total == 6
    assert all(r.raw is None for r in page.results)


def test_paging_through_pairs_never_repeats_or_skips(shots, fake_encoder):
    root, _ = shots
    pages = [_search(root, fake_encoder, k=1, offset=n) for n in range(5)]
    names = [name for page in pages for name in _names(page)]
    assert sorted(names) == ["IMG_1.JPG", "IMG_2.JPG", "IMG_3.JPG", "IMG_4.dng"]


def test_a_filter_that_excludes_the_jpeg_shows_the_raw(shots, fake_encoder):
    root, _ = shots
    page = _search(root, fake_encoder, formats=("raw",), **EVERYTHING)
    assert sorted(_names(page)) == ["IMG_1.dng", "IMG_2.dng", "IMG_4.dng"]
    jpegs = _search(root, fake_encoder, formats=("jpeg",), **EVERYTHING)
    assert sorted(_names(jpegs)) == ["IMG_1.JPG", "IMG_2.JPG", "IMG_3.JPG"]
    assert all(r.raw is None for r in jpegs.results)  # the RAWs are filtered out


def test_a_new_jpeg_pairs_with_an_indexed_raw(shots, fake_encoder):
    root, folder = shots
    shutil.copy(SAMPLES / "snow.jpg", folder / "IMG_4.jpg")
    with Library.open(root) as library:
        engine = SearchEngine(library, fake_encoder)
        vector = fake_encoder.encode_texts(["anything"])[0]
        before = engine.search(vector, SearchOptions(**EVERYTHING))
        index_paths(library, fake_encoder, [folder])
        after = engine.search(vector, SearchOptions(**EVERYTHING))  # same engine: no stale map
    assert "IMG_4.dng" in _names(before)
    assert sorted(_names(after)) == ["IMG_1.JPG", "IMG_2.JPG", "IMG_3.JPG", "IMG_4.jpg"]


def test_rest_and_page_show_the_raw_beside_the_jpeg(shots, fake_encoder, tmp_path):
    root, _ = shots
    with served(root, fake_encoder, index_roots=(tmp_path,)) as (_, http):
        params = {"q": "anything", "min_score": -1, "k": 100}
        hits = http.get("/api/search", params=params).json()["results"]
        both = http.get("/api/search", params={**params, "raw_pairs": "true"}).json()
        thumb = http.get(f"/api/images/{hits[0]['id']}/thumbnail", params={"size": 128})
        raw_hit = next(hit for hit in hits if "raw" in hit)
        raw_file = http.get(raw_hit["raw"]["image_url"])
        dng_id = next(h["id"] for h in both["results"] if h["path"].endswith("IMG_4.dng"))
        dng_thumb = http.get(f"/api/images/{dng_id}/thumbnail", params={"size": 128})
    assert len(hits) == 4 and len(both["results"]) == 6
    assert raw_hit["raw"]["path"].endswith(".dng") and raw_file.status_code == 200
    assert raw_file.content[:4] == b"II*\x00"  # the RAW's own bytes
    assert thumb.status_code == 200
    assert dng_thumb.status_code == 200 and dng_thumb.headers["content-type"] == "image/jpeg"


@pytest.mark.slow
def test_the_pair_ranks_once_where_its_best_member_ranks(tmp_path, spread_checkpoint):
    from indexer.ingest.decode import decode_for_model
    from indexer.model.encoders import load_encoder

    encoder = load_encoder(spread_checkpoint, device="cpu", backend="torch")
    folder = _shoot(tmp_path / "card")
    root = tmp_path / "library"
    with Library.open(root, create=True) as library:
        index_paths(library, encoder, [folder])
    puppy = Image.open(SAMPLES / "puppy.jpg").convert("RGB").resize((320, 256))
    query_path = tmp_path / "query.png"
    puppy.save(query_path)
    vector = encoder.encode_images(decode_for_model(str(query_path))[0][None])[0]
    once = _search(root, encoder, vector, k=3)
    both = _search(root, encoder, vector, k=3, raw_pairs=True)
    assert _names(once)[0] == "IMG_1.JPG" and once.results[0].raw is not None
    assert "IMG_1.dng" not in _names(once)
    assert sorted(_names(both)[:2]) == ["IMG_1.JPG", "IMG_1.dng"]  # the two halves lead
    # The pair keeps its best member's score; a different photo is far below it.
    assert once.results[0].score == pytest.approx(max(r.score for r in both.results[:2]))
    assert np.isclose(both.results[0].score, both.results[1].score, atol=0.05)
    assert once.results[1].score < once.results[0].score - 0.05


def test_raw_rows_come_from_the_partial_index(shots):
    """The pair map reads the RAW rows through ``ix_images_raw`` (no scan of the images
    table, whose rows hold the vectors), both catalog kinds alike, and the frozen suffix
    list of the index is the one RAW decoding uses (a new format needs a new index)."""
    import sqlite3

    from indexer.ingest.raw import RAW_SUFFIXES
    from indexer.store.catalog_reader import CatalogReader
    from indexer.store.rawindex import RAW_FILES_SQL, RAW_SUFFIXES_INDEXED

    assert set(RAW_SUFFIXES_INDEXED) == RAW_SUFFIXES
    root, folder = shots
    path = Library.catalog_path(root)
    with sqlite3.connect(path) as conn:
        plan = " ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {RAW_FILES_SQL}"))
    assert "ix_images_raw" in plan, plan
    with Library.open(root) as library:
        written = sorted(library.catalog.raw_files())
    reader = CatalogReader(path)
    try:
        assert sorted(reader.raw_files()) == written
    finally:
        reader.close()
    assert [Path(p).name for _, p in written] == ["IMG_1.dng", "IMG_2.dng", "IMG_4.dng"]
    assert all(Path(p).parent == folder for _, p in written)
