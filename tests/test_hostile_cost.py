"""Bounded work, fairly shared (issue 14): greedy and vanished clients stop costing.

Over a real uvicorn server (``clipdex serve``'s own configuration) with the fake encoder
behind a gate: the tests decide when each model call may finish, and count the calls, so
nothing here is decided by how fast the machine runs. Shown:

- a client that disconnects mid-batch stops its batch at the next chunk (calls counted);
- a request whose model call timed out runs none of its remaining chunks;
- a one-text search is answered while a 256-text batch is still held at the gate;
- per-request caps answer 413 ``too_costly`` naming their setting, before any model work;
- a burst of 88-megapixel PNG bombs is refused at the per-request pixel cap, /readyz and a
  search answer during and after, and the process's RSS comes back near where it started.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from PIL import Image

from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library
from retrieval.server.workload import HEAVY_AT_ONCE, INTERACTIVE_ITEMS, TEXT_CHUNK
from tests.live_server import served
from tests.test_server import assert_error

SERVER_START = 605 * 2**20  # RSS of `clipdex serve` at start, measured in issue 14
GENEROUS = 60.0  # seconds a well-behaved request may take on a loaded 2-core machine


@pytest.fixture
def library(tmp_path, photo_folder, fake_encoder):
    root = tmp_path / "library"
    with Library.open(root, create=True) as lib:
        index_paths(lib, fake_encoder, [photo_folder])
    return root


class GatedTexts:
    """The fake encoder whose big text calls (over INTERACTIVE_ITEMS texts) each wait for
    ``go`` once armed; small calls (a search) pass. Counts the big calls that ran."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.identity = inner.identity
        self.logit_scale = inner.logit_scale
        self.armed = False
        self.entered = threading.Semaphore(0)  # released as each gated call starts
        self.go = threading.Semaphore(0)  # one release lets one gated call finish
        self.big_calls = 0

    def encode_images(self, batch):
        return self.inner.encode_images(batch)

    def encode_texts(self, texts):
        if self.armed and len(texts) > INTERACTIVE_ITEMS:
            self.big_calls += 1
            self.entered.release()
            assert self.go.acquire(timeout=120), "the test never opened the gate"
        return self.inner.encode_texts(texts)


def embeddings_request(texts: list[str]) -> bytes:
    body = json.dumps({"model": "mobileclip-s2", "input": texts}).encode()
    head = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
    )
    return head + b"\r\n\r\n" + body


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def wait_for_log(caplog, text: str, timeout: float = GENEROUS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in record.getMessage() for record in caplog.records):
            return
        time.sleep(0.05)
    raise AssertionError(f"no log line with {text!r}")


def search_answers(client: httpx.Client, q: str = "a red ball") -> None:
    """A normal search gets its normal answer (and /readyz says ready)."""
    answer = client.get("/api/search", params={"q": q}, timeout=GENEROUS)
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"]
    assert client.get("/readyz", timeout=GENEROUS).status_code == 200


BATCH = [f"text number {i}" for i in range(256)]  # 8 chunks of TEXT_CHUNK


def test_a_disconnected_clients_batch_stops_at_the_next_chunk(library, fake_encoder, caplog):
    caplog.set_level(logging.DEBUG, logger="clipdex.server")
    gated = GatedTexts(fake_encoder)
    with served(library, gated) as (live, client):
        gated.armed = True
        sock = connect(live.url)
        sock.sendall(embeddings_request(BATCH))
        assert gated.entered.acquire(timeout=GENEROUS)  # chunk 1 is on the model
        sock.close()  # the client goes away
        wait_for_log(caplog, "the client of POST /v1/embeddings disconnected")
        gated.go.release()  # chunk 1 may finish; the next one would block at the gate
        # A search queued now would wait behind a chunk 2 held at the gate: it is
        # answered because no chunk 2 was ever queued.
        search_answers(client)
        assert gated.big_calls == 1  # of len(BATCH) / TEXT_CHUNK = 8 without the stop
    assert len(BATCH) // TEXT_CHUNK == 8


def test_a_timed_out_request_runs_none_of_its_remaining_chunks(library, fake_encoder):
    gated = GatedTexts(fake_encoder)
    with served(library, gated, request_timeout=1.0) as (_, client):
        gated.armed = True
        answer = client.post(
            "/v1/embeddings", json={"model": "mobileclip-s2", "input": BATCH}, timeout=GENEROUS
        )
        assert_error(answer, 503, "overloaded")  # chunk 1 took over the 1 s limit
        gated.go.release()
        search_answers(client)
        assert gated.big_calls == 1


