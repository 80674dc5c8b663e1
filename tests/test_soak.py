"""Soak: `clipdex index` SIGKILLed at random moments, 20 times, then run to the end.

After every kill the library opens (stamps verified), holds each image at most once, agrees
with itself, and still holds everything the earlier runs had committed; the next run takes
the lock (flock dies with its holder) and carries on. Half of the kills wait for an index
write to be in flight (a temporary file present: the manifest being replaced), to hit
checkpoints mid-write.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from indexer.store.library import index_problem
from tests.clirun import check_library, cli_env, clipdex, make_photos, warm_model

N_IMAGES = 120  # more than 20 short runs get through, so every kill lands mid-work
KILLS = 20
SEED = 20240611


@pytest.mark.slow
def test_sigkill_soak(tmp_path, spread_checkpoint):
    expected = make_photos(tmp_path / "photos", N_IMAGES)
    library = tmp_path / "lib"
    args = _index_args(tmp_path / "photos", library, spread_checkpoint)
    warm_model(spread_checkpoint)
    rng = random.Random(SEED)
    kept: set[str] = set()
    mid_write = 0
    started = time.monotonic()
    for kill in range(KILLS):
        process = subprocess.Popen(
            args, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        delay = rng.uniform(0.5, 4.0)
        in_write = _wait_then_kill(process, library, delay, at_write=kill % 2 == 1)
        mid_write += in_write
        paths = set(check_library(library))
        assert paths <= expected
        assert kept <= paths, f"kill {kill} lost {sorted(kept - paths)[:3]}"
        kept = paths
    soak_seconds = time.monotonic() - started
    done = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["indexed"] + report["unchanged"] + report["reused"] == N_IMAGES
    assert set(check_library(library)) == expected
    leftovers = sorted(p.name for p in library.iterdir() if p.name.endswith(".tmp"))
    assert not leftovers, leftovers  # no temporary files: the last checkpoint cleared them
    assert index_problem(library) is None  # every byte of base, delta and tombstones checks

    print(
        f"\nsoak: {KILLS} kills in {soak_seconds:.0f}s ({mid_write} during an index write), "
        f"{len(kept)}/{N_IMAGES} images before the last run"
    )


def _index_args(photos: Path, library: Path, weights: Path) -> list[str]:
    return clipdex(
        "index",
        str(photos),
        "--library",
        str(library),
        "--weights",
        str(weights),
        "--batch-size",
        "2",
        "--checkpoint-every",
        "2",
        "--workers",
        "1",
        "--json",
    )


def _wait_then_kill(process: subprocess.Popen, library: Path, delay: float, at_write: bool) -> bool:
    """SIGKILL after ``delay`` s (or, with ``at_write``, as soon as an index write is in
    flight); then make sure its decode workers go too. True if a write was in flight."""
    stale = _temporary_files(library)  # left by an earlier kill, until a checkpoint clears them
    started = time.monotonic()  # the delay counts once the library exists: a busy machine
    while not (library / "catalog.sqlite").exists() and process.poll() is None:
        assert time.monotonic() - started < 300, "clipdex index never created the library"
        time.sleep(0.02)  # can take longer than the delay just to start the CLI
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline and process.poll() is None:
        if at_write and _temporary_files(library) - stale:
            break
        time.sleep(0.001 if at_write else 0.02)
    assert process.poll() is None or process.returncode == 0, process.stderr.read().decode()
    in_write = bool(_temporary_files(library) - stale)
    children = _children(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    process.stderr.close()
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"decode workers outlived their killed parent: {alive}"
    return in_write


def _temporary_files(library: Path) -> set[str]:
    try:
        return {p.name for p in library.iterdir() if p.name.endswith(".tmp")}
    except FileNotFoundError:
        return set()


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
