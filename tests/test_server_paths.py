"""No path from a request reaches the filesystem: hostile ids, paths and encodings.

Over a real uvicorn server on loopback, with requests sent byte for byte (no client
normalising ``..`` on the way): every route that takes an id or a path-like value
(``/api/images/{id}`` and its ``/file``, ``/thumbnail``, ``/similar``; ``/api/index/{job}``;
``/v1/models/{id}``; the static web files) meets ``..``, absolute paths, percent-encoded
separators and dots (once and twice), backslashes, NUL bytes and overlong UTF-8. Each must
be refused with a 4xx, never answer with the planted secret, and never *open* it (an audit
hook watches every ``open`` in the process). ``POST /api/index`` is confined to
``--index-root``, also against symlinks met while walking a folder inside it.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest
from PIL import Image

from indexer.ingest.discover import OUTSIDE_ROOTS
from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library
from retrieval.server.web import WEB_DIR
from tests.live_server import raw_get, raw_request, served
from tests.test_server import assert_error, wait_for_job

SECRET = b"TOP-SECRET-6f1d2c"

# -- watching every open() in this process (the server runs in a thread of it) ------------
_opened: list[str] = []
_watching = threading.Event()


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _watching.is_set() and isinstance(args[0], (str, bytes)):
        _opened.append(os.fsdecode(args[0]))


_hooked: list[bool] = []


@contextmanager
def opened_files() -> Iterator[list[str]]:
    """The paths (as passed to ``open``) opened anywhere in the process meanwhile."""
    if not _hooked:  # an audit hook stays for the session; it records only while watching
        sys.addaudithook(_audit)
        _hooked.append(True)
    _opened.clear()
    _watching.set()
    try:
        yield _opened
    finally:
        _watching.clear()


# -- the scene ------------------------------------------------------------------------------
@pytest.fixture
def scene(tmp_path, fake_encoder) -> dict:
    """An index root with catalogued photos, and secrets outside it that links point to."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    photos = root / "photos"
    photos.mkdir(parents=True)
    outside.mkdir()
    for i in range(3):
        Image.new("RGB", (80, 60), (60 * i, 100, 30)).save(photos / f"p{i}.jpg")
    (outside / "secret.txt").write_bytes(SECRET)
    Image.new("RGB", (80, 60), (255, 0, 255)).save(outside / "secret.jpg")
    library = tmp_path / "library"
    with Library.open(library, create=True) as lib:
        index_paths(lib, fake_encoder, [photos])
    return {"root": root, "photos": photos, "outside": outside, "library": library}


@pytest.fixture
def server(scene, fake_encoder):
    with served(scene["library"], fake_encoder, index_roots=(scene["root"],)) as (live, client):
        yield live, client


def assert_untouched(opened: list[str], outside: Path) -> None:
    """Nothing under ``outside`` (nor /etc/passwd) was opened by anyone meanwhile."""
    real_outside = os.path.realpath(outside)
    touched = [
        path for path in opened
        if os.path.realpath(path).startswith(real_outside) or path.endswith("/etc/passwd")
    ]
    assert not touched, touched


def disguises(relative: str) -> list[bytes]:
    """The same climb ``../../x`` written every way a request can hide it."""
    forms = {
        "plain": relative,
        "dots %2e": relative.replace("..", "%2e%2e"),
        "slash %2f": relative.replace("/", "%2f"),
        "slash %2F": relative.replace("/", "%2F"),
        "all encoded": relative.replace("..", "%2e%2e").replace("/", "%2f"),
        "double encoded": relative.replace("..", "%252e%252e").replace("/", "%252f"),
        "backslashes": relative.replace("/", "\\"),
        "backslash %5c": relative.replace("/", "%5c"),
        "overlong utf-8": relative.replace("..", "%c0%ae%c0%ae").replace("/", "%c0%af"),
        "dot segments": relative.replace("../", ".././"),
        "NUL suffix": relative + "%00.js",
    }
    return [form.encode() for form in forms.values()]


REFUSED = {400, 404, 405, 422}


