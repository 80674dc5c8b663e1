"""Hostile Host and Origin: DNS rebinding and cross-site requests (retrieval.server.origin).

A live server without a token (the default) is attacked the way a hostile web page in the
user's browser would: requests with an attacker's ``Host`` (a rebound DNS name), form
POSTs and ``fetch``es from another site's ``Origin``, ``<img>`` loads marked
``Sec-Fetch-Site: cross-site``. Each is refused with the JSON error shape before any route
runs (the model is never called), while ``/readyz`` and a normal search keep answering the
same as before, during the attack and after it.
"""

from __future__ import annotations

import http.server
import io
import os
import threading
import time

import httpx
import pytest
from PIL import Image

from indexer.errors import ConfigError
from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library
from retrieval.server import Settings
from retrieval.server.origin import HostPolicy, split_host, split_origin
from retrieval.server.settings import allowed_hosts
from tests.conftest import FakeEncoder
from tests.live_server import raw_request, served

EVIL = "evil.example"


def make_photos(folder) -> None:
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (64 + 8 * i, 48), (60 * i, 255 - 60 * i, 90)).save(folder / f"p{i}.jpg")


@pytest.fixture(scope="module")
def encoder() -> FakeEncoder:
    return FakeEncoder()


@pytest.fixture(scope="module")
def library(tmp_path_factory, encoder):
    base = tmp_path_factory.mktemp("hostile-host")
    make_photos(base / "photos")
    with Library.open(base / "library", create=True) as lib:
        index_paths(lib, encoder, [base / "photos"])
    return base / "library"


@pytest.fixture(scope="module")
def server(library, encoder):
    """A tokenless server on 127.0.0.1 with default settings; yields (url, client)."""
    with served(library, encoder) as (live, client):
        yield live.url, client


def baseline(client: httpx.Client) -> list[int]:
    """The ids a normal search answers; /readyz answers ready."""
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    search = client.get("/api/search", params={"q": "a red photo", "k": 4})
    assert search.status_code == 200, search.text
    ids = [hit["id"] for hit in search.json()["results"]]
    assert ids
    return ids


def assert_refused(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    return error


# -- the policy, as plain functions -------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("localhost:8000", ("localhost", 8000)),
        ("LOCALHOST.", ("localhost", None)),
        ("127.0.0.1", ("127.0.0.1", None)),
        ("[::1]:8000", ("::1", 8000)),
        ("photos.example.com:443", ("photos.example.com", None)),
        ("", None),
        ("a b", None),
        ("evil.example:80@127.0.0.1", None),
        ("[::1", None),
        ("::1", None),  # an IPv6 address needs brackets in Host
        ("host:99999", None),
        ("host:port", None),
        ("hé.example", None),
    ],
)
def test_split_host(value, parsed):
    assert split_host(value) == parsed


