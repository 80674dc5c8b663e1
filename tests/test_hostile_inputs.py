"""Request inputs that cannot be used are a 4xx naming the field, never a 500 or a wrong answer.

Issue 14, item 5: a lone surrogate in ``POST /api/index`` was a 500 from inside
``os.path.realpath``; query weights beyond float32 zeroed (``1e20``) or erased (``1e39``)
every score. The rules live in retrieval/search/text.py (text and paths) and
retrieval/search/query.py (weights); the server's schemas and query-string middleware apply
them at the edge. File names' undecodable bytes keep their lossless ``\\udcNN`` round trip
(tests/test_server_paths.py) while a surrogate that maps to no byte is refused.
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import indexer.model.encoders
from indexer.store.library import Library
from retrieval.cli import app as cli_app
from retrieval.search.errors import QueryError
from retrieval.search.options import SearchOptions
from retrieval.search.query import MAX_WEIGHT, MIN_WEIGHT, combine, parse_query
from retrieval.search.text import check_path, path_problem, text_problem
from tests.live_server import raw_request, served

JSON = {"Content-Type": "application/json"}
OVERFLOWING_WEIGHTS = ["1e20", "100000000000000000000", "1" + "0" * 39, "1e39", "9" * 400]


# -- the rules ----------------------------------------------------------------------------
@given(st.text(st.characters(exclude_categories=("Cs", "Cc"), exclude_characters="\ufffd")))
@settings(max_examples=200, deadline=None)
def test_ordinary_text_is_usable(text):
    assert text_problem(text) is None


@pytest.mark.parametrize(
    "text, what",
    [
        ("\ud800", "U+D800"),
        ("caf\udce9", "U+DCE9"),
        ("a\x00b", "U+0000"),
        ("\x1b[2J", "U+001B"),
        ("\xc3\xa9 mojibake \x85", "U+0085"),
        ("\ufffd", "replacement character"),
    ],
)
def test_unusable_text_is_named(text, what):
    problem = text_problem(text)
    assert problem and what in problem
    with pytest.raises(QueryError, match=r"^the field: "):
        check_text_or_raise(text)


def check_text_or_raise(text):
    from retrieval.search.text import check_text

    return check_text(text, "the field")


@given(st.binary(min_size=1, max_size=40).filter(lambda b: b"\x00" not in b))
@settings(max_examples=200, deadline=None)
def test_every_file_name_the_system_can_hold_is_a_usable_path(name):
    """Undecodable bytes come as \\udcNN (os.fsdecode); each is accepted, byte for byte."""
    path = os.fsdecode(name)
    assert path_problem(path) is None
    assert os.fsencode(check_path(path, "paths")) == name


@pytest.mark.parametrize("path", ["\ud800", "photos/\udbff\udfff", "a\udc7f", "a\x00b"])
def test_a_surrogate_that_is_no_byte_or_a_nul_is_no_path(path):
    with pytest.raises(QueryError, match=r"^paths: .*(lone surrogate|NUL)"):
        check_path(path, "paths")


# -- query weights --------------------------------------------------------------------------
@pytest.mark.parametrize("weight", [*OVERFLOWING_WEIGHTS, "0.001", "1e-5", "100.5"])
def test_weights_out_of_range_are_a_query_error(weight):
    with pytest.raises(QueryError, match=r"weight must be between 0\.01 and 100"):
        parse_query(f"{weight}:dog + cat")


def test_weights_at_the_bounds_and_in_exponent_form_parse():
    terms = parse_query(f"{MAX_WEIGHT:g}:dog + {MIN_WEIGHT:g}:cat - 1e1:car")
    assert [t.weight for t in terms] == [MAX_WEIGHT, MIN_WEIGHT, -10.0]


def test_combine_keeps_the_ratio_for_any_finite_weights():
    """Python callers may pass any weights: only the ratio counts, nothing overflows."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((2, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    small = combine(vectors, [2.0, 1.0])
    huge = combine(vectors, [2e30, 1e30])
    assert np.isfinite(huge).all()
    assert float(small @ huge) > 0.999  # same direction (exactly equal up to rounding)
    for bad in ([float("nan"), 1.0], [float("inf"), 1.0], [1.0, -float("inf")]):
        with pytest.raises(QueryError, match="finite"):
            combine(vectors, bad)


def test_filter_values_are_checked_once_for_every_front_door():
    for options in (
        {"camera": "Canon\x00"},
        {"tags": ("dog", "\ud800")},
        {"formats": ("jp\x1beg",)},
        {"after": "2020\udcff"},
        {"folders": ("/photos/\ud800",)},
    ):
        with pytest.raises(QueryError, match="U\\+"):
            SearchOptions(**options)
    SearchOptions(folders=("/photos/caf\udce9",))  # a non-UTF-8 folder name is a folder


