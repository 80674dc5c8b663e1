"""A phone import into a watched folder: batches, lag, and the cost against the alternatives.

``--files`` small JPEGs (default 2,000) are copied into a folder that a sync follows
(:meth:`retrieval.Collection.syncer`, real file-system events, the default 2 s debounce and
settle unless told otherwise), at ``--rate`` files per second (default: as fast as the disk
takes them). Measured in the same run, on the same files:

- *watch*: how many batches the import became, the seconds from the last file written to
  the last one indexed (the lag a user sees), and files per second over the whole import;
- *index once*: one ``index`` run over the finished folder (what the sync cannot beat);
- *one run per event*: a watcher without debouncing: one ``index`` run per new file, on the
  first ``--per-event`` files (default 100), as files per second.

The model is not what is measured: a fast deterministic stand-in encoder
(tests/conftest.FakeEncoder) takes its place, so the figures are the sync's and the
pipeline's own costs. The machine is shared: read the same-run ratios.

Usage: ``python bench/bench_watch.py [--files 2000] [--rate 0] [--per-event 100]
[--debounce 2] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_sources(folder: Path, count: int) -> list[Path]:
    """``count`` distinct small JPEGs to copy from (made once, untimed)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        path = folder / f"IMG_{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=85)
        paths.append(path)
    return paths


def watch_import(sources: list[Path], work: Path, args) -> dict:
    from indexer.ingest.pipeline import IndexOptions
    from indexer.ingest.sync import SyncOptions
    from retrieval import Collection
    from tests.conftest import FakeEncoder

    folder = work / "watched"
    folder.mkdir()
    options = SyncOptions(
        quiet_seconds=args.debounce, settle_seconds=args.debounce, tick_seconds=0.1
    )
    stop = threading.Event()
    with Collection(work / "lib-watch", FakeEncoder()) as photos:
        syncer = photos.syncer([folder], IndexOptions(), options)
        thread = threading.Thread(target=syncer.run, args=(stop,), daemon=True)
        thread.start()
        while syncer.status()["batches"] < 1:  # the (empty) catch-up
            time.sleep(0.05)
        started = time.monotonic()
        for source in sources:
            shutil.copy(source, folder / source.name)
            if args.rate:
                time.sleep(1.0 / args.rate)
        written = time.monotonic()
        while syncer.status()["indexed"] + syncer.status()["reused"] < len(sources):
            time.sleep(0.05)
        done = time.monotonic()
        stop.set()
        thread.join()
        status = syncer.status()
    return {
        "batches": status["batches"] - 1,
        "lag_s": done - written,
        "seconds": done - started,
        "files_per_s": len(sources) / (done - started),
    }


def index_once(sources: list[Path], work: Path) -> float:
    from indexer.ingest.pipeline import index_paths
    from indexer.store.library import Library
    from tests.conftest import FakeEncoder

    folder = work / "once"
    shutil.copytree(sources[0].parent, folder)
    with Library.open(work / "lib-once", create=True) as library:
        started = time.monotonic()
        index_paths(library, FakeEncoder(), [folder])
        return len(sources) / (time.monotonic() - started)


def one_run_per_event(sources: list[Path], work: Path, count: int) -> float:
    from indexer.ingest.pipeline import index_paths
    from indexer.store.library import Library
    from tests.conftest import FakeEncoder

    folder = work / "per-event"
    folder.mkdir()
    encoder = FakeEncoder()
    with Library.open(work / "lib-per-event", create=True) as library:
        started = time.monotonic()
        for source in sources[:count]:
            shutil.copy(source, folder / source.name)
            index_paths(library, encoder, [folder])  # what a watcher without batching does
        return count / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=0.0, help="files/s written (0: no wait)")
    parser.add_argument("--per-event", type=int, default=100)
    parser.add_argument("--debounce", type=float, default=2.0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="clipdex-bench-watch-"))
    sources = make_sources(work / "sources", args.files)
    watched = watch_import(sources, work, args)
    once = index_once(sources, work)
    per_event = one_run_per_event(sources, work, min(args.per_event, args.files))
    print(
        f"files: {args.files}, written at {args.rate or 'full'} files/s, "
        f"debounce/settle {args.debounce:g} s"
    )
    print(
        f"watch:            {watched['batches']} batches, {watched['files_per_s']:.1f} files/s "
        f"over the import, last file indexed {watched['lag_s']:.1f} s after it was written"
    )
    print(f"index once:       {once:.1f} files/s")
    print(f"one run per file: {per_event:.1f} files/s (first {min(args.per_event, args.files)})")
    print(
        f"ratios (same run): watch / index once = {watched['files_per_s'] / once:.2f}; "
        f"watch / one run per file = {watched['files_per_s'] / per_event:.1f}x"
    )


if __name__ == "__main__":
    main()