def test_split_origin():
    assert split_origin("http://127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert split_origin("https://photos.example.com") == ("photos.example.com", None)
    assert split_origin("https://photos.example.com:443") == ("photos.example.com", None)
    assert split_origin("null") is None
    assert split_origin("file://") is None


@pytest.mark.parametrize(
    ("name", "default", "listed"),
    [
        ("127.0.0.1", True, True),
        ("10.1.2.3", True, True),  # an IP literal involves no DNS: nothing to rebind
        ("::1", True, True),
        ("localhost", True, True),
        ("photos.localhost", True, True),
        (EVIL, False, False),
        ("localhost.evil.example", False, False),
        ("127.0.0.1.nip.io", False, False),
        ("photos.example.com", False, True),
        ("nas.lan", False, True),  # listed as ".lan"
        ("lan", False, True),
        ("evillan", False, False),
    ],
)
def test_host_policy(name, default, listed):
    assert HostPolicy().host_allowed(name) is default
    assert HostPolicy(("photos.example.com", ".lan")).host_allowed(name) is listed
    assert HostPolicy(("*",)).host_allowed(name) is True


def test_allowed_hosts_setting():
    assert allowed_hosts(["Photos.Example.com.,.lan", "*", " ::1 "]) == (
        "photos.example.com",
        ".lan",
        "*",
        "::1",
    )
    for bad in ("https://photos.example.com", "photos.example.com:8443", "a/b", "bad host"):
        with pytest.raises(ConfigError, match="--allowed-host"):
            Settings(library="unused", allowed_hosts=(bad,))


def test_serve_reads_allowed_hosts_from_flag_and_environment(monkeypatch, tmp_path):
    """`clipdex serve --allowed-host`, repeatable, and CLIPDEX_ALLOWED_HOSTS, comma-separated."""
    from typer.testing import CliRunner

    from retrieval.cli.app import app as cli
    from retrieval.server import serving

    seen = {}
    monkeypatch.setattr(
        serving, "run_server", lambda app, settings, *a, **k: seen.update(s=settings)
    )
    monkeypatch.setenv("CLIPDEX_ALLOWED_HOSTS", "a.example,.lan")
    result = CliRunner().invoke(cli, ["serve", "--library", str(tmp_path / "lib"), "-q"])
    assert result.exit_code == 0, result.output
    assert set(seen["s"].allowed_hosts) >= {"a.example", ".lan", "127.0.0.1"}
    args = ["serve", "--library", str(tmp_path / "lib"), "-q", "--allowed-host", "b.example"]
    result = CliRunner().invoke(cli, [*args, "--allowed-host", "c.example", "--host", "nas"])
    assert result.exit_code == 0, result.output
    assert set(seen["s"].allowed_hosts) == {"b.example", "c.example", "nas"}
    result = CliRunner().invoke(cli, [*args[:4], "--allowed-host", "https://x.example"])
    assert result.exit_code != 0 and "--allowed-host" in result.output


# -- DNS rebinding: a Host this server is not ---------------------------------------------
@pytest.mark.parametrize(
    "path", ["/api/images/1/file", "/api/info", "/api/search?q=x", "/readyz", "/", "/healthz"]
)
def test_a_rebound_host_is_refused(server, path):
    url, client = server
    port = url.rsplit(":", 1)[1]
    response = client.get(path, headers={"Host": f"{EVIL}:{port}"})
    error = assert_refused(response, 421, "bad_host")
    assert EVIL in error["message"] and f"--allowed-host {EVIL}" in error["message"]
    assert "image" not in response.headers["content-type"]


@pytest.mark.parametrize(
    "host",
    [b"localhost.evil.example", b"127.0.0.1.nip.io", b"x", b"[::1", b"h\xc3\xa9.example", b""],
)
def test_odd_host_headers_are_refused_without_a_500(server, host):
    url, _ = server
    request = b"GET /api/info HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n"
    status, answer = raw_request(url, request)
    assert status in (400, 421), answer[:300]  # h11 may refuse a malformed one first


def test_two_host_headers_are_refused(server):
    url, _ = server
    request = (
        b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: " + EVIL.encode() + b"\r\n"
        b"Connection: close\r\n\r\n"
    )
    status, _ = raw_request(url, request)
    assert status in (400, 421)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "photos.localhost"])
def test_loopback_names_and_addresses_are_answered(server, host):
    url, client = server
    port = url.rsplit(":", 1)[1]
    assert client.get("/api/info", headers={"Host": f"{host}:{port}"}).status_code == 200


# -- cross-site requests ------------------------------------------------------------------
def upload() -> dict:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, "PNG")
    return {"file": ("q.png", buffer.getvalue(), "image/png")}


CROSS_SITE = [
    ({"Origin": f"http://{EVIL}"}, "Origin"),
    ({"Origin": "null"}, "Origin: null"),  # a sandboxed frame, a file:// page
    ({"Origin": "http://127.0.0.1:1"}, "Origin"),  # another local port is another origin
    ({"Origin": "http://localhost"}, "Origin"),
    ({"Sec-Fetch-Site": "cross-site"}, "Sec-Fetch-Site"),
]

POSTS = [
    ("/api/index", {"json": {"paths": ["/tmp"]}}),
    ("/api/index", {"data": {"paths": "/tmp"}}),  # a plain HTML form
    ("/api/classify?image_id=1", {"json": {"labels": ["cat", "dog"]}}),
    ("/v1/embeddings", {"json": {"model": "mobileclip-s2", "input": "a dog"}}),
    ("/api/search/image", {"files": upload()}),
    ("/api/session", {"json": {"token": "x"}}),
]


@pytest.mark.parametrize(("headers", "why"), CROSS_SITE, ids=lambda v: str(v)[:40])
@pytest.mark.parametrize(("path", "body"), POSTS, ids=lambda v: str(v)[:24])
def test_cross_site_posts_are_refused_before_the_model(server, encoder, headers, why, path, body):
    _, client = server
    texts, images = encoder.texts_encoded, encoder.images_encoded
    error = assert_refused(client.post(path, headers=headers, **body), 403, "cross_site")
    assert why in error["message"] and "--allowed-host" in error["message"]
    assert (encoder.texts_encoded, encoder.images_encoded) == (texts, images)


