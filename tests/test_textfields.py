"""Words stored per photo: EXIF/IPTC/XMP captions and keywords, name and folder words, FTS5.

Fixtures are written by tests/textphotos.py (Pillow for EXIF, raw APP13/APP1 segments for
IPTC/XMP), including garbage, mixed encodings and oversized packets.
"""

from __future__ import annotations

import io
import os
import sqlite3

import pytest
from PIL import PngImagePlugin

from indexer.ingest import textfields
from indexer.ingest.decode import open_rgb
from indexer.ingest.pipeline import index_paths
from indexer.store import textindex
from indexer.store.catalog import SCHEMA_VERSION, Catalog
from indexer.store.library import Library
from tests import textphotos as tp


def texts_of(data: bytes) -> dict[str, str]:
    _img, info = open_rgb(data)
    return {source: text for source, text, _ in info.texts}


def fts_ids(catalog_path, term: str, source: str | None = None) -> set[int]:
    """Image ids whose words match ``term`` (as the query side will ask)."""
    sql = "SELECT image_id FROM text_fts WHERE text_fts MATCH ?"
    params: tuple = (textindex.fts_phrase(term),)
    if source:
        sql += " AND source = ?"
        params += (source,)
    with sqlite3.connect(catalog_path) as conn:
        return {row[0] for row in conn.execute(sql, params)}


# -- extraction -----------------------------------------------------------------------------------
def test_iptc_xmp_and_exif_fields_are_extracted():
    segments = [
        tp.app13_segment(tp.iptc_block(["Rome", "Colosseum"], "Evening walk in Trastevere")),
        tp.xmp_segment(
            tp.xmp_packet(
                subjects=["holiday", "Rome"],
                description="Sunset over the Tiber",
                hierarchical=["Places|Italy|Rome"],
                digikam=["People/Anna"],
            )
        ),
    ]
    data = tp.jpeg_bytes(
        description="Old town", user_comment=b"ASCII\x00\x00\x00Ancient stones", segments=segments
    )
    texts = texts_of(data)
    keywords = texts["keywords"].split("; ")
    assert {"Rome", "Colosseum", "holiday", "Places|Italy|Rome", "People/Anna"} <= set(keywords)
    assert keywords.count("Rome") == 1  # the same keyword from IPTC and XMP is kept once
    for phrase in (
        "Old town",
        "Ancient stones",
        "Evening walk in Trastevere",
        "Sunset over the Tiber",
    ):
        assert phrase in texts["description"]


@pytest.mark.parametrize(
    ("encoding", "declared"), [("utf-8", True), ("utf-8", False), ("latin-1", False)]
)
def test_iptc_text_in_each_encoding_reads_as_written(encoding, declared):
    block = tp.iptc_block(
        ["Café", "Zürich", "niño"], "Crème brûlée", encoding=encoding, declare_utf8=declared
    )
    texts = texts_of(tp.jpeg_bytes(segments=[tp.app13_segment(block)]))
    assert texts["keywords"] == "Café; Zürich; niño"
    assert texts["description"] == "Crème brûlée"


def test_mixed_encodings_in_one_block_each_keyword_readable():
    """Legacy writers mix: one keyword UTF-8, the next Latin-1, no CodedCharacterSet."""
    raw = [(2, 25, "Málaga".encode()), (2, 25, "Córdoba".encode("latin-1"))]
    block = tp.iptc_block(declare_utf8=False, raw=raw)
    texts = texts_of(tp.jpeg_bytes(segments=[tp.app13_segment(block)]))
    assert texts["keywords"] == "Málaga; Córdoba"


def test_garbage_metadata_gives_clean_text_or_none_and_the_photo_indexes():
    garbage = bytes(range(256)) * 8
    segments = [
        tp.app13_segment(
            tp.iptc_block(["good"], raw=[(2, 25, garbage[:300]), (2, 120, garbage[:500])])
        ),
        tp.app13_segment(b"\x1c\x02\x19\xff\xff" + garbage),  # a length past the end
        tp._segment(0xED, b"Photoshop 3.0\x008BIM\x04\x04\x00" + garbage[:100]),  # cut resource
        tp.xmp_segment(b"<x:xmpmeta><dc:subject><rdf:Bag><rdf:li>" + garbage[:2000]),
    ]
    data = tp.jpeg_bytes(user_comment=b"UNICODE\x00" + garbage[:64], segments=segments)
    img, info = open_rgb(data)
    assert img.size == (160, 120)
    texts = {source: text for source, text, _ in info.texts}
    assert texts["keywords"] == "good"
    for text in texts.values():
        assert all(ch.isprintable() for ch in text) and "\ufffd" not in text


def test_a_huge_or_hostile_xmp_packet_is_read_only_up_to_the_cap():
    """Keywords past MAX_XMP_BYTES are not read; unclosed elements cost one scan."""
    filler = "<dc:subject" * 20_000  # unclosed opens: each would rescan the packet if naive
    late = tp.xmp_packet(subjects=["beyond"]).decode()
    packet = (
        tp.xmp_packet(subjects=["early"]).decode() + filler + " " * textfields.MAX_XMP_BYTES + late
    )
    png = io.BytesIO()
    meta = PngImagePlugin.PngInfo()
    meta.add_itxt("XML:com.adobe.xmp", packet)
    tp.synthetic_background(64, 48, seed=2).save(png, "PNG", pnginfo=meta)
    try:
        texts = texts_of(png.getvalue())
    except Exception as exc:  # Pillow may itself refuse a text chunk this large
        pytest.skip(f"Pillow refuses the PNG text chunk: {exc}")
    assert texts.get("keywords") == "early"