# -- the CLI: exit 1 with the message, no traceback -------------------------------------------
@pytest.fixture
def cli_library(monkeypatch, fake_encoder, photo_folder):
    monkeypatch.setattr(indexer.model.encoders, "load_encoder", lambda *a, **k: fake_encoder)
    runner = CliRunner()
    assert runner.invoke(cli_app, ["index", str(photo_folder), "--json"]).exit_code == 0
    return runner


@pytest.mark.parametrize(
    "args, expected",
    [
        (["search", "100000000000000000000:dog"], "weight must be between"),
        (["search", "1e39:dog + cat"], "weight must be between"),
        (["search", "caf\udce9"], "lone surrogate"),
        (["search", "dog", "--camera", "x\x1b"], "control character"),
        (["classify", "1", "--labels", "cat,d\x00og"], "NUL"),
    ],
)
def test_cli_refuses_unusable_input_with_exit_1(cli_library, args, expected):
    result = cli_library.invoke(cli_app, args)
    assert result.exit_code == 1, result.output
    assert expected in result.output and "Traceback" not in result.output


# -- REST: every hostile input a 4xx in the JSON error shape ----------------------------------
def _hostile_requests(photo_id: int) -> list[tuple[str, str, dict, set[int], str]]:
    """(method, url, httpx kwargs, allowed statuses, a word the message must hold)."""
    big = "1" + "0" * 39
    return [
        (
            "POST",
            "/api/index",
            {"content": b'{"paths": ["\\ud800"]}', "headers": JSON},
            {400},
            "paths: a lone surrogate",
        ),
        (
            "POST",
            "/api/index",
            {"content": b'{"paths": ["photos/\\udfff\\udbff"]}', "headers": JSON},
            {400},
            "U+DFFF",
        ),
        (
            "POST",
            "/api/index",
            {"content": b'{"paths": ["photos\\u0000"]}', "headers": JSON},
            {400},
            "NUL",
        ),
        (
            "POST",
            "/api/session",
            {"content": b'{"token": "\\udc80"}', "headers": JSON},
            {422},
            "token",
        ),
        (
            "POST",
            "/v1/embeddings",
            {"content": b'{"model": "mobileclip-s2", "input": ["ok", "\\ud800"]}', "headers": JSON},
            {400},
            "input[1]",
        ),
        (
            "POST",
            "/v1/embeddings",
            {
                "content": b'{"model": "mobileclip-s2", "input": "x", "user": "\\udfff"}',
                "headers": JSON,
            },
            {422},
            "user",
        ),
        (
            "POST",
            "/v1/embeddings",
            {
                "content": b'{"model": "mobileclip-s2", "input": "x", "dimensions": NaN}',
                "headers": JSON,
            },
            {422},
            "dimensions",
        ),
        (
            "POST",
            "/v1/embeddings",
            {
                "content": b'{"model": "mobileclip-s2", "input": "x", "dimensions": 1e999}',
                "headers": JSON,
            },
            {422},
            "dimensions",
        ),
        ("GET", f"/api/search?q={big}:dog", {}, {400}, "weight"),
        ("GET", "/api/search?q=1e20:dog%20%2B%20cat", {}, {400}, "weight"),
        ("GET", "/api/search?q=%ED%A0%80", {}, {400}, "'q'"),
        ("GET", "/api/search?q=dog&in=%FF", {}, {400}, "'in'"),
        ("GET", "/api/search?q=dog&camera=a%00", {}, {400}, "camera"),
        ("GET", "/api/search?q=dog&tag=%1B", {}, {400}, "tags"),
        ("GET", "/api/search?q=dog&min_score=NaN", {}, {422}, "min_score"),
        ("GET", "/api/duplicates?threshold=Infinity", {}, {422}, "threshold"),
        ("GET", f"/api/images/{photo_id}/similar?k=99999999999999999999999", {}, {422}, "k"),
        (
            "POST",
            "/api/classify",
            {"data": {"id": str(photo_id), "labels": "cat,d\x00og"}},
            {400},
            "label",
        ),
        (
            "POST",
            "/api/classify",
            {"data": {"id": str(photo_id), "labels": "cat,dog", "template": "a \x1b{}"}},
            {400},
            "template",
        ),
        (
            "POST",
            "/api/classify",  # a url-encoded form decodes %FF to U+FFFD: refused
            {
                "content": f"id={photo_id}&labels=cat,%FF".encode(),
                "headers": {"Content-Type": "application/x-www-form-urlencoded"},
            },
            {400},
            "label",
        ),
    ]


def _assert_json_error(response, statuses, word):
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] and word in error["message"], error


