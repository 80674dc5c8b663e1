"""Salvage's count of lost rows is the truth, whatever the page size and wherever a file is cut.

The truth is computed from the files: every table's rows in the catalog before the damage,
minus the rows the salvaged catalog holds. Rowids have gaps here on purpose (a video's
frames take ids from the images sequence, a deleted photo leaves its id unused), so
counting the rowids whose lookup failed would count rows that never were.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from indexer.model.identity import EMBED_DIM
from indexer.store import catalog as catalog_module
from indexer.store.catalog import Catalog, ImageRecord
from indexer.store.salvage import salvage

DERIVED = ("text_fts",)  # the FTS index and its shadow tables: rebuilt, never copied


def _unit(rng: np.random.Generator, count: int) -> np.ndarray:
    vectors = rng.standard_normal((count, EMBED_DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _records(rng: np.random.Generator, start: int, count: int) -> list[ImageRecord]:
    """Photos, and every fifth a video of three frames (two frame ids each)."""
    records = []
    for i, vector in enumerate(_unit(rng, count), start):
        record = ImageRecord(f"/photos/{i // 10}/p{i:03d}.jpg", 1, 1, f"{i:064x}", vector, 64, 48)
        if i % 5 == 0:
            record.kind, record.frame_time = "video", 0.0
            record.frame_times, record.frame_vectors = [0.0, 1.0, 2.0], _unit(rng, 3)
        records.append(record)
    return records


@pytest.fixture(scope="module", params=[4096, 32768, 65536], ids=["4k", "32k", "64k"])
def built(request, tmp_path_factory):
    """A catalog of 60 photos and videos with tags, deletions and failures, at a page size."""
    folder = tmp_path_factory.mktemp(f"catalog{request.param}")
    path = folder / "catalog.sqlite"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(catalog_module, "PAGE_SIZE", request.param)
        catalog = Catalog(path)
    rng = np.random.default_rng(request.param)
    ids = catalog.commit_batch(_records(rng, 0, 30), failed=[("/photos/bad.jpg", 1, 1, "x")])
    ids += catalog.commit_batch(_records(rng, 30, 30))
    catalog.delete_ids(ids[3:9])  # gaps in the rowids
    catalog.store_tags("labels", {i: [("cat", 0.9), ("dog", 0.1)] for i in ids[20:40]})
    catalog.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA page_size").fetchone()[0] == request.param
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return path


def _row_counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        names = [
            r[0]
            for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not r[0].startswith(("sqlite_", *DERIVED))
        ]
        counts = {n: conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}
    conn.close()
    return counts


@pytest.mark.parametrize("fraction", [0.3, 0.45, 0.6, 0.75, 0.9, 0.97])
def test_lost_rows_are_counted_exactly_after_a_truncation(built, fraction, tmp_path):
    before = _row_counts(built)
    damaged = tmp_path / "damaged.sqlite"
    shutil.copy(built, damaged)
    with open(damaged, "r+b") as handle:
        handle.truncate(int(damaged.stat().st_size * fraction))
    fresh = tmp_path / "fresh.sqlite"
    Catalog(fresh).close()
    report = salvage(damaged, fresh)
    after = _row_counts(fresh)
    truth = {t: before[t] - after[t] for t in before if before[t] > after[t]}
    assert truth, "the cut lost nothing: the test would show nothing"
    for table, lost in truth.items():
        if table in report.unreadable_tables:
            # Nothing of it could be read: what it lost is known only from what names its
            # rows (its indexes, other tables' keys), so the count may fall short, never over.
            assert report.lost.get(table, 0) <= lost, table
        else:
            assert report.lost.get(table, 0) == lost, (table, report.lost, truth)
    assert report.lost.get("images", 0) == truth.get("images", 0)  # the photos to re-encode
    assert not set(report.lost) - set(truth)
