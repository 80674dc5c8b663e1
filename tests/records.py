"""Catalog records with random unit vectors, and storing them in a library the way an
index run does (catalog commit, index add, checkpoint): for the store-level tests."""

from __future__ import annotations

import numpy as np

from indexer.model.identity import l2_normalise
from indexer.store.catalog import ImageRecord
from indexer.store.library import Library


def random_records(n: int, start: int = 0) -> list[ImageRecord]:
    """``n`` records named ``/p/<i>.jpg`` from ``start`` on, with distinct hashes and
    random unit vectors (seeded by ``start``: the same call gives the same records)."""
    vectors = l2_normalise(np.random.default_rng(start).standard_normal((n, 512)))
    return [
        ImageRecord(f"/p/{start + i}.jpg", 1, 1, f"{start + i:064x}", vectors[i], 8, 8)
        for i in range(n)
    ]


def store(library: Library, records: list[ImageRecord]) -> list[int]:
    """Commit ``records`` to the catalog, add their vectors to the index, checkpoint;
    returns their ids."""
    ids = library.catalog.commit_batch(records)
    library.index.add(np.asarray(ids), np.vstack([r.vector for r in records]))
    library.checkpoint()
    return ids
