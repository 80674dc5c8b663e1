"""Videos over REST and on the web page: a hit carries its moment, its thumbnail is that
frame, the file is served with range requests, and the page plays it from that moment."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from indexer.ingest.pipeline import IndexOptions, index_paths
from indexer.store.library import Library
from tests.live_server import served
from tests.videogen import write_video


@pytest.fixture
def media(tmp_path, photo_folder) -> Path:
    """The six generated photos, plus a three-scene WebM video made of three of them."""
    scenes = [photo_folder / f"photo_{i}.jpg" for i in (1, 3, 5)]
    write_video(photo_folder / "clip.webm", scenes, 1.5, kind="webm-vp9", size=(192, 128))
    return photo_folder


@pytest.fixture
def library(tmp_path, media, fake_encoder) -> Path:
    root = tmp_path / "library"
    with Library.open(root, create=True) as lib:
        report = index_paths(lib, fake_encoder, [media], IndexOptions(workers=1))
        assert report.failed == 0 and report.frames == 3
    return root


def _photo_id(http, name: str) -> int:
    hits = http.get("/api/search", params={"q": "anything", "k": 20}).json()["results"]
    return next(hit["id"] for hit in hits if hit["path"].endswith(name))


def _video_hit(http, like: int | None = None) -> dict:
    if like is None:
        hits = http.get("/api/search", params={"q": "anything", "k": 20}).json()["results"]
    else:
        hits = http.get(f"/api/images/{like}/similar", params={"k": 20}).json()["results"]
    videos = [hit for hit in hits if hit.get("kind") == "video"]
    assert len(videos) == 1 and len(hits) == 7, hits  # six photos and the video, once
    return videos[0]


def test_rest_hits_thumbnail_meta_and_ranges(library, fake_encoder):
    with served(library, fake_encoder) as (_, http):
        hit = _video_hit(http)
        assert hit["frame_time"] in (0.0, 1.5, 3.0) and hit["duration"] == pytest.approx(4.5)
        assert f"t={hit['frame_time']:g}" in hit["thumbnail_url"]

        thumb = http.get(hit["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.content)).size == (192, 128)
        other = http.get(f"/api/images/{hit['id']}/thumbnail", params={"size": 256, "t": 3.2})
        assert other.status_code == 200 and other.headers["etag"] != thumb.headers["etag"]

        meta = http.get(f"/api/images/{hit['id']}").json()
        assert meta["kind"] == "video" and meta["codec"] == "VP9" and meta["format"] == "WEBM"
        assert meta["duration"] == pytest.approx(4.5) and meta["frame_time"] == 0.0

        size = os.path.getsize(meta["path"])
        part = http.get(hit["image_url"], headers={"Range": "bytes=100-199"})
        assert part.status_code == 206 and len(part.content) == 100
        assert part.headers["content-type"] == "video/webm"
        assert part.headers["content-range"] == f"bytes 100-199/{size}"

        photo = next(
            h for h in http.get("/api/search", params={"q": "x", "k": 20}).json()["results"]
            if h["kind"] == "photo"
        )
        assert photo["frame_time"] is None and "t=" not in photo["thumbnail_url"]
        only = http.get("/api/search", params={"q": "x", "kind": "video"}).json()["results"]
        assert [h["id"] for h in only] == [hit["id"]]
        for scene, name in enumerate(("photo_1.jpg", "photo_3.jpg", "photo_5.jpg")):
            moment = _video_hit(http, like=_photo_id(http, name))  # a photo finds its scene
            assert moment["frame_time"] == 1.5 * scene


@pytest.mark.browser
def test_the_page_plays_a_video_from_its_moment(library, fake_encoder):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    chromium = "/usr/bin/chromium"
    if not os.access(chromium, os.X_OK):
        pytest.skip(f"no browser: {chromium} is absent")
    with served(library, fake_encoder) as (server, http), sync_api.sync_playwright() as pw:
        photo = _photo_id(http, "photo_5.jpg")  # the third scene, from 3 s
        hit = _video_hit(http, like=photo)
        assert hit["frame_time"] == 3.0
        browser = pw.chromium.launch(
            executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            tab = browser.new_page()
            tab.goto(f"{server.url}/#similar={photo}")
            tab.wait_for_selector("#status[data-state='ready']")
            card = tab.locator(f"#results .card[data-id='{hit['id']}']")
            assert card.locator(".moment").inner_text() == "▶ 0:03.0"
            card.locator(".thumb").click()
            tab.wait_for_selector("#viewer-video:not([hidden])")
            assert tab.locator("#viewer-img").is_hidden()
            assert tab.get_attribute("#viewer-video", "src").endswith("#t=3")
            tab.wait_for_function(
                "() => document.querySelector('#viewer-video').readyState >= 1", timeout=15000
            )
            at = tab.evaluate("() => document.querySelector('#viewer-video').currentTime")
            assert at == pytest.approx(hit["frame_time"], abs=0.1)
            assert "Duration" in tab.inner_text("#viewer-meta")
        finally:
            browser.close()


def test_cli_search_kind_json_and_table(library, monkeypatch, fake_encoder):
    import json

    from typer.testing import CliRunner

    import indexer.model.encoders
    from retrieval.cli import app

    monkeypatch.setattr(indexer.model.encoders, "load_encoder", lambda *a, **k: fake_encoder)
    runner = CliRunner()
    base = ["search", "anything", "--library", str(library)]
    found = json.loads(runner.invoke(app, [*base, "--kind", "video", "--json"]).stdout)
    [video] = found["results"]
    assert video["kind"] == "video" and video["frame_time"] in (0.0, 1.5, 3.0)
    assert video["duration"] == pytest.approx(4.5)
    table = runner.invoke(app, [*base, "--kind", "video"])
    assert table.exit_code == 0 and "@ 0:0" in table.stdout, table.stdout  # the moment
    photos = json.loads(runner.invoke(app, [*base, "--kind", "photo", "--json"]).stdout)
    assert len(photos["results"]) == 6 and "kind" not in photos["results"][0]
    refused = runner.invoke(app, [*base, "--kind", "film"])
    assert refused.exit_code == 1 and "photo or video" in refused.stderr