# -- static files and the page ----------------------------------------------------------------
def test_static_files_cannot_be_climbed_out_of(server, scene):
    live, _ = server
    secret = scene["outside"] / "secret.txt"
    climb = os.path.relpath(secret, WEB_DIR)
    targets = [b"/static/" + form for form in disguises(climb)]
    targets += [b"/" + form for form in disguises(climb)]
    targets += [
        b"/static/" + quote(str(secret), safe="").encode(),  # absolute, %2F-encoded
        b"/static//" + str(secret).lstrip("/").encode(),  # absolute after a double slash
        b"/static/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        b"/static/../../../../../../../../etc/passwd",
        b"/static/app.js%00",
        b"/static/%00",
        b"/favicon.ico/../../../../../etc/passwd",
        b"/static/" + b"../" * 40 + b"etc/passwd",
    ]
    with opened_files() as opened:
        for target in targets:
            status, answer = raw_get(live.url, target)
            assert status in REFUSED, (target, answer[:300])
            assert SECRET not in answer and b"root:x:0:0" not in answer, target
    assert_untouched(opened, scene["outside"])
    assert raw_get(live.url, b"/static/app.js")[0] == 200  # the real file is still served


def test_raw_nul_and_control_bytes_in_the_target_are_400(server):
    live, _ = server
    for target in (b"/static/app.js\x00", b"/api/images/1\x00/file", b"/static/\x7f"):
        status, _ = raw_get(live.url, target)
        assert status == 400, target


# -- routes that take an id -------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [b"", b"/file", b"/thumbnail?size=256", b"/similar"])
def test_photo_routes_take_only_catalog_ids(server, scene, suffix):
    live, _ = server
    secret = str(scene["outside"] / "secret.jpg")
    ids = [form for form in disguises("../../../outside/secret.jpg")]
    ids += [
        quote(secret, safe="").encode(),  # an absolute path, %2F-encoded
        b"%2e%2e",
        b"1%2f..%2f..%2f2",
        b"1%00",
        b"%00",
        b"-1",
        b"0",
        b"1e3",
        b"0x1",
        b"99999999999999999999999",
    ]
    just_one = [b"%31", b"1%20", b"1.0"]  # "1" written oddly: still only the id 1
    with opened_files() as opened:
        for image_id in ids + just_one:
            status, answer = raw_get(live.url, b"/api/images/" + image_id + suffix)
            expected = {200} if image_id in just_one else REFUSED
            assert status in expected, (image_id, suffix, answer[:300])
            assert SECRET not in answer
    assert_untouched(opened, scene["outside"])


def test_thumbnail_size_is_a_number_not_a_path(server, scene):
    live, _ = server
    for size in (b"..%2f..%2fsecret", b"256%00", b"%2e%2e", b"256/../1024"):
        status, _ = raw_get(live.url, b"/api/images/1/thumbnail?size=" + size)
        assert status == 422, size


def test_job_and_model_ids_are_not_paths(server, scene):
    live, _ = server
    targets = [b"/api/index/" + form for form in disguises("../../outside/secret.txt")]
    targets += [b"/v1/models/" + form for form in disguises("../../outside/secret.txt")]
    targets += [b"/api/index/0123abcd%2f..%2f..", b"/api/index/%00"]
    with opened_files() as opened:
        for target in targets:
            status, answer = raw_get(live.url, target)
            assert status in REFUSED, (target, answer[:300])
            assert SECRET not in answer
    assert_untouched(opened, scene["outside"])


def test_search_filters_are_matched_against_the_catalog_not_the_disk(server, scene):
    """``in=`` (folder filter) and the query text are strings compared with catalogued
    paths; a climb or an outside folder in them finds nothing and opens nothing."""
    _, client = server
    outside = str(scene["outside"])
    with opened_files() as opened:
        for folder in (outside, f"{scene['photos']}/../../outside", "*/../outside*"):
            answer = client.get("/api/search", params={"q": "x", "in": folder})
            assert answer.status_code == 200 and answer.json()["results"] == [], folder
        assert_error(client.get("/api/search", params={"q": "x", "in": "a\x00b"}), 400, "bad_query")
        assert_error(client.get("/api/search", params={"q": "x", "in": "../etc"}), 400, "bad_query")
    assert_untouched(opened, scene["outside"])


