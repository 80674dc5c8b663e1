"""Slow and greedy clients cannot hold the server: header, body and response deadlines,
the header size cap, the connection cap and the model-wait limit (retrieval.server.serving).

Over a real uvicorn server on loopback with ``clipdex serve``'s own uvicorn configuration,
the deadlines shortened to a second or so; clients are raw sockets that misbehave on
purpose. After each attack, a well-behaved request still gets its answer.

No test is decided by how fast a loaded machine runs: a deadline's effect is shown by the
server's own log line (which mechanism closed the connection), by how much of a dribble got
through before the cut, or by a bound far from the alternative (a generous wait, never a
tight "within 4 s"); sleeps that waited for the server are polls with long deadlines.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library
from tests.live_server import raw_request, served
from tests.test_server import assert_error


@pytest.fixture
def library(tmp_path, photo_folder, fake_encoder):
    root = tmp_path / "library"
    with Library.open(root, create=True) as lib:
        index_paths(lib, fake_encoder, [photo_folder])
    return root


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


HEADER_CUT = "closing a connection whose request headers took over"
SLOW_READER_CUT = "dropping a client that took no response bytes"


@pytest.fixture
def server_log(caplog) -> pytest.LogCaptureFixture:
    """The server's own log (clipdex.server), which says why it closed a connection."""
    caplog.set_level(logging.INFO, logger="clipdex.server")
    return caplog


def wait_for_log(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 60.0) -> None:
    """Poll until the server has logged ``text`` (it runs in a thread of this process)."""
    deadline = time.monotonic() + timeout
    while not any(text in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, f"the server never logged {text!r}"
        time.sleep(0.02)


def seconds_until_closed(sock: socket.socket, limit: float = 60.0) -> float:
    """How long until the server closes ``sock`` (reading and dropping what it sends);
    fails if it is still open after ``limit`` seconds without a byte."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for over {limit} s")
    return time.monotonic() - started


def dribble(sock: socket.socket, data: bytes, pause: float) -> int:
    """Send ``data`` one byte every ``pause`` seconds until the server answers or closes;
    returns how many bytes went out before that (``len(data)``: it never reacted)."""
    for sent, byte in enumerate(data):
        if select.select([sock], [], [], 0)[0]:  # an answer, or the server closed
            return sent
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return sent
        time.sleep(pause)
    return len(data)


def read_all(sock: socket.socket, limit: float = 60.0) -> bytes:
    """Everything the server sends until it closes (a reset ends it too)."""
    answer = b""
    sock.settimeout(limit)
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def poll_status(url: str, wanted: int, timeout: float = 60.0) -> tuple[int, bytes]:
    """GET /healthz on fresh connections until it answers ``wanted`` (or time runs out)."""
    deadline = time.monotonic() + timeout
    while True:
        status, answer = raw_request(url, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        if status == wanted or time.monotonic() > deadline:
            return status, answer
        time.sleep(0.05)


def still_serves(client: httpx.Client) -> None:
    assert client.get("/api/search", params={"q": "still here"}).status_code == 200


def jpeg(size=(64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(out, "JPEG")
    return out.getvalue()


def upload_request(body_length: int, boundary: bytes = b"xyz") -> bytes:
    return (
        b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n"
        b"Content-Length: %d\r\n\r\n" % body_length
    )


def multipart(data: bytes, boundary: bytes = b"xyz") -> bytes:
    return (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="q.jpg"'
        b"\r\nContent-Type: image/jpeg\r\n\r\n" + data + b"\r\n--" + boundary + b"--\r\n"
    )


# -- headers ----------------------------------------------------------------------------------
def test_a_connection_that_sends_nothing_is_closed(library, fake_encoder, server_log):
    with served(library, fake_encoder, header_timeout=1.0) as (live, client):
        with connect(live.url) as idle:
            assert seconds_until_closed(idle) > 0.8  # not before its deadline
        assert any(HEADER_CUT in r.getMessage() for r in server_log.records)
        still_serves(client)


def test_headers_dribbled_byte_by_byte_are_cut_off(library, fake_encoder, server_log):
    """Slowloris: each byte comes before any per-read timeout would fire, the whole never.

    The dribble would take over 50 s; the 1 s header deadline must cut it part way."""
    with served(library, fake_encoder, header_timeout=1.0) as (live, client):
        headers = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 1000
        with connect(live.url) as sock:
            sent = dribble(sock, headers, pause=0.05)
        assert sent < len(headers), "the whole dribble went through"
        assert any(HEADER_CUT in r.getMessage() for r in server_log.records)
        still_serves(client)


def test_a_keep_alive_connection_must_send_its_next_headers_in_time(
    library, fake_encoder, server_log
):
    """The deadline starts again after each answer: a slow second request is cut off too
    (by the header deadline, as the server's log says, not by some other timer)."""
    with served(library, fake_encoder, header_timeout=1.0) as (live, client):
        with connect(live.url) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # ... and the rest never comes
            seconds_until_closed(sock)
        assert any(HEADER_CUT in r.getMessage() for r in server_log.records)
        still_serves(client)


def test_requests_in_flight_are_not_cut_by_the_header_deadline(library, fake_encoder):
    """A request whose headers arrived may take longer than the header deadline."""
    slow = SlowTexts(fake_encoder, delay=1.6)
    with served(library, slow, header_timeout=0.5) as (_, client):
        slow.armed.set()
        assert client.get("/api/search", params={"q": "slow one"}).status_code == 200


def test_oversized_headers_are_refused(library, fake_encoder):
    """Header bytes that keep coming are cut at serving.MAX_HEADER_BYTES of buffered,
    incomplete headers (what one socket read brings in whole is bounded by the read size)."""
    with served(library, fake_encoder) as (live, client):
        for header in (b"X-Big: " + b"a" * (1 << 20), b"X-More: b\r\n" * 100_000):
            answer = b""
            with connect(live.url) as sock:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + header)
                with contextlib.suppress(ConnectionResetError):
                    while chunk := sock.recv(65536):
                        answer += chunk
            assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:200]
        still_serves(client)


