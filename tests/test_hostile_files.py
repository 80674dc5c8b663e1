"""Hostile files: the server serves and thumbnails only the very file that was catalogued.

Issue 14, item 3. Someone who can write in a photo folder (a shared or synced folder, an
unpacked archive) swaps a photo, a link at the photo, or a link in place of a folder above
it, to make the server hand out another file (``/etc/passwd``, the token file) or a wrong
thumbnail. The server opens the *real* path recorded at indexing without following a link
on any component, checks device, inode, size and mtime on the open descriptor, answers 404
``file_changed`` and queues the photo for re-indexing; thumbnails are keyed by the open
file's stamp, so they are never stale or another file's. The next ``index`` re-reads a
queued photo even when its stat looks unchanged, which clears the mark. Through all of
it ``/readyz`` and a normal search keep answering correctly.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from indexer.ingest.pipeline import index_paths
from indexer.store.catalog import SCHEMA_VERSION, Catalog
from indexer.store.catalog_reader import CatalogReader
from indexer.store.library import Library
from retrieval import Collection
from retrieval.cli import app
from tests.live_server import served
from tests.test_server import assert_error

SECRET = b"root:x:0:0:not a photo, and never to be served\n"
DEADLINE = 30.0  # seconds a health check or a search may take under the hostile load


# -- a library over photos/album/, a secret beside it ------------------------------------------
def make_photo(path: Path, colour: tuple[int, int, int], size=(96, 64)) -> Path:
    Image.new("RGB", size, colour).save(path, "JPEG", quality=90)
    return path


@pytest.fixture
def scene(tmp_path, fake_encoder) -> dict:
    photos = tmp_path / "photos"
    album = photos / "album"
    album.mkdir(parents=True)
    for i in range(4):
        make_photo(album / f"photo_{i}.jpg", (40 * i + 20, 200 - 40 * i, 90))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    make_photo(elsewhere / "photo_0.jpg", (250, 0, 250))  # another photo, the same name
    secret = tmp_path / "secret.txt"
    secret.write_bytes(SECRET)
    library = tmp_path / "library"
    with Library.open(library, create=True) as lib:
        index_paths(lib, fake_encoder, [photos])
    return {"library": library, "photos": photos, "album": album, "elsewhere": elsewhere,
            "secret": secret}  # fmt: skip


def image_id(library: Path, path: Path) -> int:
    with Library.open(library) as lib:
        found = lib.catalog.id_for_path(str(path))
    assert found is not None, path
    return found


def queued(library: Path) -> int:
    with Library.open(library) as lib:
        return lib.catalog.reindex_count()


def assert_refused(response, *forbidden: bytes) -> None:
    error = assert_error(response, 404, "file_changed")
    assert "clipdex index" in error["message"]
    for content in (SECRET, *forbidden):
        assert content not in response.content


def assert_healthy(client) -> None:
    """/readyz says ready and a normal search answers with photos, within the deadline."""
    ready = client.get("/readyz", timeout=DEADLINE)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    found = client.get("/api/search", params={"q": "a photo", "k": 3}, timeout=DEADLINE)
    assert found.status_code == 200, found.text
    assert len(found.json()["results"]) == 3


def thumbnail_of(path: Path, size: int = 256) -> Image.Image:
    with Image.open(path) as image:
        image.thumbnail((size, size))
        return image.convert("RGB")


def served_colour(content: bytes) -> tuple[int, ...]:
    """The centre pixel of a served image (JPEG: compare with a tolerance)."""
    import io

    with Image.open(io.BytesIO(content)) as image:
        return image.convert("RGB").getpixel((image.width // 2, image.height // 2))


def near(a: tuple[int, ...], b: tuple[int, ...], tolerance: int = 12) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


# -- swaps --------------------------------------------------------------------------------------
def test_a_file_swapped_for_another_photo_is_refused_and_queued(scene, fake_encoder):
    photo = scene["album"] / "photo_1.jpg"
    target = image_id(scene["library"], photo)
    replacement = make_photo(scene["album"] / "new.tmp", (1, 2, 3))
    os.replace(replacement, photo)  # a new inode, other bytes, size and mtime
    with served(scene["library"], fake_encoder) as (_, client):
        assert_refused(client.get(f"/api/images/{target}/file"), photo.read_bytes())
        assert_refused(client.get(f"/api/images/{target}/thumbnail"))
        assert client.get("/api/info").json()["reindex_queued"] == 1
        assert_healthy(client)
    assert queued(scene["library"]) == 1


def test_a_symlink_at_the_leaf_is_refused(scene, fake_encoder):
    photo = scene["album"] / "photo_2.jpg"
    target = image_id(scene["library"], photo)
    photo.unlink()
    photo.symlink_to(scene["secret"])
    with served(scene["library"], fake_encoder) as (_, client):
        assert_refused(client.get(f"/api/images/{target}/file"))
        assert_refused(client.get(f"/api/images/{target}/thumbnail"))
        assert_healthy(client)


def swap_parent(scene: dict, into: Path) -> None:
    """Rename the album away and put a symlink to ``into`` in its place."""
    scene["album"].rename(scene["photos"] / "album.moved")
    scene["album"].symlink_to(into, target_is_directory=True)


def test_a_swapped_parent_folder_is_refused(scene, fake_encoder):
    """album/ renamed away, a link to a folder holding another photo_0.jpg put there."""
    photo = scene["album"] / "photo_0.jpg"
    target = image_id(scene["library"], photo)
    swap_parent(scene, scene["elsewhere"])
    other = (scene["elsewhere"] / "photo_0.jpg").read_bytes()
    with served(scene["library"], fake_encoder) as (_, client):
        assert_refused(client.get(f"/api/images/{target}/file"), other)
        assert_refused(client.get(f"/api/images/{target}/thumbnail"))
        assert client.get("/api/info").json()["reindex_queued"] == 1
        assert_healthy(client)


def test_a_link_on_the_path_is_refused_even_to_the_very_same_file(scene, fake_encoder):
    """The walk refuses the link itself: here it leads to a hard link of the catalogued
    photo (same device, inode, size and mtime), which an identity check alone would pass."""
    photo = scene["album"] / "photo_3.jpg"
    target = image_id(scene["library"], photo)
    twin = scene["elsewhere"] / "twin"
    twin.mkdir()
    os.link(photo, twin / "photo_3.jpg")
    swap_parent(scene, twin)
    with served(scene["library"], fake_encoder) as (_, client):
        assert_refused(client.get(f"/api/images/{target}/file"))


def test_a_link_higher_up_the_path_is_refused(scene, fake_encoder):
    """photos/ itself (two levels above the photo) swapped for a link to a copy of it."""
    photo = scene["album"] / "photo_1.jpg"
    target = image_id(scene["library"], photo)
    copy = scene["photos"].parent / "copy"
    scene["photos"].rename(copy)
    scene["photos"].symlink_to(copy, target_is_directory=True)
    with served(scene["library"], fake_encoder) as (_, client):
        assert_refused(client.get(f"/api/images/{target}/file"))


# -- thumbnails --------------------------------------------------------------------------------
def test_a_swapped_then_restored_photo_shows_its_own_thumbnail(scene, fake_encoder):
    photo = scene["album"] / "photo_1.jpg"
    target = image_id(scene["library"], photo)
    own = served_colour((photo).read_bytes())
    with served(scene["library"], fake_encoder) as (_, client):
        before = client.get(f"/api/images/{target}/thumbnail")
        assert before.status_code == 200 and near(served_colour(before.content), own)
        photo.rename(scene["album"] / "photo_1.bak")
        make_photo(photo, (250, 0, 250))  # swapped in: refused, nothing rendered or cached
        assert_refused(client.get(f"/api/images/{target}/thumbnail"))
        photo.unlink()
        (scene["album"] / "photo_1.bak").rename(photo)  # restored: the very file again
        after = client.get(f"/api/images/{target}/thumbnail")
        assert after.status_code == 200 and near(served_colour(after.content), own)
        assert client.get(f"/api/images/{target}/file").content == photo.read_bytes()
        assert_healthy(client)


def test_bytes_rewritten_in_place_with_size_and_mtime_restored_get_a_fresh_thumbnail(
    scene, fake_encoder
):
    """Same inode, size and mtime (only the ctime, which no one can set back, moves): the
    file is served as what it is now, and its thumbnail is made from those bytes, not
    taken from the cache of the earlier ones."""
    photo = scene["album"] / "photo_2.jpg"
    target = image_id(scene["library"], photo)
    stat = os.stat(photo)
    with served(scene["library"], fake_encoder) as (_, client):
        first = client.get(f"/api/images/{target}/thumbnail")
        assert first.status_code == 200
        rewrite_in_place(photo, (0, 0, 250), stat)
        assert os.stat(photo).st_ctime_ns != stat.st_ctime_ns  # seconds after indexing
        second = client.get(f"/api/images/{target}/thumbnail")
        assert second.status_code == 200
        assert second.headers["etag"] != first.headers["etag"]
        assert near(served_colour(second.content), (0, 0, 250))
        stale = {"If-None-Match": first.headers["etag"]}
        again = client.get(f"/api/images/{target}/thumbnail", headers=stale)
        assert again.status_code == 200  # the old ETag names bytes that are gone: no 304


def rewrite_in_place(photo: Path, colour: tuple[int, int, int], stat: os.stat_result) -> None:
    """Other JPEG bytes in the same inode, padded to the old size, the old mtime put back
    (a decoder ignores what follows the end-of-image marker)."""
    import io

    out = io.BytesIO()
    Image.new("RGB", (96, 64), colour).save(out, "JPEG", quality=20)  # fits in the old size
    data = out.getvalue()
    assert len(data) <= stat.st_size
    with open(photo, "r+b") as handle:
        handle.write(data + b"\0" * (stat.st_size - len(data)))
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = os.stat(photo)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        stat.st_ino, stat.st_size, stat.st_mtime_ns
    )  # fmt: skip


# -- the re-index queue --------------------------------------------------------------------------
def test_changed_bytes_in_the_same_inode_are_refused_queued_and_cleared_by_index(
    scene, fake_encoder
):
    photo = scene["album"] / "photo_3.jpg"
    target = image_id(scene["library"], photo)
    inode = os.stat(photo).st_ino
    with open(photo, "ab") as handle:  # same inode; another size and mtime
        handle.write(b"\0" * 100)
    assert os.stat(photo).st_ino == inode
    with served(scene["library"], fake_encoder) as (_, client):
        assert_refused(client.get(f"/api/images/{target}/file"))
        assert client.get("/api/info").json()["reindex_queued"] == 1
        with Collection.open(scene["library"], encoder=fake_encoder) as photos:
            report = photos.index([scene["photos"]])
        assert report.unchanged == 3 and report.indexed + report.reused == 1
        assert client.get("/api/info").json()["reindex_queued"] == 0
        again = image_id(scene["library"], photo)
        assert client.get(f"/api/images/{again}/file").content == photo.read_bytes()
        assert_healthy(client)


def test_a_queued_photo_whose_stat_looks_unchanged_is_read_again(scene, fake_encoder):
    """Swapped (refused, queued), then restored: its stat is as indexed, yet the next
    index reads it again (it was queued) and the mark goes."""
    photo = scene["album"] / "photo_0.jpg"
    target = image_id(scene["library"], photo)
    swap_parent(scene, scene["elsewhere"])
    with served(scene["library"], fake_encoder) as (_, client):
        assert_refused(client.get(f"/api/images/{target}/file"))
    scene["album"].unlink()
    (scene["photos"] / "album.moved").rename(scene["album"])
    assert queued(scene["library"]) == 1
    with Collection.open(scene["library"], read_only=True) as photos:  # `clipdex info`
        assert photos.info().as_dict()["reindex_queued"] == 1
    shown = CliRunner().invoke(app, ["info", "--library", str(scene["library"])])
    assert shown.exit_code == 0 and "to re-index" in shown.stdout
    with Collection.open(scene["library"], encoder=fake_encoder) as photos:
        report = photos.index([scene["photos"]])
    assert report.unchanged == 3 and report.reused == 1  # same bytes: the vector is reused
    assert queued(scene["library"]) == 0
    with served(scene["library"], fake_encoder) as (_, client):
        again = image_id(scene["library"], photo)
        assert client.get(f"/api/images/{again}/file").content == photo.read_bytes()


def test_hostile_requests_leave_health_and_search_answering(scene, fake_encoder):
    """Refused requests in a loop on two threads while /readyz and a search are asked."""
    photo = scene["album"] / "photo_1.jpg"
    target = image_id(scene["library"], photo)
    photo.unlink()
    photo.symlink_to(scene["secret"])
    stop, statuses = threading.Event(), []
    going = {"file": threading.Event(), "thumbnail": threading.Event()}
    with served(scene["library"], fake_encoder) as (server, client):

        def hammer(route: str) -> None:
            import httpx

            with httpx.Client(base_url=server.url, timeout=DEADLINE) as own:
                while not stop.is_set():
                    statuses.append(own.get(f"/api/images/{target}/{route}").status_code)
                    going[route].set()

        threads = [threading.Thread(target=hammer, args=(r,)) for r in going]
        for thread in threads:
            thread.start()
        try:
            for event in going.values():  # both loops have been answered: the load is on
                assert event.wait(DEADLINE)
            for _ in range(5):
                assert_healthy(client)
        finally:
            stop.set()
            for thread in threads:
                thread.join(DEADLINE)
        assert statuses and set(statuses) == {404}
        assert client.get("/api/info").json()["reindex_queued"] == 1  # marked once
        assert_healthy(client)


# -- links the user indexed through, and rows from before real paths -------------------------
def test_a_photo_indexed_through_a_folder_link_of_the_users_is_served(tmp_path, fake_encoder):
    """The real path is recorded at indexing: the link the user indexed through is
    honoured as it was then, and no link is on the path the server opens."""
    storage = tmp_path / "disk" / "pictures"
    storage.mkdir(parents=True)
    make_photo(storage / "far.jpg", (9, 90, 9))
    link = tmp_path / "Pictures"
    link.symlink_to(storage, target_is_directory=True)
    library = tmp_path / "library"
    with Library.open(library, create=True) as lib:
        index_paths(lib, fake_encoder, [link])
        row = lib.catalog.get_images([lib.catalog.id_for_path(str(link / "far.jpg"))])
    (row,) = row.values()
    assert row["path"] == str(link / "far.jpg") and row["real_path"] == str(storage / "far.jpg")
    with served(library, fake_encoder) as (_, client):
        response = client.get(f"/api/images/{row['id']}/file")
        assert response.content == (storage / "far.jpg").read_bytes()


def test_rows_from_before_real_paths_are_walked_strictly_until_indexed_again(
    tmp_path, fake_encoder
):
    storage = tmp_path / "disk"
    storage.mkdir()
    make_photo(storage / "old.jpg", (200, 100, 0))
    link = tmp_path / "Pictures"
    link.symlink_to(storage, target_is_directory=True)
    library = tmp_path / "library"
    with Library.open(library, create=True) as lib:
        index_paths(lib, fake_encoder, [link])
    with sqlite3.connect(Library.catalog_path(library)) as conn:
        conn.execute("UPDATE images SET real_path = NULL")  # as a schema 4 row
    conn.close()
    target = image_id(library, link / "old.jpg")
    with served(library, fake_encoder) as (_, client):
        assert_refused(client.get(f"/api/images/{target}/file"))  # a link on its path
    with Collection.open(library, encoder=fake_encoder) as photos:
        photos.index([link])  # queued: read again, the real path recorded
    again = image_id(library, link / "old.jpg")
    with served(library, fake_encoder) as (_, client):
        assert client.get(f"/api/images/{again}/file").content == (storage / "old.jpg").read_bytes()


# -- the catalog's side ----------------------------------------------------------------------------
def test_a_schema_4_catalog_migrates_to_real_paths_and_a_reindex_queue(tmp_path):
    path = tmp_path / "catalog.sqlite"
    Catalog(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO images (path, size, mtime_ns, sha256, width, height, "
            "indexed_at, vector) VALUES ('/p.jpg', 1, 2, 'ab', 3, 4, '2020-01-01', x'00')"
        )
        conn.execute("ALTER TABLE images DROP COLUMN real_path")
        conn.execute("DROP TABLE reindex")
        conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    conn.close()
    reader = CatalogReader(path)  # the stdlib reader reads schema 4 without migrating
    try:
        assert reader.reindex_count() == 0
    finally:
        reader.close()
    catalog = Catalog(path)
    try:
        assert catalog.get_meta("schema_version") == str(SCHEMA_VERSION)
        assert catalog.get_images([1])[1]["real_path"] is None
        assert catalog.queue_reindex(1, "swapped") and catalog.queue_reindex(1, "again")
        assert not catalog.queue_reindex(99, "no such photo")
        assert catalog.reindex_count() == 1
        assert catalog.file_states("/")["/p.jpg"].queued
        catalog.delete_ids([1])  # a row replaced or removed takes its mark along
        assert catalog.reindex_count() == 0
    finally:
        catalog.close()
