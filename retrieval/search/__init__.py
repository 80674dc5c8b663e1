"""Search layer: answering queries over a library.

Owns the search engine, the query grammar, metadata filters (and their plain SQL), the
score cut-off, ranking and paging, zero-shot classify and tagging, duplicates, and
:class:`~retrieval.search.errors.QueryError`. It imports the ``indexer`` layers (base,
model, store, and ingest's decoder for a query photo) and nothing above it: not the front
door (modules directly in ``retrieval/``), not the CLI, not the server.
"""