def test_more_keywords_than_the_cap_are_cut():
    many = [f"kw{i}" for i in range(textfields.MAX_ITEMS + 50)]
    texts = texts_of(tp.jpeg_bytes(segments=[tp.app13_segment(tp.iptc_block(many))]))
    assert len(texts["keywords"].split("; ")) == textfields.MAX_ITEMS


def test_path_words():
    assert textindex.name_words("/p/IMG_2034.JPG") == "IMG 2034"
    assert textindex.name_words("/p/myHolidayInRome.jpg") == "my Holiday In Rome myHolidayInRome"
    assert textindex.folder_words("/p/Italy 2019/day-1/a.jpg", ["/p"]) == "p / Italy 2019 / day-1"
    assert textindex.folder_words("/a/b/c/d/e/f.jpg") == "c / d / e"  # root unknown: last 3


# -- in the catalog -------------------------------------------------------------------------------
@pytest.fixture
def library(tmp_path):
    with Library.open(tmp_path / "lib", create=True) as lib:
        yield lib


def keyword_photo(path, words, caption=None):
    xmp = tp.xmp_segment(tp.xmp_packet(subjects=words, description=caption))
    return tp.write_jpeg(
        path, image=tp.synthetic_background(96, 64, seed=len(words)), segments=[xmp]
    )


def test_indexed_words_are_searchable_with_accents_folded_and_cjk(library, tmp_path, fake_encoder):
    root = tmp_path / "photos"
    keyword_photo(root / "Italy 2019" / "beachDay.jpg", ["Café del Mar"], "Tramonto sul mare")
    keyword_photo(root / "tokyo" / "night.jpg", ["東京タワー"])
    tp.write_jpeg(root / "other" / "plain.jpg")
    index_paths(library, fake_encoder, [root])
    ids = {os.path.basename(p): i for p, i in _paths(library).items()}
    db = library.catalog.path
    assert fts_ids(db, "cafe") == {ids["beachDay.jpg"]}  # accents folded
    assert fts_ids(db, "tramonto", "description") == {ids["beachDay.jpg"]}
    assert fts_ids(db, "italy", "folder") == {ids["beachDay.jpg"]}
    assert fts_ids(db, "beach", "name") == {ids["beachDay.jpg"]}
    assert fts_ids(db, "東京") == {ids["night.jpg"]}  # CJK inside a word, by characters
    assert fts_ids(db, "タワー") == {ids["night.jpg"]}
    assert fts_ids(db, "photos") == set(ids.values())  # the root's own name is a folder word


def _paths(library) -> dict[str, int]:
    rows = library.catalog.get_images(library.catalog.ids())
    return {row["path"]: image_id for image_id, row in rows.items()}


def test_rename_reuses_content_words_and_takes_the_new_name(library, tmp_path, fake_encoder):
    root = tmp_path / "photos"
    keyword_photo(root / "a" / "first.jpg", ["lighthouse"])
    index_paths(library, fake_encoder, [root])
    os.rename(root / "a", root / "b")
    os.rename(root / "b" / "first.jpg", root / "b" / "second.jpg")
    fake_encoder.images_encoded = 0
    report = index_paths(library, fake_encoder, [root])
    assert report.reused == 1 and fake_encoder.images_encoded == 0
    (image_id,) = library.catalog.ids()
    texts = dict((s, t) for s, t, _ in library.catalog.texts_for([image_id])[image_id])
    assert texts == {"name": "second", "folder": "photos / b", "keywords": "lighthouse"}
    db = library.catalog.path
    assert fts_ids(db, "first") == set() and fts_ids(db, "second") == {image_id}


def test_removed_and_replaced_photos_leave_the_text_index(library, tmp_path, fake_encoder):
    root = tmp_path / "photos"
    photo = keyword_photo(root / "x.jpg", ["alpha"])
    keyword_photo(root / "y.jpg", ["beta", "gamma"])
    index_paths(library, fake_encoder, [root])
    keyword_photo(photo, ["delta"])  # replaced content
    os.utime(photo, ns=(1, 1))
    os.remove(root / "y.jpg")
    index_paths(library, fake_encoder, [root])
    db = library.catalog.path
    assert fts_ids(db, "alpha") == fts_ids(db, "beta") == set()
    (image_id,) = library.catalog.ids()
    assert fts_ids(db, "delta") == {image_id}
    with sqlite3.connect(db) as conn:  # index and table hold the same rows
        (fts,) = conn.execute("SELECT count(*) FROM text_fts").fetchone()
        (rows,) = conn.execute("SELECT count(*) FROM image_text").fetchone()
    assert fts == rows == 3  # name, folder, keywords of the one photo left


def test_a_schema_6_library_gains_name_and_folder_words(tmp_path):
    path = tmp_path / "catalog.sqlite"
    Catalog(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TRIGGER image_text_fts_delete")
        conn.execute("DROP TABLE text_fts")
        conn.execute("DROP TABLE image_text")
        for name in ("/lib/Trip Norway/fjordView.jpg", "/lib/home/cat.jpg"):
            conn.execute(
                "INSERT INTO images (path, size, mtime_ns, sha256, width, height, "
                "indexed_at, vector) VALUES (?, 1, 2, 'ab', 3, 4, '2020-01-01', x'00')",
                (name,),
            )
        conn.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    conn.close()
    catalog = Catalog(path)
    try:
        assert catalog.get_meta("schema_version") == str(SCHEMA_VERSION)
        texts = catalog.texts_for([1, 2])
        assert texts[1] == [
            ("name", "fjord View fjordView", None),
            ("folder", "lib / Trip Norway", None),
        ]
        assert texts[2][0] == ("name", "cat", None)
    finally:
        catalog.close()
    assert fts_ids(path, "norway", "folder") == {1}
    Catalog(path).close()  # opening again adds nothing twice
    assert fts_ids(path, "cat") == {2}
