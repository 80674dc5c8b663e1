"""Photos in object storage (s3://) against a real S3-compatible server started here (moto).

The same corpus files are indexed from a local folder and from a bucket: the libraries must
match (ids, hashes, metadata, vectors, failures and their reasons), the catalog keeps the
URIs, a second run reads only what changed (size + LastModified, renames by content hash),
the server streams originals and thumbnails from the bucket, and every store-level problem
(no bucket, no credentials, an endpoint that does not answer) is one clear message.
"""

from __future__ import annotations

import io
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.errors import ConfigError, NotFound, ObjectStoreError
from indexer.ingest.pipeline import IndexOptions, index_paths
from indexer.store.library import Library
from retrieval import Collection, SearchOptions
from tests.conftest import REPO
from tests.s3server import BROKEN, GOOD, s3_server, sample_folder

pytest.importorskip("pyarrow")

BUCKET, PREFIX = "photos", "trip"
ROOT_URI = f"s3://{BUCKET}/{PREFIX}"


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        server.client.create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch):
    for name, value in s3.environ().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "CLIPDEX_S3_ANONYMOUS"):
        monkeypatch.delenv(name, raising=False)
    return s3


@pytest.fixture
def uploaded(s3_env, tmp_path):
    """The sample folder, and the same files under a fresh prefix of the bucket."""
    folder = sample_folder(tmp_path / "sample")
    prefix = f"{PREFIX}-{tmp_path.name}"
    s3_env.upload(folder, BUCKET, prefix)
    return folder, f"s3://{BUCKET}/{prefix}"


def library_rows(root: Path, base: str) -> tuple[dict, dict]:
    """relative path -> (id, sha256, width, height, format, vector); relative path -> reason."""
    with sqlite3.connect(root / "catalog.sqlite") as db:
        images = db.execute("SELECT path, id, sha256, width, height, format, vector FROM images")
        failures = db.execute("SELECT path, error FROM failures").fetchall()
        rows = {r[0]: (*r[1:6], np.frombuffer(r[6], np.float32)) for r in images.fetchall()}
    for path in [*rows, *dict(failures)]:
        assert path.startswith(base + "/"), path
    cut = len(base) + 1
    return {p[cut:]: v for p, v in rows.items()}, {p[cut:]: e for p, e in failures}


def test_a_bucket_prefix_builds_the_same_library_as_the_same_local_folder(
    uploaded, fake_encoder, tmp_path
):
    folder, uri = uploaded
    one = IndexOptions(workers=1)  # ids follow completion order: one worker, one order
    with Library.open(tmp_path / "local", create=True) as library:
        local = index_paths(library, fake_encoder, [folder], one)
    with Library.open(tmp_path / "s3", create=True) as library:
        remote = index_paths(library, fake_encoder, [uri], one)

    assert (remote.indexed, remote.failed) == (local.indexed, local.failed) == (GOOD, BROKEN)
    local_rows, local_failures = library_rows(tmp_path / "local", str(folder))
    remote_rows, remote_failures = library_rows(tmp_path / "s3", uri)
    assert remote_failures == local_failures and len(local_failures) == BROKEN
    assert remote_rows.keys() == local_rows.keys() and "sub/02_" in " ".join(remote_rows)
    assert not any(name.startswith(".") for name in remote_rows)  # hidden objects skipped
    for name, (*fields, vector) in local_rows.items():
        *remote_fields, remote_vector = remote_rows[name]
        assert remote_fields == fields, name  # same id, hash and metadata
        np.testing.assert_array_equal(remote_vector, vector)


