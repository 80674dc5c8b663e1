"""Ingest layer: files in, catalog rows and vectors out.

Owns discovery (folder walks, incremental by size and mtime), decoding (photos, RAW, video
frames, pixel limits), the decode worker processes, the indexing pipeline (batches, encode,
checkpoint), repair, and the sync that keeps a library in step with watched folders
(``sync``: debounced batches of changed paths; ``watch``: its event sources, the only home of
watchfiles), and indexing on a Ray cluster (``cluster``: this process plans and commits
shards, Ray Data actors decode and encode; the only home of ray and pyarrow, imported only
when a cluster is asked for). It imports the base modules, the model and the store layers; never
``retrieval``. The encoder and the library are handed in, so tests can pass fakes.
"""
