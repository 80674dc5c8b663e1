"""REST: search refinements (filters, cut-off, date order, paging, query arithmetic), tags in
results, POST /api/classify, GET /api/tags and GET /api/duplicates, over a live server."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library
from retrieval.search.classify import LabelSet, tag_library
from tests.live_server import served

LABELS = ("red", "green", "blue")


@pytest.fixture
def library(tmp_path, photo_folder, fake_encoder) -> Path:
    """The six generated photos, an exact copy of one, tagged with three labels."""
    shutil.copy(photo_folder / "photo_2.jpg", photo_folder / "photo_2_copy.jpg")
    root = tmp_path / "library"
    with Library.open(root, create=True) as lib:
        index_paths(lib, fake_encoder, [photo_folder])
        tag_library(lib, fake_encoder, LabelSet(LABELS), top=1, min_probability=0.0)
    return root


@pytest.fixture
def client(library, fake_encoder):
    with served(library, fake_encoder) as (_, http):
        yield http


def search(client, **params) -> dict:
    response = client.get("/api/search", params={"q": "anything", **params})
    assert response.status_code == 200, response.text
    return response.json()


def names(answer: dict) -> list[str]:
    return sorted(Path(r["path"]).name for r in answer["results"])


def assert_error(response, status: int, code: str, text: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and text in error["message"], error


def test_filters_on_search(client, photo_folder):
    assert names(search(client, min_size="350x240")) == [
        "photo_3.jpg",
        "photo_4.jpg",
        "photo_5.jpg",
    ]
    assert len(search(client, **{"in": str(photo_folder)})["results"]) == 7
    assert search(client, **{"in": "/nowhere"})["results"] == []
    assert len(search(client, format=["jpg", "png"])["results"]) == 7
    assert len(search(client, after="2000-01-01", before="2999")["results"]) == 7
    assert_error(
        client.get("/api/search", params={"q": "x", "in": "relative/dir"}), 400, "bad_query"
    )
    assert_error(client.get("/api/search", params={"q": "x", "after": "soon"}), 400, "bad_query")
    assert_error(
        client.get("/api/search", params={"q": "x", "sort": "name"}), 422, "invalid_request"
    )


def test_plain_search_keeps_its_shape(client):
    answer = search(client, k=3)
    assert (answer["sort"], answer["total"], answer["cutoff"]) == ("score", None, None)
    assert len(answer["results"]) == 3


def test_cutoff_sort_and_paging(client):
    answer = search(client, cutoff="auto", k=100)
    assert answer["cutoff"]["rule"] == "auto" and answer["total"] == len(answer["results"])
    every = search(client, min_score=-1, sort="date", k=100)
    assert every["total"] == 7 and every["sort"] == "date"
    paged = [
        r["id"]
        for off in (0, 3, 6)
        for r in search(client, min_score=-1, sort="date", k=3, offset=off)["results"]
    ]
    assert paged == [r["id"] for r in every["results"]]


def test_query_arithmetic_and_its_errors(client):
    assert search(client, q="red + 2:green - blue")["results"]
    assert_error(
        client.get("/api/search", params={"q": "red + + blue"}), 400, "bad_query", "character 7"
    )


def test_tags_in_results_filter_and_list(client):
    answer = search(client, k=100)
    assert all(len(r["tags"]) == 1 and r["tags"][0]["label"] in LABELS for r in answer["results"])
    listed = client.get("/api/tags").json()["tags"]
    assert sum(t["images"] for t in listed) == 7 and {t["label"] for t in listed} <= set(LABELS)
    label = listed[0]["label"]
    tagged = search(client, tag=label, k=100)["results"]
    assert len(tagged) == listed[0]["images"] and all(
        r["tags"][0]["label"] == label for r in tagged
    )


def test_similar_and_image_search_take_refinements(client, photo_folder):
    target = next(r for r in search(client, k=100)["results"] if r["path"].endswith("photo_2.jpg"))
    similar = client.get(f"/api/images/{target['id']}/similar", params={"cutoff": "auto"}).json()
    assert {Path(r["path"]).name for r in similar["results"]} >= {"photo_2.jpg", "photo_2_copy.jpg"}
    data = (photo_folder / "photo_4.jpg").read_bytes()
    uploaded = client.post(
        "/api/search/image", params={"min_size": "360x240"}, files={"file": ("q.jpg", data)}
    ).json()
    assert names(uploaded) == ["photo_4.jpg", "photo_5.jpg"]


def test_classify_by_id_and_upload(client, photo_folder):
    target = search(client, k=1)["results"][0]
    by_id = client.post("/api/classify", data={"id": target["id"], "labels": "cat, dog ,car"})
    assert by_id.status_code == 200, by_id.text
    answer = by_id.json()
    assert answer["id"] == target["id"] and answer["labels"] == 3
    assert sum(p["probability"] for p in answer["predictions"]) == pytest.approx(1.0, abs=1e-5)
    upload = client.post(
        "/api/classify",
        data={"labels": "cat,dog", "top": 1, "template": ["a photo of a {}.", "art of {}"]},
        files={"file": ("x.jpg", (photo_folder / "photo_1.jpg").read_bytes())},
    ).json()
    assert upload["id"] is None and len(upload["predictions"]) == 1
    assert upload["templates"] == ["a photo of a {}.", "art of {}"]
    default = classify_when_prepared(client, {"id": target["id"]})
    assert default["labels"] >= 300  # data/labels.txt


def classify_when_prepared(client, data: dict, deadline_s: float = 30.0) -> dict:
    """POST /api/classify, asking again while the label set is being prepared (503)."""
    deadline = time.monotonic() + deadline_s
    while True:
        answer = client.post("/api/classify", data=data)
        preparing = answer.status_code == 503 and answer.json()["error"]["code"] == "preparing"
        if not preparing or time.monotonic() > deadline:
            assert answer.status_code == 200, answer.text
            return answer.json()
        time.sleep(0.05)


def test_classify_errors(client, photo_folder):
    assert_error(
        client.post("/api/classify", data={"labels": "a,b"}), 400, "bad_query", "exactly one"
    )
    both = client.post(
        "/api/classify", data={"id": 1, "labels": "a,b"}, files={"file": ("x.jpg", b"123")}
    )
    assert_error(both, 400, "bad_query")
    assert_error(client.post("/api/classify", data={"id": 999, "labels": "a,b"}), 404, "not_found")
    assert_error(
        client.post("/api/classify", data={"labels": "a,b"}, files={"file": ("x.jpg", b"nope")}),
        415,
        "not_an_image",
    )
    one_label = client.post("/api/classify", data={"id": 1, "labels": "only"})
    assert_error(one_label, 400, "bad_query", "at least two labels")
    bad_template = client.post("/api/classify", data={"id": 1, "labels": "a,b", "template": "x"})
    assert_error(bad_template, 400, "bad_query", "exactly one {}")


def test_duplicates(client, photo_folder):
    answer = client.get("/api/duplicates", params={"threshold": 0.99}).json()
    assert answer["threshold"] == 0.99
    (group,) = answer["groups"]
    assert {Path(m["path"]).name for m in group["members"]} == {"photo_2.jpg", "photo_2_copy.jpg"}
    assert group["keeper"] == group["members"][0]["id"]
    assert group["members"][0]["thumbnail_url"].endswith("thumbnail?size=256")
    inside = client.get("/api/duplicates", params={"in": "*/elsewhere"}).json()
    assert inside["groups"] == []
    assert_error(client.get("/api/duplicates", params={"threshold": 2}), 422, "invalid_request")


def test_openapi_documents_the_new_routes(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/classify", "/api/tags", "/api/duplicates"} <= set(paths)
    search_params = {p["name"] for p in paths["/api/search"]["get"]["parameters"]}
    assert {
        "after",
        "before",
        "in",
        "camera",
        "min_size",
        "format",
        "tag",
        "cutoff",
        "min_score",
        "sort",
        "offset",
    } <= search_params


# -- the web page ---------------------------------------------------------------------------
@pytest.fixture
def page(library, fake_encoder):
    from tests.test_web import ARGS, CHROMIUM

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no browser: {CHROMIUM} is absent")
    with sync_api.sync_playwright() as playwright, served(library, fake_encoder) as (server, _):
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        problems: list[str] = []
        tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        tab.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        tab.goto(server.url)
        tab.wait_for_selector("#status[data-state='ready']")
        yield tab
        browser.close()
        assert problems == []


def card_names(page) -> list[str]:
    return sorted(
        page.eval_on_selector_all("#results .card .name", "n => n.map(e => e.textContent)")
    )


@pytest.mark.browser
def test_page_filters_tags_duplicates_and_classify(page):
    page.click("#refine summary")
    page.fill("#f-min-size", "350x240")
    page.select_option("#f-tag", index=1)  # the tags the library holds are offered
    page.select_option("#f-tag", "")
    page.fill("#q", "anything")
    page.press("#q", "Enter")
    page.wait_for_function("() => document.querySelectorAll('#results .card').length === 3")
    assert card_names(page) == ["photo_3.jpg", "photo_4.jpg", "photo_5.jpg"]
    assert "min_size=350x240" in page.inner_text("#summary")
    assert all(
        t in LABELS
        for t in page.eval_on_selector_all(".card .tags", "n => n.map(e => e.textContent)")
    )

    page.check("#f-cutoff")
    page.select_option("#f-sort", "date")
    page.click("#f-apply")
    page.wait_for_function(
        "() => document.querySelector('#summary').textContent.includes('clear matches')"
    )
    assert "sort=date" in page.evaluate("location.hash")

    page.click("#f-clear")
    page.click("#find-duplicates")
    page.wait_for_function("() => document.querySelectorAll('#results .card').length === 2")
    assert card_names(page) == ["photo_2.jpg", "photo_2_copy.jpg"]
    assert page.locator("#results .card.keeper .badge").inner_text() == "keep"
    assert "near-duplicates" in page.inner_text("#summary")

    page.locator("#results .thumb").first.click()
    page.wait_for_selector("#viewer[open]")
    page.wait_for_function(
        "() => document.querySelector('#viewer-meta').textContent.includes('Tags')"
    )
    page.click("#viewer-classify")
    page.wait_for_selector("#viewer-meta dd.classified")
    assert "%" in page.inner_text("#viewer-meta dd.classified")
