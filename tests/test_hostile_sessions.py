"""Hostile sessions: the page's session ids end, and guessing the token is throttled.

The session store and the throttle are checked with a fake clock (no test waits for an
expiry); a live server with a token is then attacked: a stolen cookie replayed after
logout, after expiry and after a restart (same token or a new one), a forged or old-style
cookie, and a client guessing the token at the login and as a bearer header. The guesser
comes from 127.0.0.2 (loopback, another address), so the legitimate client on 127.0.0.1
shows that ``/readyz`` and a normal search keep answering during and after the attack.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time

import httpx
import pytest
from PIL import Image

from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library
from retrieval.server.security import (
    BACKOFF_CAP_SECONDS,
    FORGET_FAILURES_SECONDS,
    SESSION_COOKIE,
    LoginThrottle,
    Sessions,
    client_key,
)
from tests.conftest import FakeEncoder
from tests.live_server import served

TOKEN = "s3cret-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ATTACKER = "127.0.0.2"  # a second loopback address: another client to the throttle


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the store and the throttle, with a fake clock -----------------------------------------
def test_sessions_are_random_expire_and_can_be_revoked():
    clock = Clock()
    sessions = Sessions(ttl=100.0, clock=clock)
    first, second = sessions.create(), sessions.create()
    assert first != second and len(first) >= 40  # 32 random bytes, URL-safe
    assert sessions.valid(first) and sessions.valid(second)
    assert not sessions.valid("made-up") and not sessions.valid("")
    sessions.revoke(first)
    assert not sessions.valid(first) and sessions.valid(second)
    clock.now += 99.0
    assert sessions.valid(second)
    clock.now += 2.0
    assert not sessions.valid(second) and len(sessions) == 0


def test_the_session_store_is_bounded():
    sessions = Sessions(ttl=100.0, clock=Clock(), limit=3)
    ids = [sessions.create() for _ in range(5)]
    assert len(sessions) == 3
    assert [sessions.valid(i) for i in ids] == [False, False, True, True, True]


def test_throttle_backs_off_doubling_and_forgets():
    clock = Clock()
    throttle = LoginThrottle(free=3, backoff=2.0, clock=clock)
    assert [throttle.failed("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert throttle.retry_after("a") == 0.0
    assert throttle.failed("a") == 2.0 and throttle.retry_after("a") == 2.0
    assert throttle.retry_after("b") == 0.0  # another address is not held
    clock.now += 2.0
    assert throttle.failed("a") == 4.0
    clock.now += 4.0
    assert throttle.failed("a") == 8.0
    for _ in range(20):
        clock.now += throttle.retry_after("a")
        wait = throttle.failed("a")
    assert wait == BACKOFF_CAP_SECONDS
    throttle.succeeded("a")  # the right token: a clean slate
    assert throttle.retry_after("a") == 0.0 and throttle.failed("a") == 0.0
    for _ in range(3):
        throttle.failed("c")
    clock.now += FORGET_FAILURES_SECONDS + 1  # an hour without a failure: forgotten
    assert throttle.failed("c") == 0.0


def test_the_throttle_table_is_bounded():
    throttle = LoginThrottle(free=0, backoff=10.0, clock=Clock(), limit=2)
    for client in ("a", "b", "c"):
        throttle.failed(client)
    assert throttle.retry_after("a") == 0.0  # the oldest was forgotten
    assert throttle.retry_after("c") == 10.0


def test_client_key_groups_an_ipv6_machine():
    key = client_key({"client": ("2001:db8:1:2:aaaa::1", 1)})
    assert key == client_key({"client": ("2001:db8:1:2:bbbb::9", 1)}) == "2001:db8:1:2::/64"
    assert client_key({"client": ("::ffff:10.0.0.1", 1)}) == "10.0.0.1"
    assert client_key({"client": ("10.0.0.1", 1)}) == "10.0.0.1"
    assert client_key({"client": None}) == "unknown"


# -- a live server with a token --------------------------------------------------------------
@pytest.fixture(scope="module")
def library(tmp_path_factory):
    base = tmp_path_factory.mktemp("hostile-sessions")
    (base / "photos").mkdir()
    for i in range(4):
        image = Image.new("RGB", (64 + 8 * i, 48), (60 * i, 90, 255 - 60 * i))
        image.save(base / "photos" / f"p{i}.jpg")
    with Library.open(base / "library", create=True) as lib:
        index_paths(lib, FakeEncoder(), [base / "photos"])
    return base / "library"


@pytest.fixture
def server(library):
    """A fresh server (empty session store and throttle) with a token; the first back-off
    is an hour, so a lock-out cannot lapse while a test looks at it."""
    with served(library, FakeEncoder(), token=TOKEN, auth_backoff=3600.0) as (live, client):
        yield live, client


def login(url: str, token: str = TOKEN, **client_options) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=30, **client_options) as client:
        return client.post("/api/session", json={"token": token})


def with_cookie(value: str) -> dict:
    return {"Cookie": f"{SESSION_COOKIE}={value}"}


def normal_search_works(client: httpx.Client) -> None:
    """/readyz and a search, by the legitimate client's bearer token, answer as usual."""
    ready = client.get("/readyz", headers=BEARER)
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    search = client.get("/api/search", params={"q": "a photo", "k": 4}, headers=BEARER)
    assert search.status_code == 200 and len(search.json()["results"]) == 4, search.text


