"""Bytes per photo on disk: a whole library (catalog + index + everything in its folder).

Builds libraries of synthetic photos through clipdex's own catalog bulk insert
(``Catalog.commit_batch``: each row's metadata, its 512-d float32 vector, name and folder
words with their full-text index) and index (``Library.compact`` as ``exact`` and ``ivf``),
and prints bytes per photo: in all, in the catalog (by table and index, from SQLite's
``dbstat``), in the index files. Photos carry what a camera photo has (date, camera, GPS,
a dated folder), no caption or OCR text.

``--layouts`` measures, on raw SQLite files of the same rows, how the vector is best laid
out: one table at 4 to 64 KiB pages, the vector in a table of its own (rowid or WITHOUT
ROWID). ``--from-library DIR`` measures an existing library as it is and as it would be with
the catalog's new page size (a ``VACUUM INTO`` copy; the library is only read).

Other benches call :func:`library_bytes` for their own libraries.

Usage: ``python bench/bench_bytes.py --sizes 100000 [--layouts] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TARGET = 3000  # issue 10: bytes per photo on disk at 1M, at most
CATALOG_FILES = ("catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm")
INDEX_PREFIXES = ("vectors.", "delta.", "segments.json")


def library_bytes(root: Path) -> dict:
    """Bytes on disk of the library folder ``root``: in all, catalog (database + WAL),
    index files, the rest (label vectors, lock), and per photo (catalog rows)."""
    root = Path(root)
    files = [p for p in root.rglob("*") if p.is_file()]
    catalog = sum(p.stat().st_size for p in files if p.name in CATALOG_FILES)
    index = sum(p.stat().st_size for p in files if p.name.startswith(INDEX_PREFIXES))
    total = sum(p.stat().st_size for p in files)
    photos = _photo_count(root / "catalog.sqlite")
    per = max(1, photos)
    return {
        "photos": photos,
        "bytes": total,
        "catalog_bytes": catalog,
        "index_bytes": index,
        "other_bytes": total - catalog - index,
        "bytes_per_photo": total / per,
        "catalog_per_photo": catalog / per,
        "index_per_photo": index / per,
        "page_size": _pragma(root / "catalog.sqlite", "page_size"),
    }


def catalog_by_table(path: Path) -> dict[str, int]:
    """Bytes of each table and index of a SQLite file (SQLite's dbstat: pages x page size,
    the unused space in them included), largest first."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"
        ).fetchall()
    finally:
        conn.close()
    return {name: int(size) for name, size in rows}