# -- POST /api/index -----------------------------------------------------------------------
def test_index_paths_outside_the_root_are_refused(server, scene):
    _, client = server
    root, outside = scene["root"], scene["outside"]
    (root / "link_out").symlink_to(outside)
    (root / "file_out.jpg").symlink_to(outside / "secret.jpg")
    (root / "link_in").symlink_to(scene["photos"])
    forbidden = [
        "/etc",
        "/",
        str(outside),
        "..",
        "../outside",
        "photos/../../outside",
        f"{root}/../outside",
        "link_out",
        "link_out/",
        "file_out.jpg",
        f"{root}/link_out/secret.jpg",
        "link_in/../../outside",
    ]
    missing = ["%2e%2e%2foutside", "..%2foutside", "..\\outside", "%2e%2e", "photos%2fp0.jpg"]
    with opened_files() as opened:
        for path in forbidden:
            assert_error(client.post("/api/index", json={"paths": [path]}), 403, "forbidden")
        for path in missing:  # no decoding on the server: these are names that do not exist
            assert_error(client.post("/api/index", json={"paths": [path]}), 400, "bad_query")
        for path in ("photos\x00", "\x00", ""):
            answer = client.post("/api/index", json={"paths": [path]})
            assert answer.status_code in (400, 422), (path, answer.text)
        assert_error(
            client.post("/api/index", json={"paths": ["photos", "../outside"]}), 403, "forbidden"
        )
    assert_untouched(opened, outside)
    assert client.get("/api/index").json()["jobs"] == []  # not one job was started
    inside = client.post("/api/index", json={"paths": ["link_in"]})  # a link that stays in
    assert inside.status_code == 202, inside.text


def test_an_index_job_does_not_follow_symlinks_out_of_the_root(server, scene):
    """A folder inside the root may hold links that lead out: they are reported, not walked,
    and nothing behind them is catalogued or can be served."""
    _, client = server
    photos, outside = scene["photos"], scene["outside"]
    (photos / "album_out").symlink_to(outside, target_is_directory=True)
    (photos / "secret_link.jpg").symlink_to(outside / "secret.jpg")
    (photos / "nested").mkdir()
    (photos / "nested" / "deep_out").symlink_to(outside, target_is_directory=True)
    (photos / "p0_again.jpg").symlink_to(photos / "p0.jpg")  # inside: followed as before
    with opened_files() as opened:
        started = client.post("/api/index", json={"paths": ["photos"]})
        assert started.status_code == 202, started.text
        job = wait_for_job(client, started.json()["status_url"])
    assert job["state"] == "done", job
    assert_untouched(opened, outside)  # in this process; the decode workers are checked below
    reported = {Path(f["path"]).name: f["error"] for f in job["report"]["failures"]}
    assert reported == {
        name: OUTSIDE_ROOTS for name in ("album_out", "secret_link.jpg", "deep_out")
    }, reported
    results = client.get("/api/search", params={"q": "x", "k": 100}).json()["results"]
    real_root = os.path.realpath(scene["root"])
    assert results and all(os.path.realpath(r["path"]).startswith(real_root) for r in results)
    assert any(r["path"].endswith("p0_again.jpg") for r in results)
    assert not any("secret" in r["path"] or "_out" in r["path"] for r in results)


def test_the_cli_still_follows_links_where_the_user_points_it(tmp_path, fake_encoder):
    """The confinement is the server's: `clipdex index` follows a user's links as before."""
    photos, elsewhere = tmp_path / "photos", tmp_path / "elsewhere"
    photos.mkdir()
    elsewhere.mkdir()
    Image.new("RGB", (50, 50), (9, 9, 9)).save(elsewhere / "far.jpg")
    (photos / "album").symlink_to(elsewhere, target_is_directory=True)
    with Library.open(tmp_path / "library", create=True) as lib:
        report = index_paths(lib, fake_encoder, [photos])
    assert report.indexed == 1


def test_discovery_reports_links_that_lead_out(tmp_path):
    from indexer.ingest.discover import discover

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (20, 20)).save(outside / "x.jpg")
    (outside / "notes.txt").write_text("not an image")
    (root / "dir_out").symlink_to(outside, target_is_directory=True)
    (root / "img_out.jpg").symlink_to(outside / "x.jpg")
    (root / "txt_out.txt").symlink_to(outside / "notes.txt")  # not an image: no report
    found = discover(root, within=[os.path.realpath(root)])
    assert found.files == []
    assert sorted((Path(p).name, why) for p, why in found.problems) == [
        ("dir_out", OUTSIDE_ROOTS),
        ("img_out.jpg", OUTSIDE_ROOTS),
    ]
    assert len(discover(root).files) == 2  # without ``within``: followed, as the CLI does