def test_the_cookie_is_random_and_its_attributes_consistent(server):
    live, client = server
    first, second = login(live.url), login(live.url)
    assert first.status_code == second.status_code == 204
    values = [r.cookies[SESSION_COOKIE] for r in (first, second)]
    assert values[0] != values[1]  # not derived from the token
    mac = hmac.new(TOKEN.encode(), b"clipdex-session", hashlib.sha256).hexdigest()
    assert mac not in values and TOKEN not in first.headers["set-cookie"]
    attributes = [a.strip().lower() for a in first.headers["set-cookie"].split(";")]
    assert {"httponly", "samesite=strict", "path=/", "max-age=43200"} <= set(attributes)
    assert "secure" not in attributes  # plain http: a Secure cookie would never come back
    logout = client.delete("/api/session", headers=with_cookie(values[0]))
    gone = [a.strip().lower() for a in logout.headers["set-cookie"].split(";")]
    assert {"httponly", "samesite=strict", "path=/", "max-age=0"} <= set(gone)


def test_the_cookie_is_secure_behind_an_https_proxy(server):
    """uvicorn trusts X-Forwarded-Proto from 127.0.0.1 (a local TLS proxy)."""
    live, _ = server
    with httpx.Client(base_url=live.url, timeout=30) as proxy:
        answer = proxy.post(
            "/api/session", json={"token": TOKEN}, headers={"X-Forwarded-Proto": "https"}
        )
    assert answer.status_code == 204
    assert "secure" in [a.strip().lower() for a in answer.headers["set-cookie"].split(";")]


def test_a_session_ends_at_logout(server):
    live, client = server
    session = login(live.url).cookies[SESSION_COOKIE]
    assert client.get("/api/info", headers=with_cookie(session)).status_code == 200
    assert client.delete("/api/session", headers=with_cookie(session)).status_code == 204
    replay = client.get("/api/info", headers=with_cookie(session))  # a copy kept by a thief
    assert replay.status_code == 401 and replay.json()["error"]["code"] == "unauthorized"
    normal_search_works(client)


def test_a_session_expires(server):
    live, client = server
    clock = Clock()
    live.app.state.auth.sessions.clock = clock  # the store the middleware reads
    session = login(live.url).cookies[SESSION_COOKIE]
    clock.now += 12 * 3600 - 1
    assert client.get("/api/info", headers=with_cookie(session)).status_code == 200
    clock.now += 2
    assert client.get("/api/info", headers=with_cookie(session)).status_code == 401


@pytest.mark.parametrize("new_token", [TOKEN, "another-token"])
def test_a_restart_ends_every_session(library, new_token):
    with served(library, FakeEncoder(), token=TOKEN) as (live, _):
        session = login(live.url).cookies[SESSION_COOKIE]
    with served(library, FakeEncoder(), token=new_token) as (live, client):
        assert client.get("/api/info", headers=with_cookie(session)).status_code == 401
        assert login(live.url, new_token).status_code == 204


