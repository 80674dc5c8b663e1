"""The REST API over a real uvicorn server on loopback, with the fake encoder.

Search, upload, similar, photos, thumbnails, index jobs, errors (JSON shape and status) and
the limits a client can hit. The model is not what is tested here (test_server_model.py
runs the real architecture).
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library
from tests.live_server import rotated_photo, served


@pytest.fixture
def library(tmp_path, photo_folder, fake_encoder) -> Path:
    """A library of the six generated photos plus one EXIF-rotated photo."""
    rotated_photo(photo_folder / "rotated.jpg")
    root = tmp_path / "library"
    with Library.open(root, create=True) as lib:
        index_paths(lib, fake_encoder, [photo_folder])
    return root


@pytest.fixture
def client(library, fake_encoder, tmp_path):
    with served(library, fake_encoder, index_roots=(tmp_path,)) as (_, http):
        yield http


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    return error


def photo_id(client, name: str) -> int:
    hits = client.get("/api/search", params={"q": "anything", "k": 100}).json()["results"]
    return next(hit["id"] for hit in hits if hit["path"].endswith(name))


def jpeg_bytes(colour=(10, 200, 30), size=(64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "JPEG")
    return out.getvalue()


# -- health and info ----------------------------------------------------------------------
def test_health_ready_and_info(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    info = client.get("/api/info").json()
    assert info["ready"] and info["images"] == 7 and info["failed"] == 0
    assert info["model"] == "MobileCLIP-S2/fake" and info["indexing_enabled"]


def test_openapi_schema_documents_the_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/search", "/api/search/image", "/api/images/{image_id}/thumbnail",
                 "/api/index", "/v1/embeddings", "/readyz"):
        assert path in paths
    assert client.get("/docs").status_code == 200


def test_docs_page_loads_swagger_ui_from_this_server(client):
    """/docs works offline: every script and stylesheet it names is served here."""
    import re

    page = client.get("/docs")
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', page.text)
    assert len(assets) == 2 and all(url.startswith("/docs-assets/") for url in assets), assets
    for url in assets:
        asset = client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 100_000, url
    assert "'/openapi.json'" in page.text or '"/openapi.json"' in page.text


# -- search -----------------------------------------------------------------------------
def test_text_search_shape_order_and_urls(client):
    answer = client.get("/api/search", params={"q": "a red ball", "k": 5}).json()
    assert answer["query"] == "a red ball" and answer["kind"] == "text"
    results = answer["results"]
    assert len(results) == 5
    assert set(results[0]) >= {
        "id", "path", "score", "width", "height", "taken_at", "thumbnail_url", "image_url"
    }
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    first = results[0]
    assert first["thumbnail_url"] == f"/api/images/{first['id']}/thumbnail?size=256"
    assert client.get(first["image_url"]).status_code == 200


def test_paging_matches_one_big_page(client):
    whole = client.get("/api/search", params={"q": "sky", "k": 6}).json()["results"]
    first = client.get("/api/search", params={"q": "sky", "k": 3}).json()["results"]
    second = client.get("/api/search", params={"q": "sky", "k": 3, "offset": 3}).json()["results"]
    assert [r["id"] for r in first + second] == [r["id"] for r in whole]
    beyond = client.get("/api/search", params={"q": "sky", "k": 3, "offset": 50}).json()
    assert beyond["results"] == []


def test_repeated_text_query_runs_the_model_once(client, fake_encoder):
    before = fake_encoder.texts_encoded
    for offset in (0, 2, 4):
        client.get("/api/search", params={"q": "paging cache", "k": 2, "offset": offset})
    assert fake_encoder.texts_encoded == before + 1


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"q": "   "}, 400, "bad_query"),
        ({"q": ""}, 422, "invalid_request"),
        ({}, 422, "invalid_request"),
        ({"q": "x", "k": 0}, 422, "invalid_request"),
        ({"q": "x", "k": 10_001}, 422, "invalid_request"),
        ({"q": "x", "k": "many"}, 422, "invalid_request"),
        ({"q": "x", "k": 9_000, "offset": 2_000}, 400, "bad_query"),
        ({"q": "x" * 1001}, 422, "invalid_request"),
    ],
)
def test_bad_search_requests(client, params, status, code):
    assert_error(client.get("/api/search", params=params), status, code)


def test_image_upload_finds_the_same_photo(client, photo_folder):
    data = (photo_folder / "photo_3.jpg").read_bytes()
    answer = client.post(
        "/api/search/image", params={"k": 3}, files={"file": ("query.jpg", data, "image/jpeg")}
    ).json()
    assert answer["kind"] == "image" and answer["query"] == "query.jpg"
    assert answer["results"][0]["path"].endswith("photo_3.jpg")
    assert answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_upload_type_is_sniffed_not_trusted(client, photo_folder):
    data = (photo_folder / "photo_1.jpg").read_bytes()
    lying = client.post("/api/search/image", files={"file": ("notes.txt", data, "text/plain")})
    assert lying.status_code == 200
    assert lying.json()["results"][0]["path"].endswith("photo_1.jpg")
    html = b"<html><script>alert(1)</script></html>"
    fake = client.post("/api/search/image", files={"file": ("cat.jpg", html, "image/jpeg")})
    assert_error(fake, 415, "not_an_image")


@pytest.mark.parametrize(
    ("payload", "code"),
    [(b"", "not_an_image"), (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "not_an_image")],
)
def test_empty_and_truncated_uploads_are_415(client, payload, code):
    response = client.post("/api/search/image", files={"file": ("x.jpg", payload, "image/jpeg")})
    assert_error(response, 415, code)


def test_upload_without_a_file_field_is_422(client):
    assert_error(client.post("/api/search/image", data={"k": "3"}), 422, "invalid_request")
    garbage = client.post(
        "/api/search/image",
        content=b"--x\r\nnot multipart",
        headers={"content-type": "multipart/form-data; boundary=zzz"},
    )
    assert garbage.status_code in (400, 422), garbage.text


def test_upload_limits_bytes_and_pixels(library, fake_encoder):
    big = jpeg_bytes(size=(1200, 1000))  # 1.2 MP, a few KB
    with served(library, fake_encoder, max_upload_mb=0.5, max_megapixels=1.0) as (_, client):
        too_big = client.post(
            "/api/search/image", files={"file": ("a.jpg", b"\xff" * 600_000, "image/jpeg")}
        )
        assert_error(too_big, 413, "too_large")

        def chunks():  # no Content-Length: counted while it streams
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
            for _ in range(8):
                yield b"\xff" * 100_000
            yield b"\r\n--b--\r\n"

        streamed = client.post(
            "/api/search/image",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert_error(streamed, 413, "too_large")
        bomb = client.post("/api/search/image", files={"file": ("big.jpg", big, "image/jpeg")})
        error = assert_error(bomb, 413, "image_too_large")
        assert "megapixels" in error["message"] and "--" not in error["message"]
        assert error["setting"] == "max_megapixels"  # the setting to raise, not a CLI flag
        assert client.get("/healthz").status_code == 200


# -- similar and photos ---------------------------------------------------------------------
def test_more_like_this_starts_with_the_photo_itself(client, fake_encoder):
    target = photo_id(client, "photo_2.jpg")
    before = fake_encoder.images_encoded
    answer = client.get(f"/api/images/{target}/similar", params={"k": 3}).json()
    assert answer["kind"] == "similar" and answer["results"][0]["id"] == target
    assert fake_encoder.images_encoded == before  # the stored vector, no model call


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("/api/images/999999", 404, "not_found"),
        ("/api/images/999999/similar", 404, "not_found"),
        ("/api/images/999999/file", 404, "not_found"),
        ("/api/images/999999/thumbnail", 404, "not_found"),
        ("/api/images/0", 422, "invalid_request"),
        ("/api/images/-3/file", 422, "invalid_request"),
        ("/api/images/99999999999999999999999/file", 422, "invalid_request"),
        ("/api/images/abc", 422, "invalid_request"),
        ("/api/images/..%2f..%2fetc%2fpasswd/file", 404, "not_found"),
        ("/api/images/1/file/../../../etc/passwd", 404, "not_found"),
        ("/static/../../../../etc/passwd", 404, "not_found"),
        ("/static/%2e%2e/%2e%2e/server/app.py", 404, "not_found"),
        ("/nowhere", 404, "not_found"),
    ],
)
def test_unknown_ids_and_paths_are_json_errors(client, url, status, code):
    response = client.get(url)
    assert_error(response, status, code)
    assert b"root:" not in response.content


def test_wrong_method_is_a_json_405(client):
    assert_error(client.delete("/api/search"), 405, "method_not_allowed")


def test_photo_metadata_and_original_bytes(client, photo_folder):
    target = photo_id(client, "photo_4.jpg")
    meta = client.get(f"/api/images/{target}").json()
    assert meta["name"] == "photo_4.jpg" and meta["format"] == "JPEG"
    assert (meta["width"], meta["height"]) == (360, 240)
    assert meta["similar_url"].endswith(f"/api/images/{target}/similar")
    original = client.get(f"/api/images/{target}/file")
    assert original.headers["content-type"] == "image/jpeg"
    assert original.headers["x-content-type-options"] == "nosniff"
    assert original.content == (photo_folder / "photo_4.jpg").read_bytes()


def test_a_catalogued_file_that_vanished_is_404(client, photo_folder):
    target = photo_id(client, "photo_5.jpg")
    (photo_folder / "photo_5.jpg").unlink()
    assert_error(client.get(f"/api/images/{target}/file"), 404, "file_unavailable")
    assert_error(client.get(f"/api/images/{target}/thumbnail"), 404, "file_unavailable")


def test_a_catalogued_file_replaced_by_garbage_is_404(client, photo_folder):
    target = photo_id(client, "photo_0.jpg")
    (photo_folder / "photo_0.jpg").write_bytes(b"no longer a photo")
    # Another size and mtime: not the file indexed (tests/test_hostile_files.py has more).
    assert_error(client.get(f"/api/images/{target}/thumbnail"), 404, "file_changed")


def test_a_catalogued_path_replaced_by_a_fifo_is_refused(client, photo_folder):
    target = photo_id(client, "photo_1.jpg")
    (photo_folder / "photo_1.jpg").unlink()
    os.mkfifo(photo_folder / "photo_1.jpg")
    assert_error(client.get(f"/api/images/{target}/file"), 404, "file_unavailable")
    assert_error(client.get(f"/api/images/{target}/thumbnail"), 404, "file_unavailable")


# -- thumbnails -----------------------------------------------------------------------------
def test_thumbnail_is_an_oriented_jpeg(client):
    target = photo_id(client, "rotated.jpg")
    response = client.get(f"/api/images/{target}/thumbnail", params={"size": 128})
    assert response.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(response.content)) as thumb:
        assert thumb.format == "JPEG"
        assert thumb.size == (64, 128)  # stored 200x100 with orientation 6: shown 100x200
        top, bottom = thumb.getpixel((32, 10)), thumb.getpixel((32, 118))
    # Orientation 6 means "rotate 90 degrees clockwise to show": the stored left (blue)
    # half ends on top, the right (red) half at the bottom.
    assert top[2] > 150 and top[0] < 100 and bottom[0] > 150 and bottom[2] < 100


def test_thumbnail_is_cached_on_disk_with_etag(client, library):
    target = photo_id(client, "photo_2.jpg")
    first = client.get(f"/api/images/{target}/thumbnail")
    etag = first.headers["etag"]
    assert "max-age" in first.headers["cache-control"]
    with Image.open(io.BytesIO(first.content)) as thumb:
        assert max(thumb.size) == 256
    cached = list((library / "thumbnails" / "256").rglob("*.jpg"))
    assert len(cached) == 1
    again = client.get(f"/api/images/{target}/thumbnail", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    second = client.get(f"/api/images/{target}/thumbnail")
    assert second.content == first.content and second.headers["etag"] == etag
    assert_error(client.get(f"/api/images/{target}/thumbnail", params={"size": 300}), 422,
                 "invalid_request")


def test_thumbnail_survives_a_read_only_cache(client, library):
    target = photo_id(client, "photo_3.jpg")
    (library / "thumbnails").mkdir(exist_ok=True)
    (library / "thumbnails" / "512").write_text("a file where the cache folder would go")
    response = client.get(f"/api/images/{target}/thumbnail", params={"size": 512})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"


# -- index jobs -----------------------------------------------------------------------------
def wait_for_job(client, url: str, timeout: float = 300.0) -> dict:
    """Poll an index job until it ends; the deadline only stops a job that never would."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(url).json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.05)
    raise TimeoutError(job)


