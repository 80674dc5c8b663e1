"""Only the file that was catalogued is served: identities recorded, checked, refreshed.

The catalog records each photo's (device, inode) when it is indexed (schema 4) and its
real path (schema 5); the server opens that path without following a symlink on any
component, fstat()s the descriptor and serves it only when it is that very file (same
device, inode, size and mtime; rows from before schema 4: size and mtime). A symlink
swapped in, or a file replaced since, is a 404 ``file_changed`` naming `clipdex index`,
never the bytes; indexing again records the new identity. Swapped folders, thumbnails and
the re-index queue: tests/test_hostile_files.py.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from indexer.fsutil import file_key
from indexer.ingest.pipeline import index_paths
from indexer.store.catalog import SCHEMA_VERSION, Catalog
from indexer.store.library import Library
from tests.live_server import served
from tests.test_server import assert_error

SECRET = b"root:x:0:0:not a photo, and never to be served\n"


@pytest.fixture
def scene(tmp_path, photo_folder, fake_encoder) -> dict:
    root = tmp_path / "library"
    with Library.open(root, create=True) as lib:
        index_paths(lib, fake_encoder, [photo_folder])
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    return {"library": root, "photos": photo_folder, "secret": secret}


def image_id(library: Path, path: Path) -> int:
    with Library.open(library) as lib:
        found = lib.catalog.id_for_path(str(path))
    assert found is not None, path
    return found


def row_of(library: Path, path: Path) -> dict:
    with Library.open(library) as lib:
        return lib.catalog.get_images([image_id(library, path)]).popitem()[1]


def forget_identities(library: Path) -> None:
    """Make every row look like one from before schema 4 (no identity recorded)."""
    with sqlite3.connect(Library.catalog_path(library)) as conn:
        conn.execute("UPDATE images SET device = NULL, inode = NULL")
    conn.close()


def assert_refused(response, secret: bytes = SECRET) -> None:
    error = assert_error(response, 404, "file_changed")
    assert "clipdex index" in error["message"]
    assert secret not in response.content


# -- recorded -------------------------------------------------------------------------------
def test_indexing_records_each_files_device_and_inode(scene):
    photo = scene["photos"] / "photo_0.jpg"
    row = row_of(scene["library"], photo)
    assert (row["device"], row["inode"]) == file_key(os.stat(photo))


def test_a_schema_3_catalog_gains_the_columns_empty(tmp_path):
    path = tmp_path / "catalog.sqlite"
    Catalog(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO images (path, size, mtime_ns, sha256, width, height, "
            "indexed_at, vector) VALUES ('/p.jpg', 1, 2, 'ab', 3, 4, '2020-01-01', x'00')"
        )
        conn.execute("ALTER TABLE images DROP COLUMN device")
        conn.execute("ALTER TABLE images DROP COLUMN inode")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    conn.close()
    catalog = Catalog(path)
    try:
        assert catalog.get_meta("schema_version") == str(SCHEMA_VERSION)
        (row,) = catalog.get_images([1]).values()
        assert row["device"] is None and row["inode"] is None
    finally:
        catalog.close()


def test_indexing_again_fills_in_identities_of_old_rows(scene, fake_encoder):
    forget_identities(scene["library"])
    with Library.open(scene["library"]) as lib:
        report = index_paths(lib, fake_encoder, [scene["photos"]])
    assert report.unchanged == 6 and report.indexed == 0
    photo = scene["photos"] / "photo_1.jpg"
    assert (row_of(scene["library"], photo)["inode"]) == file_key(os.stat(photo))[1]


def test_a_file_replaced_with_the_same_size_and_mtime_is_indexed_again(scene, fake_encoder):
    photo = scene["photos"] / "photo_2.jpg"
    before = row_of(scene["library"], photo)
    replace_keeping_stat(photo)
    with Library.open(scene["library"]) as lib:
        report = index_paths(lib, fake_encoder, [scene["photos"]])
    assert report.unchanged == 5 and report.reused == 1  # same bytes: the vector is reused
    after = row_of(scene["library"], photo)
    assert after["inode"] == file_key(os.stat(photo))[1] != before["inode"]


def replace_keeping_stat(photo: Path) -> None:
    """A new file (new inode) with the same bytes, size and mtime at the same path."""
    stat = os.stat(photo)
    copy = photo.with_name("copy.tmp")
    shutil.copyfile(photo, copy)
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(copy, photo)


# -- served or refused ------------------------------------------------------------------------
def test_an_untouched_file_is_served_whole_and_in_ranges(scene, fake_encoder):
    photo = scene["photos"] / "photo_3.jpg"
    target = image_id(scene["library"], photo)
    with served(scene["library"], fake_encoder) as (_, client):
        whole = client.get(f"/api/images/{target}/file")
        assert whole.status_code == 200 and whole.content == photo.read_bytes()
        part = client.get(f"/api/images/{target}/file", headers={"Range": "bytes=10-19"})
        assert part.status_code == 206 and part.content == photo.read_bytes()[10:20]
        assert client.get(f"/api/images/{target}/thumbnail").status_code == 200


def test_a_symlink_swapped_in_is_refused(scene, fake_encoder):
    photo = scene["photos"] / "photo_4.jpg"
    target = image_id(scene["library"], photo)
    photo.unlink()
    photo.symlink_to(scene["secret"])
    with served(scene["library"], fake_encoder) as (_, client):
        assert_refused(client.get(f"/api/images/{target}/file"))
        assert_refused(client.get(f"/api/images/{target}/thumbnail"))


def test_a_symlink_to_another_photo_is_refused_too(scene, fake_encoder):
    """Even a link to a readable image: it is not the file that was catalogued."""
    photo = scene["photos"] / "photo_4.jpg"
    target = image_id(scene["library"], photo)
    photo.unlink()
    photo.symlink_to(scene["photos"] / "photo_5.jpg")
    with served(scene["library"], fake_encoder) as (_, client):
        assert_refused(client.get(f"/api/images/{target}/file"))


def test_a_replaced_file_is_refused_until_indexed_again(scene, fake_encoder):
    photo = scene["photos"] / "photo_5.jpg"
    target = image_id(scene["library"], photo)
    replace_keeping_stat(photo)  # same bytes and stat: only the inode tells
    with served(scene["library"], fake_encoder) as (_, client):
        assert_refused(client.get(f"/api/images/{target}/file"))
    with Library.open(scene["library"]) as lib:
        index_paths(lib, fake_encoder, [scene["photos"]])
    again = image_id(scene["library"], photo)
    with served(scene["library"], fake_encoder) as (_, client):
        assert client.get(f"/api/images/{again}/file").content == photo.read_bytes()


def test_a_photo_catalogued_through_the_users_own_link_is_served(tmp_path, fake_encoder):
    """`clipdex index` follows a user's links; the identity is the target's, so it serves."""
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    photos.mkdir()
    elsewhere.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30), (9, 90, 9)).save(elsewhere / "far.jpg")
    (photos / "linked.jpg").symlink_to(elsewhere / "far.jpg")
    library = tmp_path / "library"
    with Library.open(library, create=True) as lib:
        index_paths(lib, fake_encoder, [photos])
    target = image_id(library, photos / "linked.jpg")
    with served(library, fake_encoder) as (_, client):
        served_bytes = client.get(f"/api/images/{target}/file").content
    assert served_bytes == (elsewhere / "far.jpg").read_bytes()


def test_old_rows_without_identity_fall_back_to_size_and_mtime(scene, fake_encoder):
    forget_identities(scene["library"])
    photos = scene["photos"]
    kept, touched, linked = (
        image_id(scene["library"], photos / f"photo_{i}.jpg") for i in (0, 1, 2)
    )
    os.utime(photos / "photo_1.jpg", ns=(1, 10**18))  # another mtime: not the file indexed
    (photos / "photo_2.jpg").unlink()
    (photos / "photo_2.jpg").symlink_to(scene["secret"])  # a link: refused without following
    with served(scene["library"], fake_encoder) as (_, client):
        response = client.get(f"/api/images/{kept}/file")
        assert response.content == (photos / "photo_0.jpg").read_bytes()
        assert_refused(client.get(f"/api/images/{touched}/file"))
        assert_refused(client.get(f"/api/images/{linked}/file"))