@pytest.mark.parametrize(
    "value",
    [
        hmac.new(TOKEN.encode(), b"clipdex-session", hashlib.sha256).hexdigest(),  # old style
        TOKEN,
        "A" * 43,
        "",
        "x" * 4000,
    ],
)
def test_forged_cookies_are_401(server, value):
    _, client = server
    assert client.get("/api/info", headers=with_cookie(value)).status_code == 401


def test_guessing_the_token_is_throttled(server):
    """5 wrong guesses are answered 401; the 6th starts an hour's wait (Retry-After); from
    then on even the right token is 429 for that address, at the login and as a bearer;
    another address, and a page already signed in, are not held."""
    live, client = server
    signed_in = login(live.url).cookies[SESSION_COOKIE]
    attacker = {"base_url": live.url, "timeout": 30, "transport": guesser_transport()}
    with httpx.Client(**attacker) as guesser:
        for i in range(5):
            wrong = guesser.post("/api/session", json={"token": f"guess-{i}"})
            assert wrong.status_code == 401 and "retry-after" not in wrong.headers
        sixth = guesser.get("/api/info", headers={"Authorization": "Bearer guess-5"})
        assert sixth.status_code == 401 and sixth.headers["retry-after"] == "3600"
        for attempt in (
            guesser.post("/api/session", json={"token": TOKEN}),
            guesser.get("/api/info", headers=BEARER),
            guesser.post("/api/session", json={"token": "guess-7"}),
        ):
            assert attempt.status_code == 429, attempt.text
            assert attempt.json()["error"]["code"] == "too_many_attempts"
            assert 3500 < int(attempt.headers["retry-after"]) <= 3600
        assert guesser.get("/api/info", headers=with_cookie(signed_in)).status_code == 200
        assert guesser.get("/healthz").status_code == 200
    normal_search_works(client)  # 127.0.0.1 is another client
    # The hour passes (the throttle's clock moves): the right token opens again, and resets.
    clock = Clock()
    clock.now = time.monotonic() + 3601
    live.app.state.auth.throttle.clock = clock
    with httpx.Client(**attacker) as guesser:
        assert guesser.post("/api/session", json={"token": TOKEN}).status_code == 204
        assert guesser.post("/api/session", json={"token": "wrong"}).status_code == 401


def test_odd_tokens_are_401_not_500(server):
    _, client = server
    for token in ("ü" * 10, "x" * 4096, " "):
        assert client.post("/api/session", json={"token": token}).status_code == 401
    for token in (b"\\u0000", b"\\ud800"):  # control or unencodable text: maybe refused as input
        body = b'{"token": "' + token + b'"}'
        headers = {"Content-Type": "application/json"}
        assert client.post("/api/session", content=body, headers=headers).status_code in (401, 422)
    assert client.post("/api/session", json={"token": "x" * 5000}).status_code == 422


def test_the_service_stays_up_while_a_client_guesses(server):
    """4 threads guess from 127.0.0.2 as fast as they can; meanwhile and afterwards the
    legitimate client's /readyz and search answer (a generous deadline, not a speed test)."""
    live, client = server
    normal_search_works(client)
    stop = threading.Event()
    answers: list[int] = []

    def guess() -> None:
        with httpx.Client(base_url=live.url, timeout=30, transport=guesser_transport()) as guesser:
            while not stop.is_set():
                answers.append(guesser.post("/api/session", json={"token": "guess"}).status_code)
                bearer = {"Authorization": "Bearer guess"}
                answers.append(guesser.get("/api/search?q=x", headers=bearer).status_code)

    threads = [threading.Thread(target=guess, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while answers.count(429) < 40 and time.monotonic() < deadline:
            time.sleep(0.05)  # a poll: the guesser is locked out before the checks
        for _ in range(5):
            normal_search_works(client)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert answers.count(429) >= 40 and set(answers) == {401, 429}
    assert answers.count(401) == 6  # 5 free guesses and the one that started the wait
    normal_search_works(client)


def guesser_transport() -> httpx.HTTPTransport:
    return httpx.HTTPTransport(local_address=ATTACKER)