def test_index_job_adds_photos_and_search_sees_them(client, tmp_path):
    more = tmp_path / "more"
    more.mkdir()
    for i in range(3):
        Image.new("RGB", (90, 60), (i * 80, 10, 10)).save(more / f"new_{i}.png")
    (more / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    started = client.post("/api/index", json={"paths": [str(more)]})
    assert started.status_code == 202, started.text
    job = wait_for_job(client, started.json()["status_url"])
    assert job["state"] == "done", job
    assert (job["total"], job["done"], job["failed"]) == (4, 4, 1)
    assert job["report"]["indexed"] == 3 and job["report"]["failures"][0]["path"].endswith(
        "broken.jpg"
    )
    assert client.get("/api/info").json()["images"] == 10
    names = {r["path"].rsplit("/", 1)[-1] for r in
             client.get("/api/search", params={"q": "x", "k": 50}).json()["results"]}
    assert {"new_0.png", "new_1.png", "new_2.png"} <= names
    assert any(j["id"] == job["id"] for j in client.get("/api/index").json()["jobs"])


def test_index_job_switches_the_index_kind_and_info_shows_it(client, tmp_path):
    assert client.get("/api/info").json()["index"]["kind"] == "exact"
    (tmp_path / "kind").mkdir()
    Image.new("RGB", (50, 50), (9, 2, 3)).save(tmp_path / "kind" / "one.png")
    started = client.post("/api/index", json={"paths": ["kind"], "index": "ivf"})
    assert started.status_code == 202, started.text
    job = wait_for_job(client, started.json()["status_url"])
    assert job["state"] == "done" and job["report"]["index_rebuilt"] == "ivf", job
    # A search picks up the new checkpoint; info then describes the index it serves.
    assert len(client.get("/api/search", params={"q": "x", "k": 8}).json()["results"]) == 8
    index = client.get("/api/info").json()["index"]
    assert index["kind"] == "ivf" and index["choice"] == "ivf" and index["count"] == 8
    assert "recall_at_10" in index and index["nprobe"] >= 1
    refused = client.post("/api/index", json={"paths": ["kind"], "index": "hnsw"})
    assert refused.status_code == 422


def test_index_paths_relative_to_the_root(client, tmp_path):
    (tmp_path / "rel").mkdir()
    Image.new("RGB", (50, 50), (1, 2, 3)).save(tmp_path / "rel" / "one.png")
    started = client.post("/api/index", json={"paths": ["rel"]})
    assert started.status_code == 202, started.text
    assert wait_for_job(client, started.json()["status_url"])["state"] == "done"


def test_index_paths_cannot_leave_the_root(client, tmp_path):
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (tmp_path / "escape").symlink_to(outside)
    cases = [
        "/etc",
        "../",
        f"{tmp_path}/../{outside.name}",
        "escape",
        f"{tmp_path}/escape/",
        "%2e%2e%2fetc",
    ]
    for path in cases:
        response = client.post("/api/index", json={"paths": [path]})
        assert response.status_code in (400, 403), (path, response.text)
    assert_error(client.post("/api/index", json={"paths": ["no/such/folder"]}), 400, "bad_query")
    assert_error(client.post("/api/index", json={"paths": ["a\x00b"]}), 400, "bad_query")
    assert_error(client.post("/api/index", json={"paths": []}), 422, "invalid_request")
    assert_error(client.post("/api/index", json={"paths": "/etc"}), 422, "invalid_request")
    assert_error(client.post("/api/index", content=b"{not json"), 422, "invalid_request")


def test_indexing_is_off_without_an_index_root(library, fake_encoder, photo_folder):
    with served(library, fake_encoder) as (_, client):
        response = client.post("/api/index", json={"paths": [str(photo_folder)]})
        assert_error(response, 403, "forbidden")
        assert "--index-root" in response.json()["error"]["message"]


def test_unknown_job_is_404(client):
    assert_error(client.get("/api/index/0123abcd"), 404, "not_found")
    assert_error(client.get("/api/index/..%2f..%2fetc"), 404, "not_found")


# -- headers --------------------------------------------------------------------------------
def test_security_headers_and_page_csp(client):
    page = client.get("/")
    assert page.status_code == 200 and "<title>clipdex</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    api = client.get("/api/info")
    assert api.headers["x-content-type-options"] == "nosniff"
    assert client.get("/static/app.js").status_code == 200


def test_an_index_run_by_another_process_is_picked_up_without_restart(
    client, tmp_path, fake_encoder
):
    """Like `clipdex index` in another process: its own Library handle and checkpoints."""
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.new("RGB", (70, 70), (250, 250, 0)).save(extra / "late.png")
    before = client.get("/api/search", params={"q": "late", "k": 100}).json()["results"]
    with Library.open(tmp_path / "library") as other:
        index_paths(other, fake_encoder, [extra])
    after = client.get("/api/search", params={"q": "late", "k": 100}).json()["results"]
    assert len(after) == len(before) + 1
    assert any(hit["path"].endswith("late.png") for hit in after)
