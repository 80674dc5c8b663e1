"""Decode worker processes: bounds, back-pressure, and files that hang, crash or hog memory.

A hostile decoder (selected by file name) stands in for files that make a real decoder hang
or crash; the workers run it exactly where they would run Pillow.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.ingest.discover import FoundFile
from indexer.ingest.pipeline import IndexOptions, index_paths
from indexer.ingest.workers import DecodeLimits, DecodePool, decode_file
from indexer.store.library import Library

HOSTILE = "tests.test_workers:hostile_decode"


def hostile_decode(data: bytes, path: str, max_megapixels: float):
    """Hang, crash or hog memory on files named so; decode the rest normally."""
    name = Path(path).name
    if name.startswith("hang"):
        time.sleep(600)
    if name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("hog"):
        hoard = bytearray(4 << 30)  # 4 GiB: over any per-file limit used here
        hoard[::4096] = b"x" * len(hoard[::4096])
    if name.startswith("slow"):
        time.sleep(0.1)
    return decode_file(data, path, max_megapixels)


def found(path: Path) -> FoundFile:
    stat = path.stat()
    return FoundFile(str(path), stat.st_size, stat.st_mtime_ns)


@pytest.fixture
def small_photos(tmp_path) -> list[Path]:
    folder = tmp_path / "small"
    folder.mkdir()
    rng = np.random.default_rng(3)
    paths = []
    for i in range(12):
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def copy_as(source: Path, name: str) -> Path:
    target = source.with_name(name)
    # distinct bytes (so no hash reuse) but a valid image: append a PNG-ignorable trailer
    target.write_bytes(source.read_bytes() + name.encode())
    return target


def outcomes_by_name(pool: DecodePool, paths: list[Path]) -> dict:
    return {Path(o.found.path).name: o for o in pool.map(found(p) for p in paths)}


def test_hanging_and_crashing_files_cost_only_themselves(small_photos):
    hang = copy_as(small_photos[0], "hang.png")
    crash = copy_as(small_photos[1], "crash.png")
    pool = DecodePool(2, DecodeLimits(seconds=2.0), decoder=HOSTILE)
    started = time.monotonic()
    results = outcomes_by_name(pool, [hang, crash, *small_photos])
    assert time.monotonic() - started < 300  # not the hang's 600 s (normally ~3 s)
    assert "longer than 2 s to read and decode" in results["hang.png"].error
    assert "crashed" in results["crash.png"].error
    assert "SIGSEGV" in results["crash.png"].error
    good = [results[p.name] for p in small_photos]
    assert all(o.error is None and o.pixels.shape == (3, 256, 256) for o in good)
    assert pool.restarts == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is Linux-only")
def test_file_over_the_memory_limit_fails_alone(small_photos):
    hog = copy_as(small_photos[0], "hog.png")
    pool = DecodePool(1, DecodeLimits(memory_mb=512), decoder=HOSTILE)
    results = outcomes_by_name(pool, [hog, *small_photos[:3]])
    assert "per-file memory limit" in results["hog.png"].error
    assert all(results[p.name].error is None for p in small_photos[:3])


def test_back_pressure_bounds_files_in_flight(small_photos):
    files = [copy_as(small_photos[i % 12], f"slow_{i:02d}.png") for i in range(24)]
    pulled = 0

    def source():
        nonlocal pulled
        for path in files:
            pulled += 1
            yield found(path)

    pool = DecodePool(2, decoder=HOSTILE, capacity=4)
    consumed, ahead = 0, []
    for _ in pool.map(source()):
        consumed += 1
        ahead.append(pulled - consumed)
        time.sleep(0.2)  # a consumer slower than the workers
    assert consumed == 24
    assert pool.peak_outstanding <= 4
    assert max(ahead) <= 4


def test_known_content_is_never_decoded(small_photos):
    crash = copy_as(small_photos[0], "crash.png")
    known = hashlib.sha256(crash.read_bytes()).hexdigest()
    vector = np.ones(512, np.float32)
    lookup = {known: ({"width": 1, "height": 1}, vector)}.get
    pool = DecodePool(1, lookup=lookup, decoder=HOSTILE)
    results = outcomes_by_name(pool, [crash, small_photos[1]])
    reused = results["crash.png"]
    assert reused.error is None and reused.pixels is None and reused.sha256 == known
    assert (reused.vector == vector).all()
    assert pool.restarts == 0  # the crashing decoder never ran


def test_unreadable_and_vanished_files_have_reasons(small_photos, tmp_path):
    gone = FoundFile(str(tmp_path / "vanished.jpg"), 10, 1)
    pool = DecodePool(1)
    results = list(pool.map([gone, found(small_photos[0])]))
    reasons = {Path(o.found.path).name: o.error for o in results}
    assert reasons["vanished.jpg"] == "file not found"
    assert reasons[small_photos[0].name] is None


def test_a_worker_killed_from_outside_is_replaced(small_photos):
    # 24 files of 0.1 s each: the kill lands while files are left to hand out (the test
    # would need a 2 s stall between the first answer and the kill to miss them all).
    files = [copy_as(small_photos[i % 12], f"slow_{i:02d}.png") for i in range(24)]
    pool = DecodePool(1, decoder=HOSTILE)
    results = []
    for outcome in pool.map(found(p) for p in files):
        if not results:
            pool._workers[0].process.kill()  # as the OOM killer would
        results.append(outcome)
    assert len(results) == 24
    errors = [o.error for o in results if o.error]
    assert len(errors) <= 1 and all("crashed" in e for e in errors)
    assert pool.restarts == 1


def test_abandoning_the_results_stops_the_workers(small_photos):
    pool = DecodePool(2, decoder=HOSTILE)
    stream = pool.map(found(copy_as(p, f"slow_{p.name}")) for p in small_photos)
    next(stream)
    processes = [w.process for w in pool._workers]
    stream.close()
    assert all(p.poll() is not None for p in processes)


def test_pipeline_records_hostile_files_and_indexes_the_rest(tmp_path, photo_folder, fake_encoder):
    copy_as(photo_folder / "photo_0.jpg", "hang.jpg")
    copy_as(photo_folder / "photo_1.jpg", "crash.jpg")
    options = IndexOptions(workers=2, decode_seconds=2.0, decoder=HOSTILE)
    with Library.open(tmp_path / "lib", create=True) as library:
        report = index_paths(library, fake_encoder, [photo_folder], options)
        failures = {Path(r["path"]).name: r["error"] for r in library.catalog.list_failures()}
    assert (report.indexed, report.failed) == (6, 2)
    assert "per-file time limit" in failures["hang.jpg"]
    assert "crashed" in failures["crash.jpg"]