def _photo_count(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM images").fetchone()[0]
    finally:
        conn.close()


def _pragma(path: Path, name: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(f"PRAGMA {name}").fetchone()[0]
    finally:
        conn.close()


# -- libraries built through clipdex ----------------------------------------------------------
def _plain_records(vectors: np.ndarray, start: int) -> list:
    """Rows as bench/bench_library_scale.py builds them: path, size, hash, pixel size."""
    from indexer.store.catalog import ImageRecord

    return [
        ImageRecord(
            f"/photos/{i // 1000:04d}/img_{i:07d}.jpg", 2_000_000, 1, f"{i:064x}", v, 4032, 3024,
            "JPEG",
        )
        for i, v in enumerate(vectors, start)
    ]


def _records(vectors: np.ndarray, start: int) -> list:
    """Photos as a camera makes them, in dated folders of 500."""
    from indexer.store.catalog import ImageRecord

    base = dt.datetime(2012, 1, 1)
    records = []
    for i, vector in enumerate(vectors, start):
        taken = base + dt.timedelta(minutes=7 * i)
        folder = f"/home/user/Pictures/{taken:%Y}/{taken:%Y-%m} roll {i // 500:05d}"
        records.append(
            ImageRecord(
                f"{folder}/IMG_{i % 10000:04d}.JPG",
                3_000_000 + i % 997_000,
                1_600_000_000_000_000_000 + i,
                f"{i:064x}",
                vector,
                6000,
                4000,
                "JPEG",
                taken_at=taken,
                camera_make="Canon",
                camera_model="Canon EOS 5D Mark IV",
                gps_lat=48.8 + (i % 1000) / 1e4,
                gps_lon=2.3 + (i % 777) / 1e4,
                device=2049,
                inode=1_000_000 + i,
                real_path=f"{folder}/IMG_{i % 10000:04d}.JPG",
            )
        )
    return records


def build(root: Path, size: int, plain: bool = False) -> float:
    """A library of ``size`` synthetic photos (catalog only); returns the seconds it took."""
    from indexer.model.identity import ModelIdentity
    from indexer.store.library import Library
    from tests.clipvectors import ClipLike

    started = time.monotonic()
    synthetic = ClipLike(size, seed=7)
    with Library.open(root, create=True) as library:
        library.acquire_lock()
        library.bind_model(ModelIdentity(weights="bench"))
        for start in range(0, size, 20_000):
            vectors = synthetic.vectors(start, min(size, start + 20_000))
            make = _plain_records if plain else _records
            library.catalog.commit_batch(make(vectors, start))
    return time.monotonic() - started


def index_as(root: Path, kind: str) -> float:
    """Build the library's index as ``kind`` from its catalog; returns the seconds."""
    from indexer.store.library import Library

    started = time.monotonic()
    with Library.open(root) as library:
        library.acquire_lock()
        library.compact(kind)
    return time.monotonic() - started


def _written() -> int:
    """Bytes this process has had written to storage so far (Linux /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes"):
            return int(line.split()[1])
    return 0


def checkpoint_bytes(root: Path, size: int, plain: bool) -> int:
    """Bytes written to add 64 photos in one commit and checkpoint (catalog WAL, the WAL's
    copy into the database, the index's delta): larger pages write more per changed row."""
    import os

    from indexer.store.library import Library
    from tests.clipvectors import ClipLike

    vectors = ClipLike(64, seed=11).vectors()
    make = _plain_records if plain else _records
    records = make(vectors, size + 10_000_000)
    with Library.open(root) as library:
        library.acquire_lock()
        len(library.index)  # read before measuring
        os.sync()
        before = _written()
        ids = library.catalog.commit_batch(records)
        library.index.add(np.asarray(ids, np.int64), vectors)
        library.checkpoint()
        with library.catalog.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").all()
        os.sync()
        return _written() - before


def measure_size(size: int, kinds: list[str], work: Path, plain: bool = False) -> dict:
    root = work / f"library_{size}"
    shutil.rmtree(root, ignore_errors=True)
    out: dict = {"build_s": build(root, size, plain)}
    out["catalog_tables"] = catalog_by_table(root / "catalog.sqlite")
    for kind in kinds:
        seconds = index_as(root, kind)
        out[kind] = {**library_bytes(root), "index_s": seconds}
        print(_row(size, kind, out[kind]), flush=True)
    out["checkpoint_64_bytes"] = checkpoint_bytes(root, size, plain)
    print(f"{'':12}adding 64 photos wrote {out['checkpoint_64_bytes'] / 1e6:.2f} MB", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return out


def from_library(source: Path, work: Path, reindex: str | None = None) -> dict:
    """An existing library as it is, and with its catalog copied to the new page size
    (then, with ``reindex``, its index rebuilt as that kind by today's code)."""
    from indexer.store import catalog as catalog_module

    page_size = catalog_module.PAGE_SIZE  # as --page-size left it
    as_is = library_bytes(source)
    print(_row(as_is["photos"], f"as is ({as_is['page_size'] // 1024} KiB)", as_is), flush=True)
    copy = work / "repaged"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in CATALOG_FILES and path.name != "write.lock":
            shutil.copy2(path, copy / path.name)
    started = time.monotonic()
    conn = sqlite3.connect(f"file:{source / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        conn.execute(f"PRAGMA page_size={page_size}")
        conn.execute("VACUUM INTO ?", (str(copy / "catalog.sqlite"),))
    finally:
        conn.close()
    seconds = time.monotonic() - started
    repaged = {**library_bytes(copy), "vacuum_s": seconds}
    label = f"{page_size // 1024} KiB pages"
    print(_row(repaged["photos"], label, repaged) + f"  (VACUUM {seconds:.0f}s)", flush=True)
    tables = catalog_by_table(copy / "catalog.sqlite")
    out = {"as_is": as_is, "repaged": repaged, "catalog_tables": tables}
    if reindex:
        seconds = index_as(copy, reindex)
        out["reindexed"] = {**library_bytes(copy), "index_s": seconds}
        print(_row(repaged["photos"], f"{label}, {reindex}", out["reindexed"]), flush=True)
    shutil.rmtree(copy, ignore_errors=True)
    return out


# -- vector layouts in raw SQLite ---------------------------------------------------------------
LAYOUTS = {
    "one table": [
        "CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT, meta BLOB, vector BLOB)",
    ],
    "vector table": [
        "CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT, meta BLOB)",
        "CREATE TABLE vectors (id INTEGER PRIMARY KEY, vector BLOB)",
    ],
    "vector table WITHOUT ROWID": [
        "CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT, meta BLOB)",
        "CREATE TABLE vectors (id INTEGER PRIMARY KEY, vector BLOB) WITHOUT ROWID",
    ],
}


def layout_bytes(layout: str, page_size: int, rows: int, folder: Path) -> float:
    """Bytes per row of ``rows`` photo rows (~250 bytes of metadata + a 2,048-byte vector)."""
    path = folder / f"{layout.replace(' ', '_')}_{page_size}.sqlite"
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA page_size={page_size}")
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in LAYOUTS[layout]:
        conn.execute(statement)
    rng = np.random.default_rng(0)
    split = "vectors" in " ".join(LAYOUTS[layout])
    for start in range(0, rows, 5000):
        ids = range(start + 1, min(rows, start + 5000) + 1)
        vectors = rng.standard_normal((len(ids), 512)).astype("<f4")
        meta = [(i, f"/home/user/Pictures/2019/roll {i // 500:05d}/IMG_{i:04d}.JPG") for i in ids]
        blob = bytes(200)
        if split:
            conn.executemany("INSERT INTO images VALUES (?, ?, ?)", [(*m, blob) for m in meta])
            pairs = [(i, v.tobytes()) for i, v in zip(ids, vectors)]
            conn.executemany("INSERT INTO vectors VALUES (?, ?)", pairs)
        else:
            conn.executemany(
                "INSERT INTO images VALUES (?, ?, ?, ?)",
                [(*m, blob, v.tobytes()) for m, v in zip(meta, vectors)],
            )
        conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    size = path.stat().st_size
    path.unlink()
    return size / rows


def layouts(rows: int, folder: Path) -> dict:
    out: dict = {}
    print(f"\nvector layouts, {rows:,} rows of ~2.3 KB (bytes per row; one row = 2,048 + ~250)")
    sizes = (4096, 8192, 16384, 32768, 65536)
    print(f"{'layout':30}" + "".join(f"{s // 1024:>8} KiB" for s in sizes))
    for layout in LAYOUTS:
        out[layout] = {size: layout_bytes(layout, size, rows, folder) for size in sizes}
        print(f"{layout:30}" + "".join(f"{out[layout][s]:>12,.0f}" for s in sizes), flush=True)
    return out


def _row(size: int, kind: str, figures: dict) -> str:
    verdict = "ok" if figures["bytes_per_photo"] <= TARGET else "over"
    return (
        f"{size:>10,}  {kind:18}{figures['bytes_per_photo']:>10,.0f}"
        f"{figures['catalog_per_photo']:>10,.0f}{figures['index_per_photo']:>10,.0f}"
        f"{(figures['other_bytes'] / max(1, figures['photos'])):>8,.0f}   {verdict}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000", help="comma-separated library sizes")
    parser.add_argument("--kinds", default="exact,ivf")
    parser.add_argument("--layouts", action="store_true", help="also compare vector layouts")
    parser.add_argument("--layout-rows", type=int, default=20_000)
    parser.add_argument("--from-library", type=Path, help="measure this library (read only)")
    parser.add_argument(
        "--reindex", help="with --from-library: rebuild the copy's index as this kind"
    )
    parser.add_argument("--work", type=Path, help="build here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--plain", action="store_true", help="rows as bench_library_scale.py makes them"
    )
    parser.add_argument("--page-size", type=int, help="build catalogs with this page size")
    args = parser.parse_args(argv)
    from indexer.store import catalog as catalog_module

    if args.page_size:
        catalog_module.PAGE_SIZE = args.page_size
    PAGE_SIZE = catalog_module.PAGE_SIZE

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-bytes-"))
    work.mkdir(parents=True, exist_ok=True)
    figures: dict = {"page_size": PAGE_SIZE, "target": TARGET, "sizes": {}}
    print(f"bytes per photo on disk (target <= {TARGET:,}); new catalogs: {PAGE_SIZE} B pages")
    print(f"{'photos':>10}  {'index':18}{'total':>10}{'catalog':>10}{'index':>10}{'other':>8}")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
        for size in sizes:
            kinds = [k for k in args.kinds.split(",") if k]
            figures["sizes"][str(size)] = measure_size(size, kinds, work, args.plain)
        if args.from_library:
            figures["from_library"] = from_library(args.from_library, work, args.reindex)
        largest = figures["sizes"].get(str(max(sizes))) if sizes else None
        if largest:
            print(f"\ncatalog of {max(sizes):,} photos by table and index (bytes per photo):")
            n = max(sizes)
            for name, size in list(largest["catalog_tables"].items())[:8]:
                print(f"  {name:34}{size / n:>10,.0f}")
        if args.layouts:
            figures["layouts"] = layouts(args.layout_rows, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
