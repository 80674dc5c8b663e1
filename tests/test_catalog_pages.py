"""The catalog's page size: new catalogs use 32 KiB pages (a ~2.3 KB row per 4 KiB page
wasted ~1.7 KB a photo); `clipdex optimize` rebuilds an older 4 KiB catalog with them,
keeping every row, only when it can do so safely, and a kill midway loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from indexer.model.identity import EMBED_DIM
from indexer.store import catalog as catalog_module
from indexer.store.catalog import PAGE_SIZE, Catalog, ImageRecord
from indexer.store.library import Library
from tests.clirun import cli_env, optimize
from tests.records import store

REPO = Path(__file__).resolve().parents[1]


def _records(count: int, start: int = 0, seed: int = 0) -> list[ImageRecord]:
    rng = np.random.default_rng(seed + start)
    vectors = rng.standard_normal((count, EMBED_DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [
        ImageRecord(f"/photos/{i // 100}/p{i:05d}.jpg", 1, 1, f"{i:064x}", v, 64, 48, "JPEG")
        for i, v in enumerate(vectors, start)
    ]


def _old_catalog(path: Path, rows: int, monkeypatch) -> None:
    """A catalog made as before 32 KiB pages: SQLite's default 4 KiB."""
    with monkeypatch.context() as patch:
        patch.setattr(catalog_module, "PAGE_SIZE", 4096)
        catalog = Catalog(path)
    for start in range(0, rows, 2000):
        catalog.commit_batch(_records(min(2000, rows - start), start))
    catalog.close()


def _pragma(path: Path, name: str):
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


