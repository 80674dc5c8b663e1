"""Store layer: the library on disk.

Owns the library folder (``library.py``, the only code that spells its layout), the catalog
in SQLite (``catalog.py``, the source of truth: metadata and every vector), the vector
stores behind one protocol (``vectorstore.py``; the exact FAISS kind in ``vectors.py``) and
the salvage of a damaged catalog. It imports the base modules and the model layer (the model
identity and embedding size) only. It is the one home of SQLAlchemy, sqlite3 and faiss.
"""