def test_a_second_run_reads_only_changed_added_renamed_and_deleted_objects(
    uploaded, s3_env, fake_encoder, tmp_path
):
    folder, uri = uploaded
    prefix = uri.split("/", 3)[3]
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("[!.]*.jpg"))
    with Library.open(tmp_path / "lib", create=True) as library:
        index_paths(library, fake_encoder, [uri])
        vectors_before = len(library.index)  # photos and the video's frames
        renamed_id = library.catalog.id_for_path(f"{uri}/{names[1]}")
        renamed_vector = library.index.reconstruct(renamed_id)
        client = s3_env.client
        changed = io.BytesIO()
        Image.new("RGB", (300, 200), (200, 30, 30)).save(changed, "JPEG")
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{names[0]}", Body=changed.getvalue())
        client.copy_object(
            Bucket=BUCKET, Key=f"{prefix}/moved.jpg", CopySource=f"{BUCKET}/{prefix}/{names[1]}"
        )
        client.delete_object(Bucket=BUCKET, Key=f"{prefix}/{names[1]}")
        client.delete_object(Bucket=BUCKET, Key=f"{prefix}/{names[2]}")
        added = io.BytesIO()
        Image.new("RGB", (240, 320), (20, 160, 90)).save(added, "JPEG")
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/new/added.jpg", Body=added.getvalue())
        fake_encoder.images_encoded = 0

        report = index_paths(library, fake_encoder, [uri])

        assert fake_encoder.images_encoded == 2  # the changed and the added object only
        assert (report.indexed, report.reused, report.removed) == (2, 1, 2)
        assert report.unchanged == GOOD - 3  # the video too
        moved_id = library.catalog.id_for_path(f"{uri}/moved.jpg")
        assert (library.index.reconstruct(moved_id) == renamed_vector).all()
        assert library.catalog.id_for_path(f"{uri}/{names[2]}") is None
        assert library.catalog.count() == GOOD and len(library.index) == vectors_before
        fake_encoder.images_encoded = 0
        again = index_paths(library, fake_encoder, [uri])
        assert (again.indexed, again.unchanged, fake_encoder.images_encoded) == (0, GOOD, 0)


def test_repair_encodes_damaged_rows_of_objects_again(s3_env, photo_folder, fake_encoder, tmp_path):
    from indexer.ingest.repair import repair_library

    s3_env.upload(photo_folder, BUCKET, "repair")
    uri = f"s3://{BUCKET}/repair"
    root = tmp_path / "lib"
    with Library.open(root, create=True) as library:
        index_paths(library, fake_encoder, [uri])
        damaged = library.catalog.id_for_path(sorted(library.catalog.file_states(uri))[0])
    with sqlite3.connect(root / "catalog.sqlite") as conn:
        conn.execute("UPDATE images SET vector = zeroblob(100) WHERE id = ?", (damaged,))
    conn.close()
    report = repair_library(root, lambda: fake_encoder)
    assert (report.vectors_damaged, report.reencoded, report.not_recovered) == (1, 1, [])


def test_text_in_a_photo_in_the_bucket_is_read(s3_env, fake_encoder, tmp_path):
    from tests import textphotos as tp

    folder = tmp_path / "text"
    (made,) = tp.make_text_set(folder, 1, seed=3, sizes=(64,), angles=(0.0,), contrasts=("high",))
    s3_env.upload(folder, BUCKET, "text")
    always = IndexOptions(ocr="always")
    with Library.open(tmp_path / "lib", create=True) as library:
        report = index_paths(library, fake_encoder, [f"s3://{BUCKET}/text"], always)
        assert (report.ocr.read, report.ocr.with_text) == (1, 1)
        catalog = library.catalog
        rows = catalog.get_images(catalog.ids())
        texts = [t for s, t, _ in catalog.texts_for(rows)[next(iter(rows))] if s == "ocr"]
    words = {word.lower().strip(".,:;") for text in texts for word in text.split()}
    assert words & {word.lower() for word in made.words}