def test_a_symlinked_root_is_followed_to_its_real_place(tmp_path, fake_encoder, scene):
    """--index-root itself may be a link (e.g. /photos -> /mnt/disk/photos)."""
    linked_root = tmp_path / "root_link"
    linked_root.symlink_to(scene["root"], target_is_directory=True)
    with served(scene["library"], fake_encoder, index_roots=(linked_root,)) as (_, client):
        started = client.post("/api/index", json={"paths": ["photos"]})
        assert started.status_code == 202, started.text
        assert wait_for_job(client, started.json()["status_url"])["state"] == "done"
        assert_error(client.post("/api/index", json={"paths": ["../outside"]}), 403, "forbidden")


def test_raw_request_bodies_with_hostile_paths(server, scene):
    """The same refusals when the JSON is sent raw, escapes and all."""
    live, _ = server
    bodies = [
        b'{"paths": ["\\u002e\\u002e/outside"]}',  # ".." spelled with JSON escapes
        b'{"paths": ["photos\\u0000"]}',
        b'{"paths": ["\\/etc"]}',
    ]
    for body in bodies:
        request = (
            b"POST /api/index HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        status, answer = raw_request(live.url, request)
        assert status in (400, 403), (body, answer[-300:])


# -- file names that are not UTF-8 ------------------------------------------------------------
def test_non_utf8_names_come_back_lossless_as_in_the_cli(tmp_path, fake_encoder):
    """A name's undecodable bytes travel as ``\\udcNN`` JSON escapes, the text the CLI's
    ``--json`` prints: ``json.loads`` + ``os.fsencode`` give back the very bytes, in a
    request (``POST /api/index``) as in every answer."""
    import json
    import subprocess

    from tests.clirun import cli_env, clipdex

    root = tmp_path / "root"
    folder = os.fsencode(root) + b"/caf\xe9"
    os.makedirs(folder)
    photo = folder + b"/cr\xe8me br\xfbl\xe9e.jpg"
    Image.new("RGB", (64, 48), (200, 120, 40)).save(os.fsdecode(photo))
    with open(folder + b"/bad\xff.jpg", "wb") as handle:
        handle.write(b"\xff\xd8 not a jpeg")
    library = tmp_path / "library"
    with served(library, fake_encoder, index_roots=(root,)) as (live, client):
        started = client.post(
            "/api/index",
            content=b'{"paths": ["caf\\udce9"]}',  # the folder, named as the CLI writes it
            headers={"Content-Type": "application/json"},
        )
        assert started.status_code == 202, started.text
        assert b'"paths":["' + os.fsencode(root) + b'/caf\\udce9"]' in started.content
        job = wait_for_job(client, started.json()["status_url"])
        assert job["state"] == "done" and job["report"]["indexed"] == 1, job

        hits = client.get("/api/search", params={"q": "x"})
        assert b"cr\\udce8me br\\udcfbl\\udce9e.jpg" in hits.content  # escapes, not U+FFFD
        hit = hits.json()["results"][0]
        assert os.fsencode(hit["path"]) == photo
        meta = client.get(f"/api/images/{hit['id']}").json()
        assert os.fsencode(meta["path"]) == photo
        assert os.fsencode(meta["name"]) == os.path.basename(photo)
        original = client.get(hit["image_url"])
        assert original.status_code == 200
        assert original.content == Path(os.fsdecode(photo)).read_bytes()
        # A header is text for eyes: the readable \xNN form, as in the CLI's tables.
        assert "cr%5Cxe8me" in original.headers["content-disposition"]
        assert client.get(hit["thumbnail_url"]).status_code == 200
        status, answer = raw_get(live.url, f"/api/images/{hit['id']}".encode())
        assert status == 200 and b"\\udce8" in answer
        served_failure = next(
            f["path"] for f in job["report"]["failures"] if f["path"].endswith(".jpg")
        )
    cli = subprocess.run(
        clipdex("failures", "--library", str(library), "--json"),
        env=cli_env(), capture_output=True, timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    cli_failure = json.loads(cli.stdout)[0]["path"]
    assert cli_failure == served_failure and os.fsencode(cli_failure) == folder + b"/bad\xff.jpg"
    assert b"bad\\udcff.jpg" in cli.stdout  # the same escapes in both