def test_a_search_is_answered_while_a_big_batch_is_held(library, fake_encoder):
    """Fairness: a big call queues one chunk at a time and a one-text query takes the fast
    lane, so a search queued behind chunk 1 runs before chunk 2 and is answered while the
    batch's seven other chunks are still to come."""
    gated = GatedTexts(fake_encoder)
    with served(library, gated) as (live, client), ThreadPoolExecutor(2) as pool:
        lanes = live.app.state.clipdex.encoder._thread._lanes
        gated.armed = True
        body = {"model": "mobileclip-s2", "input": BATCH}
        batch = pool.submit(client.post, "/v1/embeddings", json=body, timeout=GENEROUS * 4)
        assert gated.entered.acquire(timeout=GENEROUS)  # chunk 1 is on the model
        search = pool.submit(search_answers, client, "a photo of a dog")
        poll(lambda: len(lanes[0]) == 1)  # the search waits for the model, behind chunk 1
        gated.go.release()  # chunk 1 finishes; the search runs next
        search.result(GENEROUS)
        assert gated.big_calls <= 2  # chunk 2 at most has started (held at the gate)
        for _ in range(7):
            gated.go.release()
        assert batch.result(GENEROUS * 4).status_code == 200
        assert gated.big_calls == 8


def test_a_search_gets_through_forty_held_batches(library, fake_encoder):
    """Forty big batches at once, as many as the threads that run sync routes: at most
    HEAVY_AT_ONCE of them take a thread (the rest wait in the event loop), so a search still
    gets a thread, then the model's fast lane, while the batches are held at the gate."""
    gated = GatedTexts(fake_encoder)
    with served(library, gated) as (live, client), ThreadPoolExecutor(41) as pool:
        lanes = live.app.state.clipdex.encoder._thread._lanes
        gated.armed = True
        body = {"model": "mobileclip-s2", "input": BATCH[:64]}  # two chunks each
        url = f"{live.url}/v1/embeddings"
        batches = [pool.submit(httpx.post, url, json=body, timeout=600) for _ in range(40)]
        assert gated.entered.acquire(timeout=GENEROUS)  # one chunk on the model
        poll(lambda: len(lanes[1]) == HEAVY_AT_ONCE - 1)  # the others admitted wait for it
        search = pool.submit(search_answers, client, "a photo of a dog")
        poll(lambda: len(lanes[0]) == 1)  # the search got a thread and waits for the model
        gated.go.release()
        search.result(GENEROUS)
        assert len(lanes[1]) <= HEAVY_AT_ONCE  # still at most one chunk per admitted batch
        for _ in range(2 * 40 - 1):
            gated.go.release()
        assert [b.result(600).status_code for b in batches] == [200] * 40


def poll(condition, timeout: float = GENEROUS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


# -- caps ------------------------------------------------------------------------------------
def test_classify_over_the_prompt_cap_is_413_before_any_model_work(library, fake_encoder):
    with served(library, fake_encoder, max_request_prompts=100) as (_, client):
        photo = client.get("/api/search", params={"q": "x"}).json()["results"][0]["id"]
        before = fake_encoder.texts_encoded
        form = {"id": str(photo), "labels": "cat,dog", "template": [f"{{}} {i}" for i in range(51)]}
        error = assert_error(client.post("/api/classify", data=form), 413, "too_costly")
        assert error["setting"] == "max_request_prompts"
        assert "102 prompts" in error["message"] and "--max-request-prompts" in error["message"]
        assert fake_encoder.texts_encoded == before
        form["template"] = form["template"][:50]  # 2 x 50 = 100: at the cap, served
        assert client.post("/api/classify", data=form, timeout=GENEROUS).status_code in (200, 503)


def test_the_default_labels_are_not_charged_to_the_request(library, fake_encoder):
    """The default label set is the server's own (prepared once): no prompt cap applies."""
    with served(library, fake_encoder, max_request_prompts=1) as (_, client):
        photo = client.get("/api/search", params={"q": "x"}).json()["results"][0]["id"]
        answer = client.post("/api/classify", data={"id": str(photo)}, timeout=GENEROUS)
        assert answer.status_code in (200, 503), answer.text  # 503: `preparing`
        if answer.status_code == 503:
            assert answer.json()["error"]["code"] == "preparing"


def test_embeddings_over_the_input_cap_is_413(library, fake_encoder):
    with served(library, fake_encoder, max_request_inputs=10) as (_, client):
        before = fake_encoder.texts_encoded
        body = {"model": "mobileclip-s2", "input": [f"t{i}" for i in range(11)]}
        error = assert_error(client.post("/v1/embeddings", json=body), 413, "too_costly")
        assert error["setting"] == "max_request_inputs"
        assert fake_encoder.texts_encoded == before
        body["input"] = body["input"][:10]
        assert client.post("/v1/embeddings", json=body).status_code == 200


def test_a_20000_letter_word_is_counted_at_once(library, fake_encoder):
    """/v1/embeddings counts the CLIP tokens of each text (usage): a 20,000-letter word
    goes through the heap BPE (tests/test_tokenizer_long.py counts its steps)."""
    with served(library, fake_encoder) as (_, client):
        body = {"model": "mobileclip-s2", "input": ["ab" * 10_000]}
        answer = client.post("/v1/embeddings", json=body, timeout=GENEROUS)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["prompt_tokens"] == 77


# -- decompression bombs ---------------------------------------------------------------------
def png_bomb() -> bytes:
    """An 88-megapixel 2-bit palette PNG of ~22 KB: ~264 MB once decoded to RGB."""
    image = Image.new("P", (9400, 9400))
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True, bits=2)
    return buffer.getvalue()


