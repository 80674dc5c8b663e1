"""Bearer-token auth, readiness while loading, and a model that fails to load."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from indexer.errors import WeightsUnavailable
from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library
from retrieval.server import Settings, create_app
from retrieval.server.settings import exposure_warning
from tests.live_server import LiveServer, served

TOKEN = "s3cret-token"


@pytest.fixture
def library(tmp_path, photo_folder, fake_encoder):
    root = tmp_path / "library"
    with Library.open(root, create=True) as lib:
        index_paths(lib, fake_encoder, [photo_folder])
    return root


@pytest.fixture
def guarded(library, fake_encoder):
    with (
        served(library, fake_encoder, token=TOKEN) as (server, _),
        httpx.Client(base_url=server.url, timeout=30) as anonymous,
    ):
        yield anonymous


BEARER = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/api/info"),
        ("GET", "/readyz"),
        ("GET", "/api/search?q=x"),
        ("GET", "/api/images/1"),
        ("GET", "/api/images/1/file"),
        ("GET", "/api/images/1/thumbnail"),
        ("POST", "/api/index"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/models"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/no/such/route"),
    ],
)
def test_every_route_but_health_needs_the_token(guarded, method, url):
    response = guarded.request(method, url)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"] == "Bearer"
    wrong = guarded.request(method, url, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def test_health_and_page_shell_need_no_token(guarded):
    assert guarded.get("/healthz").status_code == 200
    assert guarded.get("/").status_code == 200
    assert guarded.get("/static/app.js").status_code == 200


def test_the_token_opens_the_api(guarded):
    assert guarded.get("/api/info", headers=BEARER).json()["auth"] is True
    hits = guarded.get("/api/search", params={"q": "x"}, headers=BEARER).json()["results"]
    assert guarded.get(hits[0]["thumbnail_url"], headers=BEARER).status_code == 200


def test_page_session_cookie(guarded):
    assert guarded.post("/api/session", json={"token": "wrong"}).status_code == 401
    login = guarded.post("/api/session", json={"token": TOKEN})
    assert login.status_code == 204
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert TOKEN not in cookie  # a MAC of the token, not the token
    assert guarded.get("/api/info").status_code == 200  # the client kept the cookie
    guarded.delete("/api/session")
    guarded.cookies.clear()
    assert guarded.get("/api/info").status_code == 401


def test_malformed_auth_headers_are_401_not_500(guarded):
    for headers in (
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer " + "x" * 10_000},
        {"Cookie": 'clipdex_session="unterminated'},
        {"Cookie": "clipdex_session=\x7f\x01"},  # uvicorn's parser may refuse it: 400
    ):
        assert guarded.get("/api/info", headers=headers).status_code in (400, 401)


def test_exposure_warning():
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("localhost", None) is None
    assert exposure_warning("0.0.0.0", TOKEN) is None
    assert "--token" in exposure_warning("0.0.0.0", None)


# -- readiness -----------------------------------------------------------------------------
def test_not_ready_while_the_model_loads(library, fake_encoder, request):
    release = threading.Event()
    request.addfinalizer(release.set)  # the model "loads" when the test says so, not at 30 s

    def slow_model():
        release.wait(600)
        return fake_encoder

    app = create_app(Settings(library=library), encoder=slow_model)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        assert "Retry-After" in ready.headers
        search = client.get("/api/search", params={"q": "x"})
        assert search.status_code == 503 and "loading" in search.json()["error"]["message"]
        # What needs no model works already (once the library is open).
        server_state = app.state.clipdex
        deadline = time.monotonic() + 120  # a poll, not a fixed 5 s: loaded CI boxes are slow
        while server_state.library_state != "ready" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/api/images/1/similar").status_code == 200
        assert client.get("/api/info").json()["model_state"] == "loading"
        release.set()
        server.wait_ready(30)
        assert client.get("/api/search", params={"q": "x"}).status_code == 200


def test_a_model_that_cannot_load_is_reported(library):
    def no_weights():
        raise WeightsUnavailable("weights file /nowhere.bin does not exist: download it")

    app = create_app(Settings(library=library), encoder=no_weights)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        app.state.clipdex.loaded.wait(30)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "/nowhere.bin" in ready.json()["error"]["message"]
        assert client.get("/api/info").json()["model_state"] == "failed"
        embed = client.post("/v1/embeddings", json={"model": "mobileclip-s2", "input": "x"})
        assert embed.status_code == 503
        assert client.get("/api/images/1/similar").status_code == 200


def test_a_damaged_library_is_reported_not_crashed(tmp_path, fake_encoder):
    root = tmp_path / "library"
    root.mkdir()
    (root / "catalog.sqlite").write_bytes(b"this is not a database" * 100)
    app = create_app(Settings(library=root), encoder=fake_encoder)
    with LiveServer(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        app.state.clipdex.loaded.wait(30)
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "catalog" in ready.json()["error"]["message"]
        assert client.get("/api/search", params={"q": "x"}).status_code == 503
        assert client.get("/api/info").json()["library_state"] == "failed"