# -- bodies -----------------------------------------------------------------------------------
def test_a_dribbled_upload_is_answered_408(library, fake_encoder):
    with served(library, fake_encoder, request_timeout=1.0) as (live, client):
        body = multipart(jpeg())
        with connect(live.url) as sock:
            sock.sendall(upload_request(len(body)) + body[:100])
            # One byte every 0.1 s: the rest of the body would take minutes, so the answer
            # must come while it is still dribbling in (a whole body would be answered 200).
            sent = dribble(sock, body[100:], pause=0.1)
            answer = read_all(sock)
        assert sent < len(body) - 100, "the whole body went through"
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b'"code":"timeout"' in answer and b"--request-timeout" in answer
        still_serves(client)


def test_an_upload_that_stops_half_way_is_answered_408(library, fake_encoder):
    with served(library, fake_encoder, request_timeout=1.0) as (live, client):
        body = multipart(jpeg())
        status, answer = raw_request(live.url, upload_request(len(body)) + body[: len(body) // 2])
        assert status == 408, answer[:300]
        still_serves(client)


def test_a_slow_but_steady_upload_within_the_deadline_is_served(library, fake_encoder):
    # Five pieces 0.3 s apart (~1.5 s) against a 10 s deadline: a loaded machine cannot
    # push it over, a deadline that fired per pause or per piece still would.
    with served(library, fake_encoder, request_timeout=10.0) as (live, _):
        body = multipart(jpeg())
        with connect(live.url) as sock:
            sock.sendall(upload_request(len(body)))
            step = len(body) // 5 + 1
            for start in range(0, len(body), step):
                sock.sendall(body[start : start + step])
                time.sleep(0.3)
            answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]


# -- responses --------------------------------------------------------------------------------
def test_a_client_that_stops_reading_is_dropped(tmp_path, fake_encoder, server_log):
    """Slow read: the answer (a large original) fills the socket buffers and the client takes
    nothing more; the server gives up on it instead of holding the send for ever."""
    big = tmp_path / "big"
    big.mkdir()
    noise = Image.effect_noise((3000, 2400), 120).convert("RGB")
    noise.save(big / "noise.png", compress_level=0)  # ~21 MB, incompressible
    size = (big / "noise.png").stat().st_size
    library = tmp_path / "library"
    with Library.open(library, create=True) as lib:
        index_paths(lib, fake_encoder, [big])
    with served(library, fake_encoder, request_timeout=1.0) as (live, client):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        host, port = live.url.removeprefix("http://").rsplit(":", 1)
        sock.connect((host, int(port)))
        sock.sendall(b"GET /api/images/1/file HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        # Read nothing until the server, its send stalled past the deadline, gives up.
        wait_for_log(server_log, SLOW_READER_CUT)
        received = 0
        sock.settimeout(10)
        try:
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        sock.close()
        assert 0 < received < size  # part of it, then the server closed the connection
        still_serves(client)
        assert len(client.get("/api/images/1/file").content) == size


# -- connections and the model ---------------------------------------------------------------
def test_connections_beyond_the_cap_get_503_at_once(library, fake_encoder):
    with served(library, fake_encoder, max_connections=4, header_timeout=30.0) as (live, client):
        client.close()  # its keep-alive connection would count too
        idle = [connect(live.url) for _ in range(4)]
        # Until the server has taken in all four, a probe may still get in (and leave).
        # "At once": each probe must be answered within raw_request's 10 s, whereas a
        # connection left waiting for a slot would wait out the 30 s header deadline.
        status, answer = poll_status(live.url, 503)
        assert status == 503, answer
        head, _, body = answer.partition(b"\r\n\r\n")
        headers = dict(line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:])
        assert headers["content-type"] == "application/json"
        assert int(headers["retry-after"]) > 0 and headers["connection"] == "close"
        error = json.loads(body)["error"]
        assert error["code"] == "overloaded" and "--max-connections" in error["message"]
        for sock in idle:
            sock.close()
        assert poll_status(live.url, 200)[0] == 200  # once the server has seen them go


class SlowTexts:
    """The fake encoder, with text queries (and images, if asked) taking ``delay`` seconds
    once armed."""

    def __init__(self, inner, delay: float, images: bool = False) -> None:
        self.inner = inner
        self.identity = inner.identity
        self.logit_scale = inner.logit_scale
        self.delay = delay
        self.slow_images = images
        self.armed = threading.Event()
        self.runs = 0

    def encode_images(self, batch):
        if self.slow_images and self.armed.is_set():
            time.sleep(self.delay)
        return self.inner.encode_images(batch)

    def encode_texts(self, texts):
        if self.armed.is_set():
            self.runs += 1
            time.sleep(self.delay)
        return self.inner.encode_texts(texts)


def test_queries_that_wait_too_long_for_the_model_get_503(library, fake_encoder):
    """The model runs one query at a time; one that cannot start within --request-timeout
    is answered 503 with Retry-After and taken off the queue (it never runs)."""
    slow = SlowTexts(fake_encoder, delay=0.6)
    with served(library, slow, request_timeout=1.0) as (live, _):
        slow.armed.set()

        def search(i: int) -> httpx.Response:
            return httpx.get(f"{live.url}/api/search", params={"q": f"query {i}"}, timeout=30)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(search, range(6)))
        statuses = sorted(a.status_code for a in answers)
        assert 200 in statuses and 503 in statuses, statuses
        busy = next(a for a in answers if a.status_code == 503)
        assert_error(busy, 503, "overloaded")
        assert busy.headers["retry-after"]
        time.sleep(1.0)  # anything still queued would have run by now
        assert slow.runs < len(answers), slow.runs  # the ones that timed out while queued
        assert httpx.get(f"{live.url}/healthz").status_code == 200


def test_index_jobs_are_not_bound_by_the_query_time_limit(library, fake_encoder, tmp_path):
    """A batch of an index job may wait and run as long as it takes."""
    from tests.test_server import wait_for_job

    folder = tmp_path / "more"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (60, 40), (80 * i, 10, 10)).save(folder / f"n{i}.png")
    slow = SlowTexts(fake_encoder, delay=0.8, images=True)
    with served(library, slow, request_timeout=0.3, index_roots=(tmp_path,)) as (_, client):
        slow.armed.set()
        started = client.post("/api/index", json={"paths": [str(folder)]})
        job = wait_for_job(client, started.json()["status_url"])
        assert job["state"] == "done" and job["report"]["indexed"] == 3, job
