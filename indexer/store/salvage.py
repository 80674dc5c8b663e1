"""Copy what is still readable out of a damaged SQLite catalog into a fresh one.

Used by `clipdex repair` when ``PRAGMA integrity_check`` fails. It reads the damaged file
with the standard ``sqlite3`` module, table by table in rowid windows; a window that
raises is split in halves down to single rows, so one bad page costs only its own rows.
The target is a freshly migrated catalog, whose schema (``PRAGMA table_info`` and
``foreign_key_list``) says which columns to copy and which rows would dangle: rows that
reference a lost image are dropped too. Nothing here knows the catalog's tables by name
but ``meta``, whose ``schema_version`` the target keeps.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

WINDOW = 1000  # rowids read per query while the pages are healthy
_Row = tuple


@dataclass
class SalvageReport:
    """Rows copied and rows (or whole tables) that could not be read, per table."""

    copied: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    unreadable_tables: list[str] = field(default_factory=list)

    @property
    def rows_lost(self) -> int:
        return sum(self.lost.values())


def salvage(damaged: Path, target: Path) -> SalvageReport:
    """Copy every readable row of ``damaged`` into the (migrated, empty) catalog ``target``."""
    report = SalvageReport()
    source = _open_source(damaged)
    dest = sqlite3.connect(target)
    try:
        kept: dict[tuple[str, str], set] = {}
        referenced = _referenced_columns(dest)
        for table in _tables_in_order(dest):
            rows = _read_table(source, table, _columns(dest, table), report)
            rows = _drop_dangling(dest, table, rows, kept, report)
            _write_rows(dest, table, _columns(dest, table), rows)
            _remember_keys(dest, table, rows, referenced, kept)
            report.copied[table] = len(rows)
        _keep_sequences(source, dest)
        dest.commit()
    finally:
        dest.close()
        if source is not None:
            source.close()
    return report


def _open_source(path: Path) -> sqlite3.Connection | None:
    """The damaged file, read-only; None when SQLite cannot even open it."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        # Without it SQLite refuses every page of a file shorter than its header says.
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError:
        return None
    conn.text_factory = lambda b: b.decode("utf-8", "replace")
    return conn


def _tables_in_order(conn: sqlite3.Connection) -> list[str]:
    """The target's tables, each after the tables its foreign keys reference.

    Virtual tables (the FTS5 text index) and their shadow tables are derived data, not
    copied: the catalog rebuilds them from the salvaged rows
    (:meth:`~indexer.store.catalog.Catalog.rebuild_text_index`).
    """
    rows = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    virtual = [n for n, sql in rows if (sql or "").upper().startswith("CREATE VIRTUAL TABLE")]
    names = [
        n for n, _ in rows if n not in virtual and not any(n.startswith(v + "_") for v in virtual)
    ]
    parents = {n: {fk[2] for fk in conn.execute(f'PRAGMA foreign_key_list("{n}")')} for n in names}
    ordered: list[str] = []
    for _ in names:  # at most one pass per table; a cycle leaves the rest in any order
        ordered += [n for n in names if n not in ordered and parents[n] <= {*ordered, n}]
    return ordered + [n for n in names if n not in ordered]