def _content(path: Path) -> str:
    """A digest of every row of every table the catalog keeps (FTS shadow tables too)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    digest = hashlib.sha256()
    try:
        names = conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "AND sql NOT LIKE 'CREATE VIRTUAL%' ORDER BY name"
        ).fetchall()
        for (name,) in names:
            rows = sorted(repr(row) for row in conn.execute(f'SELECT * FROM "{name}"'))
            digest.update(repr((name, rows)).encode())
    finally:
        conn.close()
    return digest.hexdigest()


def test_a_new_catalog_has_large_pages_and_wal(tmp_path):
    path = tmp_path / "catalog.sqlite"
    Catalog(path).close()
    assert _pragma(path, "page_size") == PAGE_SIZE == 32768
    assert _pragma(path, "journal_mode") == "wal"


def test_an_old_catalog_is_rebuilt_with_large_pages_keeping_every_row(tmp_path, monkeypatch):
    path = tmp_path / "catalog.sqlite"
    _old_catalog(path, 3000, monkeypatch)
    before = _content(path)
    catalog = Catalog(path)  # opening it does not change its pages
    assert catalog.page_size() == 4096
    result = catalog.repage()
    assert result.done and result.page_size == PAGE_SIZE and result.reason is None
    assert result.bytes_after < result.bytes_before * 0.75  # ~4.5 KB -> ~3 KB a row
    assert catalog.count() == 3000 and catalog.integrity_check() == "ok"
    again = catalog.repage()  # nothing left to do
    assert not again.done and again.reason is None
    catalog.close()
    assert _content(path) == before
    assert _pragma(path, "journal_mode") == "wal"


def test_an_old_catalog_open_elsewhere_is_left_as_is(tmp_path, monkeypatch):
    path = tmp_path / "catalog.sqlite"
    _old_catalog(path, 50, monkeypatch)
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
            "c.execute('SELECT count(*) FROM images').fetchone(); print('open', flush=True); "
            "sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout.readline().strip() == "open"
        catalog = Catalog(path)
        result = catalog.repage()
        assert not result.done and "another process" in result.reason
        assert catalog.count() == 50  # still usable, in WAL mode
        catalog.close()
    finally:
        reader.communicate("", timeout=30)
    assert _pragma(path, "page_size") == 4096 and _pragma(path, "journal_mode") == "wal"


def test_an_old_catalog_without_room_for_the_copy_is_left_as_is(tmp_path, monkeypatch):
    path = tmp_path / "catalog.sqlite"
    _old_catalog(path, 50, monkeypatch)
    real = os.statvfs

    class Full:
        def __init__(self, stat):
            self.f_frsize, self.f_bavail = stat.f_frsize, 10

    monkeypatch.setattr(catalog_module.os, "statvfs", lambda folder: Full(real(folder)))
    catalog = Catalog(path)
    result = catalog.repage()
    catalog.close()
    assert not result.done and "not enough free space" in result.reason
    assert "MB needed" in result.reason and _pragma(path, "page_size") == 4096


KILLED_REPAGE = """
import sys
from pathlib import Path
from indexer.store.catalog import Catalog
catalog = Catalog(Path(sys.argv[1]))
print("go", flush=True)
catalog.repage()
print("done", flush=True)
"""


def _repage_in_child(path: Path, kill_after: float | None) -> float:
    """Run repage in a fresh process, SIGKILLed ``kill_after`` s after it starts; returns
    the seconds it ran."""
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_REPAGE, str(path)],
        cwd=REPO,
        env={**cli_env(), "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "go"
    started = time.monotonic()
    if kill_after is None:
        child.communicate(timeout=300)
        assert child.returncode == 0
    else:
        time.sleep(kill_after)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    return time.monotonic() - started


def test_a_kill_during_the_rebuild_loses_nothing(tmp_path, monkeypatch):
    """SIGKILL at several points of the VACUUM: SQLite's journal rolls it back on the next
    open, so the catalog is whole, in its old or its new page size, never between."""
    original = tmp_path / "original.sqlite"
    _old_catalog(original, 4000, monkeypatch)
    digest = _content(original)
    timing = tmp_path / "timing.sqlite"
    timing.write_bytes(original.read_bytes())
    full = _repage_in_child(timing, None)  # how long a whole rebuild takes here
    midway = 0
    for share in (0.2, 0.45, 0.7):
        path = tmp_path / f"killed-{share}.sqlite"
        path.write_bytes(original.read_bytes())
        _repage_in_child(path, full * share)
        midway += Path(f"{path}-journal").exists()  # killed inside the VACUUM
        catalog = Catalog(path)  # the next open: rolls back a hot journal
        assert catalog.integrity_check() == "ok" and catalog.count() == 4000
        assert catalog.page_size() in (4096, PAGE_SIZE)
        catalog.close()
        assert _content(path) == digest
    assert midway, "no kill landed inside the rebuild: the test showed nothing"


def test_optimize_rebuilds_an_old_catalog_once(tmp_path, monkeypatch):
    root = tmp_path / "lib"
    with monkeypatch.context() as patch:
        patch.setattr(catalog_module, "PAGE_SIZE", 4096)
        with Library.open(root, create=True) as library:
            store(library, _records(1000))

    first = json.loads(optimize(root))["catalog"]
    assert first["rebuilt"] and first["page_size"] == PAGE_SIZE
    assert first["bytes_after"] < first["bytes_before"]
    second = json.loads(optimize(root))["catalog"]
    assert not second["rebuilt"] and second["not_rebuilt_because"] is None
    with Library.open(root) as library:
        assert library.catalog.count() == 1000 and len(library.index) == 1000


def test_the_wal_file_is_cut_back_after_a_checkpoint(tmp_path):
    """A long-running writer (a server) does not keep a WAL file at its largest size."""
    path = tmp_path / "catalog.sqlite"
    catalog = Catalog(path)
    for start in range(0, 6000, 2000):
        catalog.commit_batch(_records(2000, start))
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > catalog_module.WAL_SIZE_LIMIT  # ~14 MB of new pages
    with catalog.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").all()
    catalog.set_meta("after", "1")  # the next write starts the WAL over
    assert wal.stat().st_size <= catalog_module.WAL_SIZE_LIMIT
    assert catalog.count() == 6000
    catalog.close()