def test_search_shows_the_uri_and_the_server_streams_the_object(
    uploaded, s3_env, fake_encoder, tmp_path
):
    from tests.live_server import served

    folder, uri = uploaded
    root = tmp_path / "lib"
    with Library.open(root, create=True) as library:
        index_paths(library, fake_encoder, [uri])
    first = sorted(p for p in folder.rglob("[!.]*.jpg"))[0]
    target = f"{uri}/{first.relative_to(folder).as_posix()}"
    with Collection.open(root, encoder=fake_encoder) as photos:
        hits = photos.similar(str(first), SearchOptions(k=1)).results
    assert hits[0].path == target
    with Collection.open(root, encoder=fake_encoder) as photos:
        assert photos.similar(target, SearchOptions(k=1)).results[0].path == target
        with pytest.raises(NotFound, match="not a photo in the library"):
            photos.similar(f"{uri}/never-indexed.jpg")
        only_sub = SearchOptions(k=50, folders=(f"{uri}/sub/",))
        under = photos.search("x", options=only_sub).results
    assert under and all(hit.path.startswith(f"{uri}/sub/") for hit in under)

    with served(root, fake_encoder) as (_, http):
        hit = next(
            h
            for h in http.get("/api/search", params={"q": "x", "k": 50}).json()["results"]
            if h["path"] == target
        )
        original = http.get(f"/api/images/{hit['id']}/file")
        assert original.status_code == 200 and original.content == first.read_bytes()
        assert original.headers["content-type"] == "image/jpeg"
        thumb = http.get(f"/api/images/{hit['id']}/thumbnail", params={"size": 128})
        assert thumb.status_code == 200
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 128
        etag = {"If-None-Match": thumb.headers["etag"]}  # the cache and 304 the files share
        again = http.get(f"/api/images/{hit['id']}/thumbnail", params={"size": 128}, headers=etag)
        assert again.status_code == 304 and again.content == b""
        cached = http.get(f"/api/images/{hit['id']}/thumbnail", params={"size": 128})
        assert cached.content == thumb.content and cached.headers["etag"] == etag["If-None-Match"]

        clip = next(
            h
            for h in http.get("/api/search", params={"q": "x", "k": 50}).json()["results"]
            if h["path"].endswith("/sub/clip.mp4")
        )
        video = http.get(f"/api/images/{clip['id']}/file")
        whole = (folder / "sub" / "clip.mp4").read_bytes()
        assert video.content == whole and video.headers["accept-ranges"] == "bytes"
        _check_object_ranges(http, f"/api/images/{clip['id']}/file", whole)
        frame = http.get(f"/api/images/{clip['id']}/thumbnail", params={"size": 128, "t": 0.5})
        assert frame.status_code == 200 and Image.open(io.BytesIO(frame.content)).format == "JPEG"

        other = io.BytesIO()
        Image.new("RGB", (64, 64), (0, 90, 200)).save(other, "JPEG")
        s3_env.client.put_object(Bucket=BUCKET, Key=target.split("/", 3)[3], Body=other.getvalue())
        changed = http.get(f"/api/images/{hit['id']}/file")
        assert changed.status_code == 404 and changed.json()["error"]["code"] == "file_changed"