def _referenced_columns(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    """(table, column) pairs some foreign key points at: the keys to remember."""
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    return {
        (fk[2], fk[4]) for t in tables for fk in conn.execute(f'PRAGMA foreign_key_list("{t}")')
    }


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')]


def _read_table(
    source: sqlite3.Connection | None, table: str, columns: list[str], report: SalvageReport
) -> list[_Row]:
    """Every readable row of ``table`` (only the target's columns), in rowid order."""
    if source is None:
        report.unreadable_tables.append(table)
        return []
    try:
        present = set(_columns(source, table))
    except sqlite3.DatabaseError:
        present = set()
    if not present:
        report.unreadable_tables.append(table)
        return []
    select = ", ".join(f'"{c}"' if c in present else "NULL" for c in columns)
    query = f'SELECT {select} FROM "{table}" WHERE rowid BETWEEN ? AND ? ORDER BY rowid'
    rows: list[_Row] = []
    top = _top_rowid(source, table)
    start, empty = 1, 0
    # Windows up to the top rowid; if it is unknown, until 16 windows in a row yield nothing.
    while (top is not None and start <= top) or (top is None and empty < 16):
        before = len(rows)
        end = start + WINDOW - 1 if top is None else min(top, start + WINDOW - 1)
        _read_window(source, query, start, end, rows, table, report)
        empty = empty + 1 if len(rows) == before else 0
        start += WINDOW
    if not rows and table in report.lost:
        report.unreadable_tables.append(table)
    return rows


def _top_rowid(source: sqlite3.Connection, table: str) -> int | None:
    """The largest rowid, from the table or its AUTOINCREMENT counter; None if unreadable."""
    queries = [
        (f'SELECT max(rowid) FROM "{table}"', ()),
        ("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,)),
    ]
    for query, args in queries:
        try:
            row = source.execute(query, args).fetchone()
        except sqlite3.DatabaseError:
            continue
        if row is not None:
            return int(row[0] or 0)
    return None


def _read_window(source, query: str, low: int, high: int, rows: list, table: str, report) -> None:
    """Rows with rowid in [low, high]; a failing window is split until single rows fail."""
    try:
        rows.extend(source.execute(query, (low, high)).fetchall())
        return
    except sqlite3.DatabaseError:
        if low == high:
            report.lost[table] = report.lost.get(table, 0) + 1
            return
    middle = (low + high) // 2
    _read_window(source, query, low, middle, rows, table, report)
    _read_window(source, query, middle + 1, high, rows, table, report)


def _drop_dangling(
    dest: sqlite3.Connection,
    table: str,
    rows: list[_Row],
    kept: dict[tuple[str, str], set],
    report: SalvageReport,
) -> list[_Row]:
    """Rows whose foreign keys all point at rows that were salvaged."""
    columns = _columns(dest, table)
    checks = [
        (columns.index(fk[3]), kept.get((fk[2], fk[4]), set()))
        for fk in dest.execute(f'PRAGMA foreign_key_list("{table}")')
    ]
    if not checks:
        return rows
    good = [r for r in rows if all(r[i] is None or r[i] in keys for i, keys in checks)]
    if len(good) < len(rows):
        report.lost[table] = report.lost.get(table, 0) + len(rows) - len(good)
    return good


def _remember_keys(
    dest: sqlite3.Connection,
    table: str,
    rows: list[_Row],
    referenced: set[tuple[str, str]],
    kept: dict[tuple[str, str], set],
) -> None:
    """Keep the salvaged values of the columns that foreign keys reference."""
    columns = _columns(dest, table)
    for name in columns:
        if (table, name) in referenced:
            kept[(table, name)] = {r[columns.index(name)] for r in rows}


def _keep_sequences(source: sqlite3.Connection | None, dest: sqlite3.Connection) -> None:
    """Carry AUTOINCREMENT counters over, so the id of a lost row is never given again."""
    if source is None:
        return
    try:
        counters = source.execute("SELECT name, seq FROM sqlite_sequence").fetchall()
    except sqlite3.DatabaseError:
        return
    for name, seq in counters:
        dest.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?", (seq, name))
        dest.execute(
            "INSERT INTO sqlite_sequence (name, seq) SELECT ?, ? "
            "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = ?)",
            (name, seq, name),
        )


def _write_rows(dest: sqlite3.Connection, table: str, columns: list[str], rows: list) -> None:
    if table == "meta":  # the fresh catalog's schema version is the right one
        version = columns.index("key")
        rows = [r for r in rows if r[version] != "schema_version"]
        dest.executemany('DELETE FROM meta WHERE "key" = ?', [(r[version],) for r in rows])
    marks = ", ".join("?" for _ in columns)
    names = ", ".join(f'"{c}"' for c in columns)
    dest.executemany(f'INSERT OR IGNORE INTO "{table}" ({names}) VALUES ({marks})', rows)
