"""clipdex's indexing side: everything that turns files into a library on disk.

Four layers, lowest first; each imports only itself and the layers below it
(tests/test_layers.py checks the import graph)::

    base    errors.py, paths.py, fsutil.py   typed errors, stored path forms, atomic writes
    model   model/                           identity, tokenizer, encoders (torch, ONNX)
    store   store/                           library folder, catalog, vector stores, salvage
    ingest  ingest/                          discover, decode, workers, pipeline, repair

The base modules import only the standard library. Nothing here imports ``retrieval`` or
knows that a CLI or HTTP exists: errors carry a code, a status hint and the name of the
setting to change, and the edges word them.
"""