def _check_object_ranges(http, url: str, whole: bytes) -> None:
    """A video from the bucket answers byte ranges (206, from a seek) like a file does."""
    size = len(whole)
    for asked, start, end in (("100-1099", 100, 1100), ("-50", size - 50, size), ("7-", 7, size)):
        part = http.get(url, headers={"Range": f"bytes={asked}"})
        assert part.status_code == 206 and part.content == whole[start:end]
        assert part.headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
        assert int(part.headers["content-length"]) == end - start
    several = http.get(url, headers={"Range": "bytes=0-9,20-29"})
    assert several.status_code == 200 and several.content == whole  # several: the whole
    outside = http.get(url, headers={"Range": f"bytes={size}-"})
    assert outside.status_code == 416 and outside.headers["content-range"] == f"bytes */{size}"
    assert outside.json()["error"]["code"] == "range_not_satisfiable"
    malformed = http.get(url, headers={"Range": "pages=1-2"})
    assert malformed.status_code == 400
    assert "bytes=START-END" in malformed.json()["error"]["message"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_store_problems_are_one_clear_message_naming_the_uri(
    s3_env, monkeypatch, fake_encoder, tmp_path
):
    s3_env.client.put_object(Bucket=BUCKET, Key="private/one.jpg", Body=b"\xff\xd8\xff")
    with Library.open(tmp_path / "lib", create=True) as library:
        with pytest.raises(ObjectStoreError, match="bucket 'nowhere' does not exist"):
            index_paths(library, fake_encoder, ["s3://nowhere/photos"])
        with pytest.raises(ObjectStoreError, match="no object at or under"):
            index_paths(library, fake_encoder, [f"s3://{BUCKET}/no/such/prefix"])
        with pytest.raises(ConfigError, match="unsupported scheme ftp://"):
            index_paths(library, fake_encoder, ["ftp://host/photos"])
        # No credentials: the server answers an unsigned request for a private object 403.
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("HOME", str(tmp_path))
        with pytest.raises(ObjectStoreError, match="no credentials are set") as denied:
            index_paths(library, fake_encoder, [f"s3://{BUCKET}/private/one.jpg"])
        assert f"s3://{BUCKET}/private/one.jpg" in str(denied.value)
        assert "AWS_ACCESS_KEY_ID" in str(denied.value)
        # An endpoint where nothing listens.
        monkeypatch.setenv("CLIPDEX_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
        with pytest.raises(ObjectStoreError, match="cannot reach the object store") as down:
            index_paths(library, fake_encoder, [ROOT_URI])
        assert down.value.setting == "s3_endpoint" and ROOT_URI in str(down.value)
        assert library.catalog.count() == 0


def test_the_cli_takes_a_uri_and_says_what_is_wrong_without_a_traceback(s3_env, tmp_path):
    """The URI reaches the library as written (a Path would fold ``s3://`` into ``s3:/``),
    the endpoint comes from the flag, and the error is one line naming the URI."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    del env["CLIPDEX_S3_ENDPOINT"]  # given as a flag instead
    command = [sys.executable, "-m", "retrieval.cli", "index", "s3://nowhere/x", "--json"]
    command += ["--library", str(tmp_path / "lib"), "--s3-endpoint", s3_env.endpoint]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.startswith("error: s3://nowhere/x: the bucket 'nowhere' does not exist")
    assert s3_env.endpoint in done.stderr


def test_uris_are_spelt_one_way_and_gs_gets_google_cloud_storage(monkeypatch):
    from indexer.ingest import objectstore

    assert objectstore.normalize("S3://photos//2024/") == "s3://photos/2024"
    assert objectstore.normalize("gcs://photos/a") == "gs://photos/a"
    assert objectstore.UriRoot("s3://photos/2024/a.jpg", False).parent.uri == "s3://photos/2024"
    assert objectstore.UriRoot("s3://photos/a.jpg", False).parent.uri == "s3://photos"
    for bad in ("s3://", "s3://photos/../x"):
        with pytest.raises(ConfigError):
            objectstore.normalize(bad)
    monkeypatch.setenv("CLIPDEX_S3_ANONYMOUS", "1")  # no credentials looked up
    store, path = objectstore.filesystem("gs://photos/2024")
    assert type(store).__name__ == "GcsFileSystem" and path == "photos/2024"


def test_watching_a_bucket_says_to_index_it_again_instead():
    from indexer.ingest.sync import Syncer

    with pytest.raises(ConfigError, match="only folders on this machine can be watched"):
        Syncer([ROOT_URI], lambda paths: None)


def test_without_pyarrow_the_error_names_the_extra(monkeypatch):
    from indexer.ingest import objectstore

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    monkeypatch.setattr(objectstore, "_filesystems", {})
    with pytest.raises(ObjectStoreError, match=r"pip install 'clipdex\[s3\]'") as caught:
        objectstore.resolve(ROOT_URI)
    assert ROOT_URI in str(caught.value)
