"""Object storage (s3://) against the same files on disk, in one run.

The same photos are indexed from a folder and from a bucket on a local S3-compatible server
(moto's, started here on 127.0.0.1: ``pip install 'moto[server]'``), into two fresh
libraries, in alternating rounds:

- ``first run``: list, read, hash, decode and encode every photo;
- ``no-op run``: the second run of the same source (nothing changed: a listing, or a walk,
  and a catalog lookup per file).

The model is a stand-in (the tests' deterministic FakeEncoder: a fixed projection of
pooled pixels) and OCR is off, so the figures are the cost of the *reading* path, which is
what differs;
with MobileCLIP-S2 on a CPU the encoder dominates both. moto is a Python server on the
same machine: a local MinIO or S3 in the same region answers faster, a far region slower.
Timings are same-run ratios (the machine is shared); hold the bench lock when it runs long.

Usage: ``python bench/bench_objectstore.py [--photos 64] [--rounds 2] [--workers 2]
[--corpus DIR] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.ingest.pipeline import IndexOptions, index_paths  # noqa: E402
from indexer.store.library import Library  # noqa: E402
from tests.conftest import FakeEncoder, corpus_dir  # noqa: E402
from tests.s3server import s3_server  # noqa: E402


def pick_photos(corpus: Path, count: int, target: Path) -> Path:
    """``count`` JPEG and PNG photos of the corpus (under 2 MB), copied into ``target``."""
    found = sorted(
        p
        for p in (corpus / "photos").rglob("*")
        if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.stat().st_size < 2_000_000
    )[:count]
    target.mkdir(parents=True)
    for i, path in enumerate(found):
        shutil.copy(path, target / f"{i:04d}_{path.name}")
    return target


def timed_runs(source: str, library: Path, options: IndexOptions) -> tuple[float, float, int]:
    """(first run seconds, no-op run seconds, files indexed or failed) into a fresh
    library; both sources must give the same counts."""
    encoder = FakeEncoder()
    with Library.open(library, create=True) as lib:
        started = time.perf_counter()
        report = index_paths(lib, encoder, [source], options)
        first = time.perf_counter() - started
        started = time.perf_counter()
        again = index_paths(lib, encoder, [source], options)
        noop = time.perf_counter() - started
    assert again.indexed == 0, "the second run encoded something"
    print(f"  {source}: indexed {report.indexed}, copies {report.reused}, {first:.2f} s")
    return first, noop, report.indexed + report.reused + report.failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--corpus", type=Path, default=corpus_dir())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.corpus is None:
        parser.error("no image corpus: pass --corpus DIR (shared/imgcorpus)")
    options = IndexOptions(workers=args.workers, ocr="never")  # the reading path, not OCR
    results: dict[str, dict[str, list[float]]] = {
        "disk": {"first": [], "noop": []},
        "s3": {"first": [], "noop": []},
    }
    with tempfile.TemporaryDirectory() as tmp, s3_server() as s3:
        folder = pick_photos(args.corpus, args.photos, Path(tmp) / "photos")
        os.environ.update(s3.environ())
        s3.client.create_bucket(Bucket="bench")
        s3.upload(folder, "bench", "photos")
        sources = {"disk": str(folder), "s3": "s3://bench/photos"}
        count = 0
        for round_ in range(args.rounds):
            for name in ("disk", "s3") if round_ % 2 == 0 else ("s3", "disk"):
                library = Path(tmp) / f"lib-{name}-{round_}"
                first, noop, count = timed_runs(sources[name], library, options)
                results[name]["first"].append(first)
                results[name]["noop"].append(noop)
    median = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    print(f"{count} files, {args.workers} decode workers, {args.rounds} rounds (medians)")
    print(f"{'':10} {'disk':>9} {'s3 (moto)':>10} {'s3/disk':>8}")
    for kind, label in (("first", "first run"), ("noop", "no-op run")):
        disk, s3_time = median["disk"][kind], median["s3"][kind]
        print(f"{label:10} {disk:8.2f}s {s3_time:9.2f}s {s3_time / disk:7.2f}x")
    rate = {n: count / median[n]["first"] for n in median}
    print(f"first-run rate: disk {rate['disk']:.1f} files/s, s3 {rate['s3']:.1f} files/s")
    if args.json:
        args.json.write_text(json.dumps({"photos": count, "runs": results, "median": median}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
