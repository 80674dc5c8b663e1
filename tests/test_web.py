"""The web page in a real browser: headless Debian chromium driven by Playwright.

Against a live server over a small library: type a query and see the thumbnails load,
hover for the score, open a photo, "more like this", upload and drop an image, page
through results, drive it all from the keyboard, and sign in when a token is set.
Skipped, with the reason, only where no chromium can be started.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library
from tests.live_server import served

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
ALL_THUMBS_LOADED = """() => {
  const imgs = [...document.querySelectorAll('#results .thumb img')];
  return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no browser: {CHROMIUM} is absent (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        except sync_api.Error as exc:
            pytest.skip(f"{CHROMIUM} cannot be started here: {str(exc).splitlines()[0]}")
        yield launched
        launched.close()


@pytest.fixture
def photos(tmp_path) -> Path:
    """25 distinct small photos: enough for two pages of 20."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(25):
        image = Image.new("RGB", (160, 120), ((i * 37) % 255, (i * 91) % 255, (i * 53) % 255))
        ImageDraw.Draw(image).rectangle((i * 4, 10, i * 4 + 40, 90), fill=(255 - i * 9, 20, 90))
        image.save(folder / f"photo_{i:02d}.jpg", quality=90)
    return folder


@pytest.fixture
def library(tmp_path, photos, fake_encoder) -> Path:
    root = tmp_path / "library"
    with Library.open(root, create=True) as lib:
        index_paths(lib, fake_encoder, [photos])
    return root


@pytest.fixture
def page(browser, library, fake_encoder):
    with served(library, fake_encoder) as (server, _):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        tab = context.new_page()
        problems: list[str] = []
        tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        tab.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        tab.goto(server.url)
        tab.wait_for_selector("#status[data-state='ready']")
        yield tab
        context.close()
        assert problems == []


def search(page, text: str) -> None:
    page.fill("#q", text)
    page.press("#q", "Enter")
    page.wait_for_selector("#results .card")
    page.wait_for_function(ALL_THUMBS_LOADED)


def card_ids(page) -> list[int]:
    ids = page.eval_on_selector_all("#results .card", "cards => cards.map(c => c.dataset.id)")
    return [int(x) for x in ids]


def wait_text(page, selector: str, text: str) -> None:
    """Wait until the element's text contains ``text``."""
    page.wait_for_function(
        "([sel, text]) => document.querySelector(sel).textContent.includes(text)",
        arg=[selector, text],
    )


def test_status_line_says_how_many_photos(page):
    assert "25 photos" in page.inner_text("#status")
    assert "ready" in page.inner_text("#status")


def test_type_a_query_and_see_thumbnails(page):
    search(page, "a red square")
    assert len(card_ids(page)) == 25
    assert "“a red square”" in page.inner_text("#summary")
    first = page.locator("#results .card").first
    assert first.locator(".score").evaluate("e => getComputedStyle(e).opacity") == "0"
    first.hover()
    page.wait_for_function(
        "() => getComputedStyle(document.querySelector('#results .card .score')).opacity === '1'"
    )
    score = float(first.locator(".score").inner_text())
    assert -1.0 <= score <= 1.0
    assert "score" in first.locator(".thumb").get_attribute("title")


def test_open_a_photo_then_more_like_this(page):
    search(page, "anything")
    wanted = card_ids(page)[3]
    page.locator("#results .thumb").nth(3).click()
    page.wait_for_selector("#viewer[open]")
    page.wait_for_selector("#viewer-meta dt")
    meta = page.inner_text("#viewer-meta")
    assert "160 \u00d7 120" in meta and "JPEG" in meta
    page.wait_for_function("() => document.querySelector('#viewer-img').naturalWidth > 0")
    page.keyboard.press("Escape")
    page.wait_for_selector("#viewer", state="hidden")
    page.locator("#results .card").nth(3).locator(".similar").click()
    wait_text(page, "#summary", f"#{wanted}")
    page.wait_for_function(ALL_THUMBS_LOADED)
    assert card_ids(page)[0] == wanted


def test_pick_an_image_to_search_by_image(page, photos):
    page.set_input_files("#image-input", str(photos / "photo_07.jpg"))
    wait_text(page, "#summary", "photo_07.jpg")
    page.wait_for_function(ALL_THUMBS_LOADED)
    first = page.locator("#results .card .name").first.inner_text()
    assert first == "photo_07.jpg"


def test_drop_an_image_to_search_by_image(page, photos):
    payload = base64.b64encode((photos / "photo_11.jpg").read_bytes()).decode()
    transfer = page.evaluate_handle(
        """(b64) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], 'dropped.jpg', {type: 'image/jpeg'}));
            return dt;
        }""",
        payload,
    )
    page.dispatch_event("body", "dragenter", {"dataTransfer": transfer})
    assert page.is_visible("#drop-overlay")
    page.dispatch_event("body", "drop", {"dataTransfer": transfer})
    wait_text(page, "#summary", "dropped.jpg")
    page.wait_for_function(ALL_THUMBS_LOADED)
    assert page.locator("#results .card .name").first.inner_text() == "photo_11.jpg"
    assert page.is_hidden("#drop-overlay")


def test_k_and_paging(page):
    page.select_option("#k", "20")
    search(page, "paging")
    first_page = card_ids(page)
    assert len(first_page) == 20 and page.is_disabled("#prev") and page.is_enabled("#next")
    page.click("#next")
    page.wait_for_function("() => document.querySelector('#page-label').textContent === 'Page 2'")
    page.wait_for_function(ALL_THUMBS_LOADED)
    second_page = card_ids(page)
    assert len(second_page) == 5 and not set(first_page) & set(second_page)
    assert page.is_disabled("#next")
    page.go_back()  # the URL remembers the page
    page.wait_for_function("() => document.querySelector('#page-label').textContent === 'Page 1'")
    page.wait_for_function(ALL_THUMBS_LOADED)
    assert card_ids(page) == first_page


def test_keyboard_only(page):
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    page.keyboard.type("keyboard")
    page.keyboard.press("Enter")
    page.wait_for_function(ALL_THUMBS_LOADED)
    ids = card_ids(page)
    page.locator("#results .thumb").first.focus()
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement.dataset.index") == "1"
    page.keyboard.press("ArrowDown")
    columns = page.evaluate("document.activeElement.dataset.index")
    assert int(columns) > 1
    page.keyboard.press("Enter")
    page.wait_for_selector("#viewer[open]")
    title = page.inner_text("#viewer-title")
    page.keyboard.press("ArrowRight")
    page.wait_for_function(
        "(old) => document.querySelector('#viewer-title').textContent !== old", arg=title
    )
    page.keyboard.press("m")
    page.wait_for_selector("#viewer", state="hidden")
    wait_text(page, "#summary", "like photo")
    page.wait_for_function(ALL_THUMBS_LOADED)
    assert card_ids(page)[0] == ids[int(columns) + 1]
    assert page.evaluate("document.activeElement.classList.contains('thumb')")


def test_sign_in_when_the_server_has_a_token(browser, library, fake_encoder):
    with served(library, fake_encoder, token="let-me-in") as (server, _):
        context = browser.new_context()
        tab = context.new_page()
        tab.goto(server.url)
        tab.wait_for_selector("#login[open]")
        tab.fill("#token", "wrong")
        tab.press("#token", "Enter")
        tab.wait_for_function("() => document.querySelector('#login-error').textContent !== ''")
        tab.fill("#token", "let-me-in")
        tab.press("#token", "Enter")
        tab.wait_for_selector("#status[data-state='ready']")
        search(tab, "after sign-in")
        assert len(card_ids(tab)) == 25
        context.close()


def test_api_docs_render_with_no_internet(browser, library, fake_encoder):
    """/docs loads Swagger UI from this server alone: every other host is cut off."""
    with served(library, fake_encoder) as (server, _):
        context = browser.new_context()
        elsewhere: list[str] = []

        def local_only(route) -> None:
            if route.request.url.startswith(server.url):
                route.continue_()
            else:
                elsewhere.append(route.request.url)
                route.abort()

        context.route("**/*", local_only)
        tab = context.new_page()
        tab.goto(f"{server.url}/docs")
        tab.wait_for_selector(".opblock", timeout=30_000)
        assert tab.locator(".opblock").count() >= 12
        assert elsewhere == []
        context.close()


def test_a_name_that_is_not_utf8_shows_its_bytes_as_escapes(browser, tmp_path, fake_encoder):
    """The API sends caf\\udce9.jpg (lossless); the page shows caf\\xe9.jpg, as the CLI."""
    folder = tmp_path / "odd"
    folder.mkdir()
    name = os.fsdecode(os.fsencode(folder) + b"/caf\xe9.jpg")
    Image.new("RGB", (120, 90), (30, 90, 160)).save(name)
    library = tmp_path / "odd-library"
    with Library.open(library, create=True) as lib:
        index_paths(lib, fake_encoder, [folder])
    with served(library, fake_encoder) as (server, _):
        context = browser.new_context()
        tab = context.new_page()
        tab.goto(server.url)
        tab.wait_for_selector("#status[data-state='ready']")
        search(tab, "anything")
        name = tab.text_content("#results .card .name")
        assert name == "caf\\xe9.jpg", name
        context.close()


def test_status_line_shows_the_sync_of_watched_folders(browser, photos, tmp_path, fake_encoder):
    library = tmp_path / "watched-library"
    timers = dict(watch_debounce=0.2, watch_settle=0.2)
    with served(library, fake_encoder, watch_paths=(photos,), **timers) as (server, _):
        context = browser.new_context()
        tab = context.new_page()
        tab.goto(server.url)
        wait_text(tab, "#status", "watching 1 folder")
        wait_text(tab, "#status", "25 photos")
        image = Image.new("RGB", (160, 120), (250, 250, 10))
        image.save(photos / "arrived.jpg", quality=90)
        wait_text(tab, "#status", "26 photos")  # the page asks again every few seconds
        assert "last batch" in tab.inner_text("#status")
        context.close()


def test_a_word_match_says_why_and_the_viewer_marks_the_words(browser, library, fake_encoder):
    from tests.textfixtures import add_text

    with Library.open(library, read_only=True) as lib:
        target = lib.catalog.id_for_path(str(Path(library).parent / "photos" / "photo_17.jpg"))
    add_text(library, [(target, "ocr", "CLOSED <b>for</b> renovation until May")])
    with served(library, fake_encoder) as (server, _):
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        tab = context.new_page()
        tab.goto(server.url)
        tab.wait_for_selector("#status[data-state='ready']")
        search(tab, "renovation")
        assert card_ids(tab)[0] == target
        first = tab.locator("#results .card").first
        assert first.locator(".words").inner_text() == "renovation (ocr)"
        first.locator(".thumb").click()
        tab.wait_for_selector("#viewer-meta .snippet mark")
        assert tab.inner_text("#viewer-meta .snippet mark") == "renovation"
        # The photo's text is shown as text: its "<b>" is not markup.
        assert "<b>for</b>" in tab.inner_text("#viewer-meta .snippet")
        assert "Text in photo" in tab.inner_text("#viewer-meta")
        context.close()
