"""The stdlib catalog reader answers every read exactly as the SQLAlchemy catalog does.

A query opens the catalog through :class:`~indexer.store.catalog_reader.CatalogReader`
(no SQLAlchemy import, ~0.3 s of a cold query): same rows, same types, same damage checks
and messages, readable while an indexer holds a write transaction, and a file it was not
written for (a schema to migrate, or one from a newer clipdex) goes to the full catalog.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from indexer.errors import LibraryDamaged, LibraryError
from indexer.model.identity import l2_normalise
from indexer.paths import ESCAPE
from indexer.store import catalog as catalog_module
from indexer.store.catalog import Catalog, ImageRecord
from indexer.store.catalog_reader import READABLE_SCHEMAS, CatalogReader, ReaderUnavailable
from indexer.store.library import Library
from retrieval.search.filters import ImageFilter, filter_sql

# Paths a filesystem can hold that the catalog stores escaped (see indexer/paths.py).
ODD_PATHS = ["/photos/caf\udce9.jpg", f"/photos/lit{ESCAPE}eral.jpg", "/photos/[x] *.png"]


def _records(count: int) -> list[ImageRecord]:
    rng = np.random.default_rng(3)
    vectors = l2_normalise(rng.standard_normal((count, 512)))
    records = []
    for i in range(count):
        path = ODD_PATHS[i] if i < len(ODD_PATHS) else f"/photos/{i // 5}/img_{i:03d}.jpg"
        records.append(
            ImageRecord(
                path=path,
                size=1000 + i,
                mtime_ns=1_600_000_000_000_000_000 + i * 86_400_000_000_000,
                sha256=f"{i:064x}",
                vector=vectors[i],
                width=640 + i,
                height=480,
                format=("JPEG", "PNG", "HEIF")[i % 3],
                taken_at=dt.datetime(2020, 1 + i % 12, 1, 12, 30, i % 60) if i % 2 else None,
                camera_make="NIKON CORPORATION" if i % 4 == 1 else None,
                camera_model="D750" if i % 4 == 1 else None,
                gps_lat=48.85 + i / 100 if i % 5 == 0 else None,
                gps_lon=2.35 if i % 5 == 0 else None,
            )
        )
    return records


@pytest.fixture
def catalog_path(tmp_path) -> Path:
    """A catalog with images (odd paths included), failures, tags and a generation."""
    path = tmp_path / "catalog.sqlite"
    catalog = Catalog(path)
    catalog.set_meta("model", '{"weights": "fake"}')
    ids = catalog.commit_batch(
        _records(23),
        failed=[("/photos/bad.jpg", 10, 1, "truncated"), (ODD_PATHS[0] + "x", 1, 1, "x")],
    )
    catalog.store_tags("set-1", {ids[1]: [("Cat", 0.9), ("sofa", 0.4)], ids[2]: [("cat", 0.8)]})
    catalog.close()
    return path


@pytest.fixture
def both(catalog_path):
    catalog, reader = Catalog(catalog_path), CatalogReader(catalog_path)
    yield catalog, reader
    catalog.close()
    reader.close()


def test_every_read_answers_as_the_catalog(both):
    catalog, reader = both
    ids = catalog.ids().tolist()
    asked = [*ids[::-1], 999_999]  # any order, and an id that does not exist
    assert reader.ids().tolist() == ids and reader.ids().dtype == np.int64
    for key in ("model", "generation", "schema_version", "absent"):
        assert reader.get_meta(key) == catalog.get_meta(key)
    assert reader.generation() == catalog.generation() > 0
    assert (reader.count(), reader.failure_count()) == (catalog.count(), catalog.failure_count())
    assert reader.get_images(asked) == catalog.get_images(asked)
    assert reader.get_images([]) == catalog.get_images([]) == {}
    for path in [*ODD_PATHS, "/photos/0/img_003.jpg", "/nowhere.jpg"]:
        assert reader.id_for_path(path) == catalog.id_for_path(path)
    for mine, theirs in zip(reader.vectors(asked), catalog.vectors(asked)):
        assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs)
    assert all(
        np.array_equal(a, b)
        for mine, theirs in zip(reader.iter_vectors(batch=7), catalog.iter_vectors(batch=7))
        for a, b in zip(mine, theirs)
    )
    assert reader.formats() == catalog.formats()
    assert reader.list_failures() == catalog.list_failures()
    assert reader.has_tags() and catalog.has_tags()
    assert reader.tag_counts() == catalog.tag_counts()
    assert reader.tags_for(asked) == catalog.tags_for(asked)


def test_types_are_the_catalogs(both):
    catalog, reader = both
    for mine, theirs in zip(
        reader.get_images(catalog.ids()).values(), catalog.get_images(catalog.ids()).values()
    ):
        assert {k: type(v) for k, v in mine.items()} == {k: type(v) for k, v in theirs.items()}
    taken = [row["taken_at"] for row in reader.get_images(catalog.ids()).values()]
    assert any(isinstance(t, dt.datetime) for t in taken) and None in taken


@pytest.mark.parametrize(
    "spec",
    [
        ImageFilter(after=dt.datetime(2020, 4, 1)),
        ImageFilter(before=dt.datetime(2020, 9, 15), after=dt.datetime(2020, 2, 1)),
        ImageFilter(folders=("/photos/1", "/photos/*3")),
        ImageFilter(folders=("/photos/[[]x] *",)),
        ImageFilter(camera="nikon d750"),
        ImageFilter(min_long=650, min_short=480),
        ImageFilter(formats=("PNG", "HEIF")),
        ImageFilter(tags=("CAT",)),
        ImageFilter(tags=("cat", "sofa"), formats=("PNG",)),
    ],
)
def test_filtered_ids_are_the_catalogs(both, spec):
    catalog, reader = both
    where, params = filter_sql(spec)
    expected = catalog.ids_where(where, params)
    assert reader.ids_where(where, params).tolist() == expected.tolist()


def test_library_opened_read_only_uses_the_reader(catalog_path):
    root = catalog_path.parent
    with Library.open(root) as library:
        assert isinstance(library.catalog, Catalog)
        library.checkpoint()
        library.compact()  # the 23 vectors into a base file, which the read-only open maps
    with Library.open(root, read_only=True) as library:
        assert isinstance(library.catalog, CatalogReader)
        assert library.index.mmapped and len(library.index) == 23
        assert not library.refresh()


def test_a_replaced_catalog_is_read_again_read_only(catalog_path, tmp_path):
    """`clipdex repair` renames a salvaged catalog in: a reading library opens the new file."""
    root = catalog_path.parent
    with Library.open(root) as library:
        library.checkpoint()
    salvaged = tmp_path / "salvaged.sqlite"
    with sqlite3.connect(catalog_path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    salvaged.write_bytes(catalog_path.read_bytes())
    with sqlite3.connect(salvaged) as conn:
        conn.execute("DELETE FROM images WHERE id > 5")
        conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
    conn.close()
    with Library.open(root, read_only=True) as library:
        os.replace(salvaged, catalog_path)
        assert library.refresh()
        assert isinstance(library.catalog, CatalogReader)
        assert library.catalog.count() == 5 and len(library.index) == 5


def test_a_write_asked_of_the_reader_is_a_clear_error(both):
    _, reader = both
    with pytest.raises(LibraryError, match="opened read-only"):
        reader.set_meta("model", "x")
    with pytest.raises(AttributeError):
        reader.no_such_method()


def test_reads_while_a_writer_holds_a_transaction(catalog_path):
    writer = sqlite3.connect(catalog_path, isolation_level=None, timeout=1)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("DELETE FROM images WHERE id > 3")
    reader = CatalogReader(catalog_path)
    try:
        assert reader.count() == 23  # the last committed state, without waiting
        writer.execute("COMMIT")
        assert reader.count() == 3
    finally:
        reader.close()
        writer.close()


@pytest.mark.parametrize("version", ["2", "99"])
def test_a_schema_it_was_not_written_for_goes_to_the_full_catalog(catalog_path, version):
    with sqlite3.connect(catalog_path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
    conn.close()
    with pytest.raises(ReaderUnavailable):
        CatalogReader(catalog_path)
    if version == "99":  # the full catalog refuses it, with its own message
        with pytest.raises(LibraryError, match="upgrade clipdex"):
            Library.open(catalog_path.parent, read_only=True)
    else:  # ... or migrates it
        with Library.open(catalog_path.parent, read_only=True) as library:
            assert isinstance(library.catalog, Catalog)


def test_it_knows_the_catalogs_schema():
    assert catalog_module.SCHEMA_VERSION in READABLE_SCHEMAS


# -- damage: the same checks and messages as the catalog ---------------------------------------
def _truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size * 6 // 10)


def _overwrite_images_root(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root_page,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name='images'"
        ).fetchone()
    conn.close()
    with open(path, "r+b") as handle:
        handle.seek((root_page - 1) * page_size)
        handle.write(np.random.default_rng(0).bytes(page_size))


def _not_sqlite(path: Path) -> None:
    path.write_bytes(b"this is not SQLite" * 100)


@pytest.mark.parametrize("damage", [_truncate, _overwrite_images_root, _not_sqlite])
def test_damage_is_refused_with_the_catalogs_message(catalog_path, damage):
    _big_enough(catalog_path)
    damage(catalog_path)
    with pytest.raises(LibraryDamaged) as theirs:
        Catalog(catalog_path)
    with pytest.raises(LibraryDamaged) as mine:
        CatalogReader(catalog_path)
    assert "clipdex repair" in str(mine.value)
    assert str(mine.value) == str(theirs.value)


def test_an_unsound_stored_vector_is_damage(both, catalog_path):
    catalog, reader = both
    with sqlite3.connect(catalog_path) as conn:
        conn.execute("UPDATE images SET vector = zeroblob(2048) WHERE id = 2")
    conn.close()
    with pytest.raises(LibraryDamaged, match="stored vector of image 2") as mine:
        reader.vectors([1, 2])
    with pytest.raises(LibraryDamaged) as theirs:
        catalog.vectors([1, 2])
    assert str(mine.value) == str(theirs.value)


def _big_enough(path: Path) -> None:
    """Enough rows that truncating the file cuts into table pages, then a checkpoint."""
    catalog = Catalog(path)
    catalog.commit_batch(_records(400)[23:])
    catalog.close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def test_a_kind_filter_on_a_catalog_from_before_videos_treats_every_row_as_a_photo(
    catalog_path,
):
    """A library indexed before schema 6 has no kind column (and no video): `--kind photo`
    keeps every row, `--kind video` none, read-only (no migration) and without SQL errors."""
    conn = sqlite3.connect(catalog_path)
    with conn:
        conn.execute("DROP INDEX ix_images_video")  # schema 9's, on the kind column
        for column in ("kind", "duration", "codec", "frame_time"):
            conn.execute(f"ALTER TABLE images DROP COLUMN {column}")
        conn.execute("DROP TABLE frames")
        conn.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
    everyone = [row[0] for row in conn.execute("SELECT id FROM images ORDER BY id")]
    conn.close()
    reader = CatalogReader(catalog_path)
    try:
        for spec, expected in [
            (ImageFilter(kind="photo"), everyone),
            (ImageFilter(kind="video"), []),
            (ImageFilter(kind="photo", formats=("PNG",)), None),
        ]:
            found = reader.ids_where(*filter_sql(spec)).tolist()
            if expected is None:  # the other filters still apply
                expected = reader.ids_where(*filter_sql(ImageFilter(formats=("PNG",)))).tolist()
                assert 0 < len(expected) < len(everyone)
            assert found == expected, spec
    finally:
        reader.close()
