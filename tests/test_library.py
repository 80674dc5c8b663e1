"""Catalog + vector index: storage, reconciliation, model identity, lock."""

from __future__ import annotations

import pytest

from indexer.errors import LibraryError, LibraryLocked, ModelMismatch
from indexer.model.identity import ModelIdentity
from indexer.store.library import Library
from tests.records import random_records, store


def test_open_missing_library_says_how_to_create(tmp_path):
    with pytest.raises(LibraryError, match="index some photos into it") as caught:
        Library.open(tmp_path / "nope")
    assert caught.value.setting == "library"


def test_stored_vectors_are_searchable_by_id(tmp_path):
    with Library.open(tmp_path / "lib", create=True) as library:
        records = random_records(5)
        ids = store(library, records)
        scores, found = library.index.search(records[2].vector[None], 1)
        assert found[0][0] == ids[2]
        assert scores[0][0] == pytest.approx(1.0, abs=1e-5)
    with Library.open(tmp_path / "lib") as reopened:
        assert sorted(reopened.index.ids()) == sorted(ids)


def test_reconcile_adds_rows_missing_from_index_and_drops_orphans(tmp_path):
    library = Library.open(tmp_path / "lib", create=True)
    ids = store(library, random_records(4))
    # A crash after the catalog commit but before the index save:
    library.catalog.commit_batch(random_records(3, start=10))
    # ...and an index holding an id whose row is gone:
    library.catalog.delete_ids([ids[0]])
    library.close()
    with Library.open(tmp_path / "lib") as reopened:
        assert sorted(reopened.index.ids()) == sorted(reopened.catalog.ids())
        assert len(reopened.index) == 6


def test_checkpoints_append_and_compaction_leaves_one_base_file(tmp_path):
    root = tmp_path / "lib"
    with Library.open(root, create=True) as library:
        store(library, random_records(2))
        store(library, random_records(2, start=5))
        assert sorted(p.name for p in root.glob("delta.*")) == ["delta.0.vec"]
        assert (root / "delta.0.vec").stat().st_size == 4 * (8 + 4 * 512)  # 4 rows appended
        assert library.compact() == 4
        files = sorted(p.name for p in root.iterdir() if p.name.startswith(("vectors", "delta")))
        base = f"vectors.{library.catalog.generation()}.faiss"
        assert files == [base, base + ".check"]


def test_model_identity_is_bound_once_and_enforced(tmp_path):
    with Library.open(tmp_path / "lib", create=True) as library:
        library.bind_model(ModelIdentity(weights="sha256:aaa"))
        library.bind_model(ModelIdentity(weights="sha256:aaa"))
        with pytest.raises(ModelMismatch, match="same weights") as caught:
            library.bind_model(ModelIdentity(weights="datacompdr"))
        assert caught.value.setting == "weights"


def test_second_writer_is_refused_clearly(tmp_path):
    first = Library.open(tmp_path / "lib", create=True)
    second = Library.open(tmp_path / "lib")
    with first.writing(), pytest.raises(LibraryLocked, match="another clipdex process"):
        second.acquire_lock()
    second.acquire_lock()  # free again once the first writer is done
    second.close()
    first.close()


def test_rebuild_index_from_catalog_alone(tmp_path):
    with Library.open(tmp_path / "lib", create=True) as library:
        ids = store(library, random_records(7))
    for path in (tmp_path / "lib").iterdir():  # every index file: the catalog alone stays
        if path.name.startswith(("vectors.", "delta.", "segments.json")):
            path.unlink()
    with Library.open(tmp_path / "lib") as library:
        assert sorted(library.index.ids()) == sorted(ids)
        assert library.rebuild_index() == 7
