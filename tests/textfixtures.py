"""Words stored with photos, for the tests of the word search and its fusion.

Until the indexer writes the text tables itself these helpers create them with the DDL the
integrator wrote down (/work/NOTES.md: ``image_text`` + the FTS5 ``text_fts`` whose rowid is
the ``image_text`` row's) and insert rows into a library's catalog directly.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

DDL = """
CREATE TABLE IF NOT EXISTS image_text (
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    source TEXT NOT NULL,
    text TEXT NOT NULL,
    confidence REAL
);
CREATE INDEX IF NOT EXISTS ix_image_text_image_id ON image_text (image_id);
CREATE VIRTUAL TABLE IF NOT EXISTS text_fts USING fts5(
    text, content='image_text', content_rowid='rowid',
    tokenize='unicode61 remove_diacritics 2'
);
"""


def add_text(library_root: Path, rows: Iterable[tuple[int, str, str]]) -> None:
    """Store ``(image_id, source, text)`` rows in the library's catalog (and its FTS5)."""
    connection = sqlite3.connect(Path(library_root) / "catalog.sqlite")
    try:
        connection.executescript(DDL)
        for image_id, source, text in rows:
            cursor = connection.execute(
                "INSERT INTO image_text (image_id, source, text) VALUES (?, ?, ?)",
                (image_id, source, text),
            )
            connection.execute(
                "INSERT INTO text_fts (rowid, text) VALUES (?, ?)", (cursor.lastrowid, text)
            )
        connection.commit()
    finally:
        connection.close()