def bomb_request(bomb: bytes, count: int = 20) -> dict:
    url = "data:image/png;base64," + base64.b64encode(bomb).decode("ascii")
    return {"model": "mobileclip-s2", "input": [url] * count}


def test_one_image_over_what_is_left_of_the_pixel_budget_is_413(library, fake_encoder):
    bomb = png_bomb()
    with served(library, fake_encoder, max_request_megapixels=100) as (_, client):
        before = fake_encoder.images_encoded
        answer = client.post("/v1/embeddings", json=bomb_request(bomb, 2), timeout=GENEROUS)
        error = assert_error(answer, 413, "too_costly")
        assert error["setting"] == "max_request_megapixels"
        assert "--max-request-megapixels" in error["message"]
        assert fake_encoder.images_encoded == before  # the batch never reached the model
        ok = client.post("/v1/embeddings", json=bomb_request(bomb, 1), timeout=GENEROUS)
        assert ok.status_code == 200, ok.text


@pytest.mark.slow
def test_a_burst_of_png_bombs_is_refused_and_memory_comes_back(library, fake_encoder):
    """The issue's attack: 20 bombs of 88 MP per request, several requests at once. Each is
    refused at the default 400 MP per request (after 4 decodes), /readyz and a search answer
    meanwhile, and RSS returns near its starting level: without handing freed memory back
    it stays near its peak (measured here: 283 MB -> 1,496 MB; with it: 184 -> 233 MB)."""
    bomb = png_bomb()
    assert len(bomb) < 40_000
    process = psutil.Process()
    with served(library, fake_encoder) as (_, client):
        search_answers(client)
        with ThreadPoolExecutor(4) as pool:
            # The same traffic, each request within both limits (one bomb): the threads,
            # pools and buffers that any three concurrent uploads leave are in the baseline.
            warm = [
                pool.submit(client.post, "/v1/embeddings", json=bomb_request(bomb, 1))
                for _ in range(3)
            ]
            assert [answer.result().status_code for answer in warm] == [200] * 3
        gc.collect()
        before = process.memory_info().rss
        with ThreadPoolExecutor(4) as pool:
            burst = [
                pool.submit(client.post, "/v1/embeddings", json=bomb_request(bomb), timeout=300)
                for _ in range(3)
            ]
            search_answers(client)  # during the burst
            answers = [future.result() for future in burst]
        for answer in answers:
            error = assert_error(answer, 413, "too_costly")
            assert error["setting"] == "max_request_megapixels"
        search_answers(client)  # after
        gc.collect()
        after = process.memory_info().rss
    print(f"RSS before the burst {before >> 20} MB, after {after >> 20} MB")  # -s shows it
    # "Within 1.3x of before" for a real server, which starts near SERVER_START (the model
    # loaded); this process has no model (~180 MB), and the first burst's one-time ~40 MB
    # (thread arenas, then stable over further bursts) would sit too near 1.3x of that.
    allowed = 0.3 * max(before, SERVER_START)  # ~180 MB; without the trim it grew ~1,300 MB
    assert after - before <= allowed, (before >> 20, after >> 20)