def test_cross_site_logout_and_reads_are_refused(server):
    _, client = server
    img = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
    for path in ("/api/images/1/thumbnail", "/api/images/1/file", "/api/search?q=x"):
        assert_refused(client.get(path, headers=img), 403, "cross_site")
    frame = {**img, "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}
    assert_refused(client.get("/api/images/1/file", headers=frame), 403, "cross_site")
    fetched = {"Origin": f"https://{EVIL}", "Sec-Fetch-Site": "cross-site"}
    assert_refused(client.get("/v1/models", headers=fetched), 403, "cross_site")
    assert_refused(client.delete("/api/session", headers=fetched), 403, "cross_site")


def test_what_stays_open_across_sites(server):
    """A person following a link, the page shell and liveness: nothing to steal there."""
    _, client = server
    link = {
        "Sec-Fetch-Site": "cross-site",
        "Sec-Fetch-Mode": "navigate",
        "Sec-Fetch-Dest": "document",
    }
    assert client.get("/api/images/1", headers=link).status_code == 200
    for path in ("/", "/static/app.js", "/healthz"):
        assert client.get(path, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_same_origin_and_non_browser_clients_pass(server, encoder):
    url, client = server
    body = {"model": "mobileclip-s2", "input": "a dog"}
    own = {"Origin": url, "Sec-Fetch-Site": "same-origin"}
    assert client.post("/v1/embeddings", json=body, headers=own).status_code == 200
    port = url.rsplit(":", 1)[1]
    as_localhost = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
    assert client.post("/v1/embeddings", json=body, headers=as_localhost).status_code == 200
    user_typed = {"Sec-Fetch-Site": "none"}  # the address bar, a bookmark
    assert client.get("/api/search", params={"q": "x"}, headers=user_typed).status_code == 200
    assert client.post("/v1/embeddings", json=body).status_code == 200  # curl, the SDK


def test_the_service_stays_up_during_and_after_an_attack(server):
    """Rebinding and cross-site requests from 4 threads; meanwhile and afterwards /readyz
    and a normal search answer as before (within a generous deadline, not a speed test)."""
    url, client = server
    expected = baseline(client)
    stop = threading.Event()
    refused: list[int] = []
    port = url.rsplit(":", 1)[1]

    def attack() -> None:
        with httpx.Client(base_url=url, timeout=30) as hostile:
            while not stop.is_set():
                refused.append(
                    hostile.get("/api/info", headers={"Host": f"{EVIL}:{port}"}).status_code
                )
                post = hostile.post(
                    "/v1/embeddings",
                    json={"model": "mobileclip-s2", "input": ["a"] * 64},
                    headers={"Origin": f"http://{EVIL}"},
                )
                refused.append(post.status_code)

    threads = [threading.Thread(target=attack, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(refused) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)  # a poll: the attack is under way before the checks
        for _ in range(5):
            assert baseline(client) == expected
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert len(refused) >= 40 and set(refused) == {421, 403}
    assert baseline(client) == expected


# -- --allowed-host: a reverse proxy's name ------------------------------------------------
def test_allowed_hosts_for_a_reverse_proxy(library, encoder):
    with served(library, encoder, allowed_hosts=("photos.example.com", ".lan")) as (_, client):
        proxy = {"Host": "photos.example.com", "Origin": "https://photos.example.com"}
        body = {"model": "mobileclip-s2", "input": "a dog"}
        assert client.post("/v1/embeddings", json=body, headers=proxy).status_code == 200
        # A proxy that rewrites Host to the upstream's but passes Origin through.
        rewritten = {"Origin": "https://photos.example.com"}
        assert client.post("/v1/embeddings", json=body, headers=rewritten).status_code == 200
        assert client.get("/api/info", headers={"Host": "nas.lan:8000"}).status_code == 200
        assert_refused(client.get("/api/info", headers={"Host": EVIL}), 421, "bad_host")
        other = {"Origin": f"https://{EVIL}"}
        assert_refused(client.post("/v1/embeddings", json=body, headers=other), 403, "cross_site")


def test_any_host_still_refuses_cross_site(library, encoder):
    """``*`` switches the Host check off (unsafe), not the cross-site one."""
    with served(library, encoder, allowed_hosts=("*",)) as (_, client):
        assert client.get("/api/info", headers={"Host": EVIL}).status_code == 200
        hostile = {"Host": "127.0.0.1", "Origin": f"http://{EVIL}"}
        response = client.post("/api/index", json={"paths": ["/tmp"]}, headers=hostile)
        assert_refused(response, 403, "cross_site")


# -- the same attacks from a real browser --------------------------------------------------
EVIL_PAGE = """<!doctype html><html><body>
<form id="f" method="POST" action="{url}/api/index"><input name="paths" value="/"></form>
<img id="thumb" src="{url}/api/images/1/thumbnail?size=128">
</body></html>"""


SEARCH_BY_IMAGE = """async url => {
  const canvas = document.createElement('canvas');
  canvas.width = canvas.height = 32;
  canvas.getContext('2d').fillRect(0, 0, 16, 16);
  const form = new FormData();
  form.append('file', await new Promise(done => canvas.toBlob(done, 'image/png')), 'q.png');
  await fetch(url + '/api/search/image', {method: 'POST', mode: 'no-cors', body: form})
    .catch(() => null);  // the answer is opaque (or blocked) for the page either way
}"""


class EvilSite(http.server.ThreadingHTTPServer):
    url = ""


def evil_site(page: bytes) -> EvilSite:
    """Another site's page, served from http://evil.example:PORT (a loopback address, so
    chromium's private-network rules do not stop its requests before clipdex sees them)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args) -> None:
            pass

    site = EvilSite(("127.0.0.1", 0), Handler)
    site.url = f"http://{EVIL}:{site.server_address[1]}/"
    threading.Thread(target=site.serve_forever, daemon=True).start()
    return site


@pytest.fixture(scope="module")
def chromium():
    """Headless chromium in which ``evil.example`` resolves to 127.0.0.1: the end state of
    a DNS-rebinding attack, without a DNS server."""
    from tests.test_web import ARGS, CHROMIUM

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no browser: {CHROMIUM} is absent (apt-get install chromium)")
    rules = f"--host-resolver-rules=MAP {EVIL} 127.0.0.1"
    with sync_api.sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=CHROMIUM, args=[*ARGS, rules])
        except sync_api.Error as exc:
            pytest.skip(f"{CHROMIUM} cannot be started here: {str(exc).splitlines()[0]}")
        yield launched
        launched.close()


@pytest.mark.browser
def test_a_browser_on_a_rebound_name_gets_nothing(chromium, server):
    url, client = server
    port = url.rsplit(":", 1)[1]
    context = chromium.new_context()
    try:
        page = context.new_page()
        for path in ("/", "/api/info", "/api/images/1/file"):
            answer = page.goto(f"http://{EVIL}:{port}{path}")
            assert answer is not None and answer.status == 421
            assert answer.json()["error"]["code"] == "bad_host"
    finally:
        context.close()
    baseline(client)


@pytest.mark.browser
def test_a_browser_on_another_site_cannot_post_or_embed(chromium, server, encoder):
    """A page on another site embeds a thumbnail, uploads an image to search by (no-cors) and
    submits a form to /api/index: chromium's own Origin and Sec-Fetch-* headers get each
    one refused (no image, no model call, no job; the form's answer is 403 cross_site)."""
    url, client = server
    context = chromium.new_context()
    try:
        page = context.new_page()
        evil = evil_site(EVIL_PAGE.format(url=url).encode())
        texts = encoder.texts_encoded
        page.goto(evil.url)
        # The refusal is JSON, which chromium's ORB then keeps from the page: no image.
        page.wait_for_function("() => document.getElementById('thumb').complete")
        assert page.evaluate("document.getElementById('thumb').naturalWidth") == 0
        images = encoder.images_encoded
        page.evaluate(SEARCH_BY_IMAGE, url)  # a "simple" request: no preflight to stop it
        assert (encoder.texts_encoded, encoder.images_encoded) == (texts, images)
        with page.expect_response(lambda r: r.url.startswith(f"{url}/api/index")) as posted:
            page.evaluate("document.getElementById('f').submit()")
        assert posted.value.status == 403
        assert posted.value.json()["error"]["code"] == "cross_site"
        assert (encoder.texts_encoded, encoder.images_encoded) == (texts, images)
    finally:
        context.close()
        evil.shutdown()
    assert client.get("/api/index").json()["jobs"] == []  # no job was started
    baseline(client)
