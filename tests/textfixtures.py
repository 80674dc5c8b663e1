"""Words stored with photos, for the tests of the word search and its fusion.

Indexing stores each photo's file and folder names (and its captions, keywords and text read
in it); these helpers add more rows the way :meth:`Catalog._insert_texts` does
(``image_text`` + the FTS5 ``text_fts`` with the same rowid, CJK spaced), straight into a
library's catalog file, or take them all away.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from indexer.store.textindex import fts_text


def add_text(library_root: Path, rows: Iterable[tuple[int, str, str]]) -> None:
    """Store ``(image_id, source, text)`` rows in the library's catalog (and its FTS5)."""
    connection = sqlite3.connect(Path(library_root) / "catalog.sqlite")
    try:
        for image_id, source, text in rows:
            cursor = connection.execute(
                "INSERT INTO image_text (image_id, source, text) VALUES (?, ?, ?)",
                (image_id, source, text),
            )
            connection.execute(
                "INSERT INTO text_fts (rowid, text, image_id, source) VALUES (?, ?, ?, ?)",
                (cursor.lastrowid, fts_text(text), image_id, source),
            )
        connection.commit()
    finally:
        connection.close()


def drop_all_text(library_root: Path) -> None:
    """No words at all (as a library that stored none): every text row goes."""
    connection = sqlite3.connect(Path(library_root) / "catalog.sqlite")
    try:
        connection.execute("DELETE FROM image_text")  # the trigger empties text_fts
        connection.commit()
    finally:
        connection.close()