@pytest.fixture
def hostile_server(tmp_path, photo_folder, fake_encoder):
    library = tmp_path / "library"
    with Library.open(library, create=True) as lib:
        from indexer.ingest.pipeline import index_paths

        index_paths(lib, fake_encoder, [photo_folder])
    with served(library, fake_encoder, index_roots=(tmp_path,)) as (live, client):
        yield live, client


def _healthy(client) -> None:
    """/readyz answers ready and a normal search answers with results."""
    assert client.get("/readyz").status_code == 200
    found = client.get("/api/search", params={"q": "a red ball", "k": 3})
    assert found.status_code == 200 and len(found.json()["results"]) == 3


def test_hostile_requests_are_4xx_and_the_server_keeps_answering(hostile_server):
    live, client = hostile_server
    photo_id = client.get("/api/search", params={"q": "x", "k": 1}).json()["results"][0]["id"]
    requests = _hostile_requests(photo_id)
    for method, url, kwargs, statuses, word in requests:
        _assert_json_error(client.request(method, url, **kwargs), statuses, word)

    # The same requests, over and over from two threads, while /readyz and a normal search
    # keep answering correctly (within a generous deadline: correctness, not speed).
    failures: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        import httpx

        with httpx.Client(base_url=live.url, timeout=30) as own:
            while not stop.is_set():
                for method, url, kwargs, statuses, _ in requests:
                    try:
                        status = own.request(method, url, **kwargs).status_code
                    except httpx.HTTPError as exc:
                        status = repr(exc)
                    if status not in statuses:
                        failures.append(f"{method} {url}: {status}")

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 30
        for _ in range(5):
            _healthy(client)
            assert time.monotonic() < deadline
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not failures, failures[:5]
    _healthy(client)


def test_raw_bytes_that_are_not_utf8_in_a_json_body_are_a_4xx(hostile_server):
    live, client = hostile_server
    for body in (b'{"paths": ["\xed\xa0\x80"]}', b'{"paths": ["caf\xe9"]}'):
        request = (
            b"POST /api/index HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        status, answer = raw_request(live.url, request)
        assert 400 <= status < 500, answer[-300:]
        assert b'"error"' in answer
    _healthy(client)


def test_a_path_that_came_back_as_udcNN_escapes_still_indexes(hostile_server, tmp_path):
    """The lossless round trip stays: \\udcNN (a byte) is a path, \\ud800 (no byte) is not."""
    _, client = hostile_server
    folder = os.fsencode(tmp_path) + b"/caf\xe9"
    os.makedirs(folder)
    started = client.post("/api/index", content=b'{"paths": ["caf\\udce9"]}', headers=JSON)
    assert started.status_code == 202, started.text
    assert json.loads(started.content)["paths"] == [os.fsdecode(folder)]


HOSTILE_HEADERS = [
    b"Range: bytes=0-99999999999999999999999999",
    b"Range: bytes=99999999999999999999-",
    b"Range: bytes=-0",
    b"Range: bytes=\xff-\xfe",
    b"Range: bytes=5-1",
    b"Range: pages=1-2",
    b"Range: bytes=0-1,2-3,4-5",
    b"If-None-Match: \xff\xfe",
    b"If-None-Match: " + b"x," * 4000,
    b"If-Range: \xff",
    b"If-Modified-Since: \xff",
    b"Authorization: Bearer \xff\xfe",
    b"Authorization: \xff",
    b'Cookie: clipdex_session=\xff\xfe; x="',
    b"Cookie: " + b"a=b;" * 2000,
    b"Accept-Encoding: \xff",
]


@pytest.mark.parametrize("header", HOSTILE_HEADERS, ids=range(len(HOSTILE_HEADERS)))
def test_hostile_headers_are_never_a_5xx_and_errors_are_json(hostile_server, header):
    """Header bytes that are not ASCII arrive as Latin-1 text; nothing fails on them, and a
    refused Range is the JSON error shape too (416 keeps its Content-Range)."""
    live, client = hostile_server
    photo_id = client.get("/api/search", params={"q": "x", "k": 1}).json()["results"][0]["id"]
    for target in (
        f"/api/images/{photo_id}/file",
        f"/api/images/{photo_id}/thumbnail",
        "/api/search?q=dog",
    ):
        request = (
            b"GET " + target.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Connection: close\r\n" + header + b"\r\n\r\n"
        )
        status, answer = raw_request(live.url, request)
        assert 200 <= status < 500, (target, header[:40], answer[:300])
        head, _, body = answer.partition(b"\r\n\r\n")
        if status >= 400 and body != b"Invalid HTTP request received.":  # uvicorn's own
            assert b"content-type: application/json" in head.lower(), (target, answer[:300])
            assert json.loads(body)["error"]["code"], answer[:300]
        if status == 416:
            assert b"content-range: bytes */" in head.lower()
    _healthy(client)
