"""A first classify that shows progress: label vectors computed in batches with a progress
callback, the CLI's note and bar, `clipdex index` preparing the default labels, and
/api/classify answering 503 `preparing` (one shared background job) instead of blocking.

The server tests pause the label job with an event (the encoder it uses waits for it in the
job's own thread), never with sleeps: the model thread stays free, so /readyz and searches
are answered meanwhile.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library
from retrieval import Collection
from retrieval.search import classify
from retrieval.search.classify import (
    BATCH_SECONDS,
    DEFAULT_TEMPLATES,
    FIRST_BATCH,
    LABEL_BATCH,
    MAX_BATCH,
    LabelSet,
    cached_label_vectors,
    label_vectors,
    make_labelset,
)
from retrieval.server.labels import LabelPreparer
from tests.clirun import run
from tests.live_server import served

DEFAULT_PROMPTS = len(make_labelset().labels) * len(DEFAULT_TEMPLATES)


def test_label_vectors_report_progress_once_per_batch(fake_encoder, tmp_path):
    labelset = LabelSet(tuple(f"thing {i}" for i in range(40)), ("a {}.", "the {}."))
    calls: list[tuple[int, int]] = []
    vectors = label_vectors(
        fake_encoder, labelset, tmp_path, lambda d, t: calls.append((d, t)), batch=LABEL_BATCH
    )
    batches = -(-80 // LABEL_BATCH)
    assert len(calls) == batches + 1  # 0 first, then one per batch
    assert calls[0] == (0, 80) and calls[-1] == (80, 80)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert all(b - a <= LABEL_BATCH for (a, _), (b, _) in itertools.pairwise(calls))
    assert vectors.shape == (40, 512) and fake_encoder.texts_encoded == 80

    calls.clear()  # cached: no model call, no progress
    again = label_vectors(fake_encoder, labelset, tmp_path, lambda d, t: calls.append((d, t)))
    assert calls == [] and fake_encoder.texts_encoded == 80 and (again == vectors).all()


def test_label_vectors_are_cached_once_per_model(tmp_path):
    from tests.conftest import FakeEncoder

    labelset = LabelSet(("cat", "dog", "car"), ("a {}.",))
    first, other = FakeEncoder("model-a"), FakeEncoder("model-b")
    for encoder in (first, other, first, other):
        label_vectors(encoder, labelset, tmp_path)
    assert (first.texts_encoded, other.texts_encoded) == (3, 3)  # once each, then cached
    assert len(list(tmp_path.glob("*.npy"))) == 2


def test_a_progress_hook_that_raises_stops_between_batches(fake_encoder, tmp_path):
    labelset = LabelSet(tuple(f"thing {i}" for i in range(64)), ("a {}.",))

    def stop_after_two(done: int, total: int) -> None:
        if done >= 2 * LABEL_BATCH:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        label_vectors(fake_encoder, labelset, tmp_path, stop_after_two, batch=LABEL_BATCH)
    assert fake_encoder.texts_encoded == 2 * LABEL_BATCH
    assert cached_label_vectors(fake_encoder.identity, labelset, tmp_path) is None


class ClockedEncoder:
    """Each prompt "takes" ``seconds`` on a fake clock; records its batch sizes."""

    def __init__(self, inner, seconds: float) -> None:
        self.inner, self.seconds, self.identity = inner, seconds, inner.identity
        self.now, self.sizes = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def encode_texts(self, texts: list[str]):
        self.sizes.append(len(texts))
        self.now += self.seconds * len(texts)
        return self.inner.encode_texts(texts)


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0.25, [FIRST_BATCH] + [int(BATCH_SECONDS / 0.25)] * 98),  # slow: short calls
        (0.0001, [FIRST_BATCH, MAX_BATCH, 200 - FIRST_BATCH - MAX_BATCH]),  # fast: large
    ],
)
def test_batches_are_sized_to_keep_progress_moving(fake_encoder, monkeypatch, seconds, expected):
    """Without ``batch``, each call after the first is sized from the last one's time per
    prompt (a fake clock here) to take about BATCH_SECONDS."""
    clocked = ClockedEncoder(fake_encoder, seconds)
    monkeypatch.setattr(classify, "time", clocked)
    labelset = LabelSet(tuple(f"thing {i}" for i in range(200)), ("a {}.",))
    calls: list[int] = []
    label_vectors(clocked, labelset, None, lambda d, t: calls.append(d))
    assert clocked.sizes == expected
    assert len(calls) == len(expected) + 1 and calls[-1] == 200


@pytest.fixture
def library(tmp_path, photo_folder, fake_encoder) -> Path:
    root = tmp_path / "library"
    with Library.open(root, create=True) as lib:
        index_paths(lib, fake_encoder, [photo_folder])
    return root


def test_collection_classify_and_tag_take_a_progress_callback(library, fake_encoder):
    labels = [f"thing {i}" for i in range(50)]
    seen: list[int] = []
    with Collection.open(library, encoder=fake_encoder) as photos:
        assert not photos.labels_prepared(labels)
        photos.classify(1, labels, progress=lambda d, t: seen.append(d))
        assert seen[0] == 0 and seen[-1] == 50 * len(DEFAULT_TEMPLATES) and len(seen) >= 2
        assert seen == sorted(set(seen))  # one call per batch, each a step forward
        assert photos.labels_prepared(labels)
        seen.clear()
        photos.tag(labels, progress=lambda d, t: seen.append(d))
        assert seen == []  # the same label set: cached
        photos.tag(labels[:20], progress=lambda d, t: seen.append(d))
        assert seen and seen[-1] == 20 * len(DEFAULT_TEMPLATES)


# -- CLI ------------------------------------------------------------------------------------
NOTE = f"preparing the default labels once for this model: {DEFAULT_PROMPTS} prompts"


def test_cli_classify_notes_and_draws_a_bar_the_first_time(fake_model, photo_folder):
    photo = str(photo_folder / "photo_1.jpg")
    run("index", str(photo_folder), "--no-prepare-labels", "--json")
    first = run("classify", photo)
    assert first.exit_code == 0, first.output
    assert NOTE in first.stderr
    assert f"{DEFAULT_PROMPTS}/{DEFAULT_PROMPTS}" in first.stderr  # the bar, finished
    assert fake_model.texts_encoded == DEFAULT_PROMPTS
    second = run("classify", photo)  # cached in the library: no note, no bar, no model
    assert second.exit_code == 0 and "preparing" not in second.stderr
    assert fake_model.texts_encoded == DEFAULT_PROMPTS


@pytest.mark.parametrize("flag", ["-q", "--json"])
def test_cli_classify_is_silent_with_quiet_or_json(fake_model, photo_folder, flag):
    run("index", str(photo_folder), "--no-prepare-labels", "--json")
    result = run("classify", str(photo_folder / "photo_1.jpg"), flag)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    if flag == "--json":
        assert len(json.loads(result.stdout)["predictions"]) == 5
    small = run("tag", "--labels", "red,green,blue", flag)
    assert small.exit_code == 0 and small.stderr == ""


def test_cli_tag_shows_the_bar_for_new_labels(fake_model, photo_folder):
    run("index", str(photo_folder), "--no-prepare-labels", "--json")
    result = run("tag", "--labels", "red,green,blue")
    assert result.exit_code == 0, result.output
    assert f"preparing 3 labels once for this model: {3 * len(DEFAULT_TEMPLATES)} prompts" in (
        result.stderr
    )


def test_cli_index_prepares_the_default_labels_after_its_report(
    fake_model, photo_folder, monkeypatch
):
    monkeypatch.setenv("CLIPDEX_PREPARE_LABELS", "1")
    result = run("index", str(photo_folder))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("indexed 6")  # the report first, then the labels
    assert NOTE in result.stderr and fake_model.texts_encoded == DEFAULT_PROMPTS
    again = run("index", str(photo_folder), str(photo_folder))  # cached: nothing more
    assert "preparing" not in again.stderr and fake_model.texts_encoded == DEFAULT_PROMPTS
    classify = run("classify", str(photo_folder / "photo_2.jpg"))
    assert "preparing" not in classify.stderr and fake_model.texts_encoded == DEFAULT_PROMPTS


def test_cli_index_can_skip_preparing_the_labels(fake_model, photo_folder, monkeypatch):
    monkeypatch.setenv("CLIPDEX_PREPARE_LABELS", "1")
    result = run("index", str(photo_folder), "--no-prepare-labels")
    assert result.exit_code == 0 and "preparing" not in result.stderr
    assert fake_model.texts_encoded == 0


# -- server ---------------------------------------------------------------------------------
class GatedEncoder:
    """The server's model for the label job, but each batch first waits for ``gate`` (in
    the job's thread, so the model thread stays free for queries); counts what it encodes."""

    def __init__(self, inner, gate: threading.Event) -> None:
        self.inner, self.gate, self.identity = inner, gate, inner.identity
        self.prompts = 0

    def encode_texts(self, texts: list[str]):
        assert self.gate.wait(60), "the test never opened the gate"
        self.prompts += len(texts)
        return self.inner.encode_texts(texts)


