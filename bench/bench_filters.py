"""What a metadata filter costs before the vector search: its allowed ids, as the filter SQL
computed them before schema 10 (the capture time as a julianday() over every row, ids by
ORDER BY id) beside ``allowed_ids`` now (ranges of the capture index, ids sorted in numpy,
``--kind photo`` without videos: no filter), same run, medians of ``--rounds``.

Each library is opened read-only (it is not changed: a library from before schema 10 lacks
the capture index until a writable open builds it, and then shows the scan cost here too).
Read the library files into the page cache first (``cat DIR/* > /dev/null``) for figures
that compare SQL, not the disk.

Example: ``python bench/bench_filters.py /work/bench-libs2/library_10000 LIB_1M``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.store.catalog_reader import CatalogReader
from indexer.store.library import Library
from retrieval.search.filters import ImageFilter, allowed_ids

# The capture time as the filter SQL wrote it before schema 10.
_JULIAN = (
    "coalesce(julianday(images.taken_at), "
    "julianday(images.mtime_ns / 1000000000.0, 'unixepoch', 'localtime'))"
)
CASES = [
    (
        "--after 2015",
        ImageFilter(after=dt.datetime(2015, 1, 1)),
        f"{_JULIAN} >= julianday(?)",
        ["2015-01-01"],
    ),
    (
        "--after 2014 --before 2015",
        ImageFilter(after=dt.datetime(2014, 1, 1), before=dt.datetime(2015, 1, 1)),
        f"{_JULIAN} >= julianday(?) AND {_JULIAN} < julianday(?)",
        ["2014-01-01", "2015-01-01"],
    ),
    ("--kind photo", ImageFilter(kind="photo"), "images.kind = ?", ["photo"]),
]


def median_ms(call, rounds: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(rounds):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("libraries", nargs="+", type=Path, help="library folders")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for root in args.libraries:
        reader = CatalogReader(Library.catalog_path(root))
        print(f"\n{root} ({reader.count():,} photos)")
        for name, spec, where, params in CASES:
            sql = f"SELECT id FROM images WHERE {where} ORDER BY id"
            before, rows = median_ms(
                lambda sql=sql, params=params, reader=reader: reader._rows(sql, params), args.rounds
            )
            now, ids = median_ms(
                lambda spec=spec, reader=reader: allowed_ids(reader, spec), args.rounds
            )
            kept = "all (no filter)" if ids is None else f"{len(ids):,}"
            print(
                f"  {name:28} before {before:9.1f} ms ({len(rows):,} ids)   now {now:7.1f} ms "
                f"({kept})   {before / max(now, 1e-3):,.0f}x"
            )
        reader.close()


if __name__ == "__main__":
    main()
