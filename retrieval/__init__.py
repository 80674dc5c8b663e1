"""clipdex's query side and its interfaces.

The Python API (the front door the CLI, the server and the tests use)::

    from retrieval import Collection, IndexOptions, SearchOptions, SyncOptions

Names load on first use (module ``__getattr__``), so ``import retrieval`` stays cheap.

Layers, lowest first, above ``indexer``'s; each imports only itself and the layers below
it (tests/test_layers.py checks the import graph)::

    search   search/          engine, query grammar, filters, cut-off, classify, duplicates
    front    retrieval/*.py   this front door (``collection.py``): open, index, search, ...
    cli      cli/             } interfaces: parse, call the front door, render; they never
    server   server/ (+ web)  } import each other (`clipdex serve` only launches the server)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from indexer.ingest.pipeline import IndexOptions
    from indexer.ingest.sync import SyncOptions
    from retrieval.collection import Collection, CollectionInfo
    from retrieval.search.engine import SearchPage, SearchResult
    from retrieval.search.options import SearchOptions

_EXPORTS = {
    "Collection": "retrieval.collection",
    "CollectionInfo": "retrieval.collection",
    "IndexOptions": "indexer.ingest.pipeline",
    "SearchOptions": "retrieval.search.options",
    "SearchPage": "retrieval.search.engine",
    "SearchResult": "retrieval.search.engine",
    "SyncOptions": "indexer.ingest.sync",
}

__all__ = [
    "Collection",
    "CollectionInfo",
    "IndexOptions",
    "SearchOptions",
    "SearchPage",
    "SearchResult",
    "SyncOptions",
]


def __getattr__(name: str) -> Any:
    """Import an exported name from its module on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