def gate_label_jobs(state, gate: threading.Event) -> GatedEncoder:
    """Replace the server's label preparer by one whose encoder waits for ``gate``."""
    gated = GatedEncoder(state.require_encoder().without_timeout(), gate)
    state.labels = LabelPreparer(
        lambda: gated, lambda: state.require_library().label_cache_dir, wait=0.1
    )
    return gated


def poll(fn, deadline_s: float = 30.0):
    """Call ``fn`` until it returns something truthy (or the deadline passes)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if value := fn():
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_api_classify_answers_preparing_then_the_labels(library, fake_encoder):
    with served(library, fake_encoder) as (server, client):
        state = server.app.state.clipdex
        gate = threading.Event()
        gated = gate_label_jobs(state, gate)

        def classify():
            return client.post("/api/classify", data={"id": 1})

        with ThreadPoolExecutor(4) as pool:  # concurrent first requests: one shared job
            answers = list(pool.map(lambda _: classify(), range(4)))
        for answer in answers:
            assert answer.status_code == 503, answer.text
            error = answer.json()["error"]
            assert error["code"] == "preparing" and "retry" in error["message"]
            assert error["progress"]["total"] == DEFAULT_PROMPTS
            assert 0 <= error["progress"]["done"] < DEFAULT_PROMPTS
            assert int(answer.headers["Retry-After"]) >= 1

        # Meanwhile the server is ready and searches answer.
        assert client.get("/readyz").status_code == 200
        found = client.get("/api/search", params={"q": "anything", "k": 3})
        assert found.status_code == 200 and len(found.json()["results"]) == 3
        assert client.post("/api/classify", data={"id": 1, "labels": "a,b"}).status_code == 200
        # A request's own labels, however many, are computed within it (its own cost).
        many = ",".join(f"thing {i}" for i in range(80))
        assert client.post("/api/classify", data={"id": 1, "labels": many}).status_code == 200

        gate.set()
        done = poll(lambda: (r := classify()).status_code == 200 and r)
        assert len(done.json()["predictions"]) == 5
        assert gated.prompts == DEFAULT_PROMPTS  # encoded once for all those requests
        assert classify().status_code == 200 and gated.prompts == DEFAULT_PROMPTS
        cache = state.require_library().label_cache_dir
        assert cached_label_vectors(fake_encoder.identity, make_labelset(), cache) is not None


def test_the_server_prepares_the_default_labels_after_an_index_job(
    tmp_path, photo_folder, fake_encoder
):
    root = tmp_path / "library"
    with served(root, fake_encoder, index_roots=(str(photo_folder),)) as (server, client):
        state = server.app.state.clipdex
        job = client.post("/api/index", json={"paths": [str(photo_folder)]}).json()
        poll(lambda: client.get(f"/api/index/{job['id']}").json()["state"] == "done")
        cache = state.require_library().label_cache_dir
        poll(
            lambda: cached_label_vectors(fake_encoder.identity, make_labelset(), cache) is not None
        )
        before = fake_encoder.texts_encoded
        answer = client.post("/api/classify", data={"id": 1})
        assert answer.status_code == 200 and fake_encoder.texts_encoded == before


def test_the_server_can_skip_preparing_labels_after_an_index_job(
    tmp_path, photo_folder, fake_encoder
):
    settings = {"index_roots": (str(photo_folder),), "prepare_labels": False}
    with served(tmp_path / "library", fake_encoder, **settings) as (server, client):
        state = server.app.state.clipdex
        job = client.post("/api/index", json={"paths": [str(photo_folder)]}).json()
        poll(lambda: client.get(f"/api/index/{job['id']}").json()["state"] == "done")
        cache = state.require_library().label_cache_dir  # the job would have started by now
        assert state.labels.running() == []
        assert cached_label_vectors(fake_encoder.identity, make_labelset(), cache) is None


def test_openapi_documents_the_preparing_answer(library, fake_encoder):
    with served(library, fake_encoder) as (_, client):
        spec = client.get("/openapi.json").json()
    answer = spec["paths"]["/api/classify"]["post"]["responses"]["503"]
    assert "preparing" in answer["description"]
