"""`clipdex repair` while `clipdex serve` runs: the server answers from the new catalog.

Repair takes the writer lock (so it never runs beside an index job) and renames a salvaged
catalog over the damaged one. A running server notices that the catalog file at the path is
another file (device, inode) and, before its next query, opens the new one and reloads the
index; it never reads on from the deleted file or serves ids the new catalog lacks.
"""

from __future__ import annotations

import sqlite3

import httpx
import numpy as np
import pytest
from PIL import Image

from indexer.errors import LibraryLocked
from indexer.ingest.pipeline import IndexOptions, index_paths
from indexer.ingest.repair import repair_library
from indexer.store.library import Library
from tests.live_server import served


@pytest.fixture
def built(tmp_path, fake_encoder):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(12):
        pixels = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i:02d}.png")
    root = tmp_path / "library"
    with Library.open(root, create=True) as lib:
        index_paths(lib, fake_encoder, [folder], IndexOptions(workers=1))
    return root, folder


def overwrite_images_root_page(catalog) -> None:
    """Garbage over the images table's root page (as tests/test_corruption.py does)."""
    with sqlite3.connect(catalog) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root_page,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name='images'"
        ).fetchone()
    conn.close()
    with open(catalog, "r+b") as handle:
        handle.seek((root_page - 1) * page_size)
        handle.write(np.random.default_rng(0).bytes(page_size))


def result_ids(client: httpx.Client) -> set[int]:
    response = client.get("/api/search", params={"q": "anything", "k": 100})
    assert response.status_code == 200, response.text
    return {hit["id"] for hit in response.json()["results"]}


def test_a_running_server_answers_from_the_catalog_repair_swapped_in(built, fake_encoder):
    root, folder = built
    catalog = Library.catalog_path(root)
    with served(root, fake_encoder) as (_, client):
        before = result_ids(client)
        assert len(before) == 12
        client.get(f"/api/images/{min(before)}")  # the server's connections are warm
        overwrite_images_root_page(catalog)
        report = repair_library(root, lambda: fake_encoder, [folder])
        assert report.catalog == "salvaged" and report.indexed.indexed == 12
        with Library.open(root) as lib:
            now = set(lib.catalog.ids().tolist())
        assert now.isdisjoint(before)  # the lost rows came back under new ids
        # Photo routes read the catalog now at the path, even before any search ran ...
        assert client.get(f"/api/images/{min(before)}").status_code == 404
        meta = client.get(f"/api/images/{min(now)}")
        assert meta.status_code == 200 and meta.json()["path"].startswith(str(folder))
        assert client.get("/api/info").json()["images"] == 12
        # ... and a search reloads the index: only the new catalog's ids come back.
        assert result_ids(client) == now


def test_repair_refuses_to_run_beside_a_writer(built, fake_encoder):
    """Repair and indexing coordinate through the library's writer lock."""
    root, _ = built
    with Library.open(root) as writer:
        writer.acquire_lock()
        with pytest.raises(LibraryLocked):
            repair_library(root)
    assert repair_library(root).catalog == "ok"
