"""Copy what is still readable out of a damaged SQLite catalog into a fresh one.

Used by `clipdex repair` when ``PRAGMA integrity_check`` fails. It reads the damaged file
with the standard ``sqlite3`` module, table by table in rowid windows; a window that
raises is split in halves down to single rows, so one bad page costs only its own rows.
The target is a freshly migrated catalog, whose schema (``PRAGMA table_info`` and
``foreign_key_list``) says which columns to copy and which rows would dangle: rows that
reference a lost image are dropped too. The rows lost are counted from what still names
them (every index entry holds its row's rowid; a foreign key names its parent's), not from
failed lookups: rowids have gaps, and pages differ in size. Nothing here knows the
catalog's tables by name but ``meta``, whose ``schema_version`` the target keeps.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

WINDOW = 1000  # rowids read per query while the pages are healthy
_Row = tuple


@dataclass
class SalvageReport:
    """Rows copied and rows (or whole tables) that could not be read, per table.

    ``lost`` counts rows known to have existed (see :func:`_count_lost`) and not copied,
    dangling ones included; for a table in ``unreadable_tables`` it may fall short.
    """

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
    end = _pages_present(damaged)
    dest = sqlite3.connect(target)
    try:
        kept: dict[tuple[str, str], set] = {}
        referenced = _referenced_columns(dest)
        reads: dict[str, _TableRead] = {}
        references: dict[str, set] = {}
        for table in _tables_in_order(dest):
            read = reads[table] = _read_table(source, table, _columns(dest, table), end)
            for parent, ids in _rowid_references(dest, table, read.rows).items():
                references.setdefault(parent, set()).update(ids)
            rows = _drop_dangling(dest, table, read.rows, kept, report)
            _write_rows(dest, table, _columns(dest, table), rows)
            _remember_keys(dest, table, rows, referenced, kept)
            report.copied[table] = len(rows)
        for table, read in reads.items():
            indexed = _indexed_rowids(source, table, end)
            lost = _count_lost(read, indexed, references.get(table, set()))
            if lost:
                report.lost[table] = report.lost.get(table, 0) + lost
            if read.unreadable:
                report.unreadable_tables.append(table)
        _keep_sequences(source, dest)
        dest.commit()
    finally:
        dest.close()
        if source is not None:
            source.close()
    return report


def _pages_present(path: Path) -> int | None:
    """How many whole pages a truncated file still has (None if it is not shorter than its
    header says). SQLite, told to read such a file at all (``writable_schema``), reads a page
    past the end as an empty one, without an error: the callers look at root page numbers."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(100)
        size = path.stat().st_size
    except OSError:
        return None
    if len(header) < 100:
        return None
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if not page_size or size >= pages * page_size:
        return None
    return size // page_size


def _root_missing(source: sqlite3.Connection, name: str, end: int | None) -> bool:
    """The b-tree ``name``'s root page lies past the end of a truncated file."""
    if end is None:
        return False
    try:
        row = source.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)
        ).fetchone()
    except sqlite3.DatabaseError:
        return True
    return row is None or not row[0] or row[0] > end


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


@dataclass
class _TableRead:
    """What reading one table gave: its rows (target columns), their rowids, and the rowids
    whose lookup raised (a damaged page on the way: the row may or may not have existed)."""

    rows: list[_Row] = field(default_factory=list)
    rowids: list[int] = field(default_factory=list)
    failed: set[int] = field(default_factory=set)
    top_known: bool = True
    unreadable: bool = False


def _read_table(
    source: sqlite3.Connection | None, table: str, columns: list[str], end: int | None
) -> _TableRead:
    """Every readable row of ``table`` (only the target's columns), in rowid order."""
    read = _TableRead()
    if source is None or _root_missing(source, table, end):
        read.unreadable = True
        return read
    try:
        present = set(_columns(source, table))
    except sqlite3.DatabaseError:
        present = set()
    if not present:
        read.unreadable = True
        return read
    select = ", ".join(f'"{c}"' if c in present else "NULL" for c in columns)
    query = f'SELECT rowid, {select} FROM "{table}" WHERE rowid BETWEEN ? AND ? ORDER BY rowid'
    top = _top_rowid(source, table)
    read.top_known = top is not None
    start, empty = 1, 0
    # Windows up to the top rowid; if it is unknown, until 16 windows in a row yield nothing.
    while (top is not None and start <= top) or (top is None and empty < 16):
        before = len(read.rows)
        end = start + WINDOW - 1 if top is None else min(top, start + WINDOW - 1)
        _read_window(source, query, start, end, read)
        empty = empty + 1 if len(read.rows) == before else 0
        start += WINDOW
    read.unreadable = not read.rows and bool(read.failed)
    return read


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


