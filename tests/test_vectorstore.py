"""The vector-store seam: the protocol, the kind registry and the kind in each file's stamp."""

from __future__ import annotations

import json

import numpy as np
import pytest

from indexer.errors import LibraryError
from indexer.model.identity import l2_normalise
from indexer.store.library import Library
from indexer.store.vectors import VectorIndex
from indexer.store.vectorstore import (
    DEFAULT_KIND,
    KINDS,
    VectorStore,
    load_store,
    open_store,
    stamp_path,
    store_class,
)


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return l2_normalise(np.random.default_rng(seed).standard_normal((n, 512))).astype(np.float32)


def test_every_kind_implements_the_protocol():
    assert DEFAULT_KIND in KINDS
    for kind in KINDS:
        store = open_store(kind)
        assert isinstance(store, VectorStore)
        assert store.kind == kind and store_class(kind).kind == kind
        assert len(store) == 0 and store.dim == 512


def test_exact_is_the_faiss_flat_index():
    assert store_class("exact") is VectorIndex


def test_stamp_names_the_kind_and_load_store_reads_it_back(tmp_path):
    store = open_store()
    vectors = _vectors(6)
    store.add(np.arange(10, 16), vectors)
    path = tmp_path / "vectors.1.faiss"
    store.save(path)
    assert json.loads(stamp_path(path).read_text())["kind"] == "exact"
    loaded = load_store(path, mmap=True)
    assert loaded.kind == "exact" and sorted(loaded.ids().tolist()) == list(range(10, 16))
    scores, ids = loaded.search(vectors[2], 1)
    assert ids[0, 0] == 12 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_a_stamp_from_before_kinds_is_read_as_exact(tmp_path):
    store = open_store()
    store.add(np.arange(3), _vectors(3))
    path = tmp_path / "vectors.1.faiss"
    store.save(path)
    stamp = json.loads(stamp_path(path).read_text())
    del stamp["kind"]
    stamp_path(path).write_text(json.dumps(stamp))
    assert len(load_store(path)) == 3


def test_an_unknown_kind_is_refused_by_name(tmp_path):
    store = open_store()
    store.add(np.arange(3), _vectors(3))
    path = tmp_path / "vectors.1.faiss"
    store.save(path)
    stamp = json.loads(stamp_path(path).read_text())
    stamp_path(path).write_text(json.dumps({**stamp, "kind": "hnsw-from-the-future"}))
    with pytest.raises(LibraryError, match="hnsw-from-the-future"):
        load_store(path)


def test_library_rebuild_keeps_the_kind(tmp_path):
    with Library.open(tmp_path / "lib", create=True) as library:
        assert isinstance(library.index, VectorStore)
        library.rebuild_index()
        assert library.index.kind == DEFAULT_KIND
