"""Which catalogued files are camera RAWs, found through a partial index (schema 8).

The RAW+JPEG pair map (:mod:`retrieval.search.pairs`) needs the RAW rows of the library on
the first query of every process. A condition on the path's suffix cannot use the path's
own index, so without help that is a scan of the whole ``images`` table (each row holds
its vector: 4.4 GB at a million photos, seconds warm and over a minute from a cold disk).
``ix_images_raw`` is a *partial* index holding only the rows whose path ends in a RAW
suffix: SQLite keeps it in step with every insert, update and delete (whoever writes), and
a query with exactly :data:`RAW_PATH_SQL` as its condition reads it alone: the cost
follows the number of RAW files, not the library's size. A catalog without the index
(schema 7, read before any writer migrated it) answers the same query by a scan.

The suffixes are frozen here, as the index was created: SQLite only uses a partial index
for a condition written exactly as its own. A RAW format added later needs a new
migration step that creates the index again (tests/test_raw_pairs.py checks the list
against :data:`indexer.ingest.raw.RAW_SUFFIXES`).
"""

from __future__ import annotations

# fmt: off
RAW_SUFFIXES_INDEXED = (
    ".3fr", ".ari", ".arw", ".bay", ".cap", ".cr2", ".cr3", ".crw", ".dcr", ".dcs", ".dng",
    ".erf", ".fff", ".gpr", ".iiq", ".k25", ".kdc", ".mef", ".mos", ".mrw", ".nef", ".nrw",
    ".orf", ".ori", ".pef", ".raf", ".raw", ".rw2", ".rwl", ".sr2", ".srf", ".srw", ".x3f",
)
# fmt: on


def raw_path_condition(suffixes=RAW_SUFFIXES_INDEXED) -> str:
    """SQL true for a ``path`` ending in one of ``suffixes`` (any case); constants only."""
    lengths = sorted({len(suffix) for suffix in suffixes})
    return " OR ".join(
        f"lower(substr(path, -{n})) IN "
        f"({', '.join(repr(s) for s in sorted(suffixes) if len(s) == n)})"
        for n in lengths
    )


RAW_PATH_SQL = raw_path_condition()
RAW_INDEX_DDL = f"CREATE INDEX IF NOT EXISTS ix_images_raw ON images (path) WHERE {RAW_PATH_SQL}"
# No ORDER BY: ordering by id would make SQLite walk the table instead of the index.
RAW_FILES_SQL = f"SELECT id, path FROM images WHERE {RAW_PATH_SQL}"