def _read_window(source, query: str, low: int, high: int, read: _TableRead) -> None:
    """Rows with rowid in [low, high]; a failing window is split until single rows fail."""
    try:
        found = source.execute(query, (low, high)).fetchall()
    except sqlite3.DatabaseError:
        if low == high:
            read.failed.add(low)
            return
    else:
        read.rowids += [r[0] for r in found]
        read.rows += [tuple(r[1:]) for r in found]
        return
    middle = (low + high) // 2
    _read_window(source, query, low, middle, read)
    _read_window(source, query, middle + 1, high, read)


# -- how many rows were lost ----------------------------------------------------------------------
# A rowid whose lookup raised is not proof of a lost row: rowids have gaps (deleted rows, ids
# that went to another table: video frames take theirs from the images sequence), and past a
# truncation the top rowid may be unknown. The rows that did exist are known from what still
# lists them: every entry of an index holds its row's rowid, and a row of another table whose
# foreign key names a rowid says that row was there. Lost = known to exist, not read.


def _indexed_rowids(source: sqlite3.Connection | None, table: str, end: int | None) -> set[int]:
    """Rowids listed by the table's readable indexes, each read from both ends (a damaged
    index yields what lies before and after its damage). One index read end to end lists
    every row, unless the file is truncated (``end``: its whole pages), where a page past
    the end reads as empty: then every index adds what it can."""
    found: set[int] = set()
    if source is None:
        return found
    try:
        indexes = source.execute(f'PRAGMA index_list("{table}")').fetchall()
    except sqlite3.DatabaseError:
        return found
    for index in indexes:
        name, partial = index[1], index[4]
        try:
            keys = [r[2] for r in source.execute(f'PRAGMA index_info("{name}")')]
        except sqlite3.DatabaseError:
            continue
        if partial or not keys or None in keys or _root_missing(source, name, end):
            continue  # a partial or expression index lists only some rows
        for direction in ("ASC", "DESC"):
            order = ", ".join(f'"{k}" {direction}' for k in keys)
            query = f'SELECT rowid FROM "{table}" INDEXED BY "{name}" ORDER BY {order}'
            if _fetch_until_error(source, query, found):
                if end is None:
                    return found
                break
    return found


def _fetch_until_error(source: sqlite3.Connection, query: str, into: set[int]) -> bool:
    """Add the first column of every row ``query`` yields until one raises; True if none did."""
    try:
        cursor = source.execute(query)
        for row in cursor:
            into.add(row[0])
    except sqlite3.DatabaseError:
        return False
    return True


def _rowid_references(dest: sqlite3.Connection, table: str, rows: list[_Row]) -> dict[str, set]:
    """{parent table: rowids} that ``rows`` of ``table`` name through foreign keys on the
    parent's INTEGER PRIMARY KEY (its rowid)."""
    columns = _columns(dest, table)
    out: dict[str, set] = {}
    for fk in dest.execute(f'PRAGMA foreign_key_list("{table}")'):
        parent, here, there = fk[2], fk[3], fk[4]
        alias = _rowid_alias(dest, parent)
        if alias is None or there not in (None, alias):  # None: the parent's primary key
            continue
        values = {r[columns.index(here)] for r in rows} - {None}
        out.setdefault(parent, set()).update(values)
    return out


def _rowid_alias(conn: sqlite3.Connection, table: str) -> str | None:
    """The column that is the table's rowid (its sole INTEGER PRIMARY KEY), or None."""
    keys = [r for r in conn.execute(f'PRAGMA table_info("{table}")') if r[5]]
    if len(keys) == 1 and keys[0][2].upper() == "INTEGER":
        return keys[0][1]
    return None


def _count_lost(read: _TableRead, indexed: set[int], referenced: set) -> int:
    """Rows known to have existed that were not read (see the note above)."""
    known = indexed | referenced
    if not known and read.top_known:
        # Nothing lists this table's rows (no index, no foreign key to it): a failed lookup
        # below the known top counts as a row (a gap among them is counted too).
        known = read.failed
    return len(known - set(read.rowids))


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
