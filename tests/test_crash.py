"""A `clipdex index` killed with SIGKILL mid-run resumes without duplicates or losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.store.library import Library
from tests.clirun import generation, warm_model

N_IMAGES = 36


def _make_photos(folder: Path) -> set[str]:
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i in range(N_IMAGES):
        pixels = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
    return {str(folder / f"img_{i:03d}.png") for i in range(N_IMAGES)}


def _clipdex(*args: str) -> list[str]:
    return [sys.executable, "-m", "retrieval.cli", *args]


def _generation(library: Path) -> int:
    return generation(library)


def _assert_consistent(library: Path, expected: set[str] | None = None) -> int:
    with Library.open(library) as lib:
        ids = lib.catalog.ids()
        assert sorted(lib.index.ids()) == sorted(ids)
        rows = lib.catalog.get_images(ids)
        paths = [row["path"] for row in rows.values()]
        assert len(paths) == len(set(paths)), "an image is catalogued twice"
        if expected is not None:
            assert set(paths) == expected
        return len(paths)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tmp_path, spread_checkpoint):
    photos = _make_photos(tmp_path / "photos")
    library = tmp_path / "lib"
    args = _clipdex(
        "index",
        str(tmp_path / "photos"),
        "--library",
        str(library),
        "--weights",
        str(spread_checkpoint),
        "--batch-size",
        "4",
        "--checkpoint-every",
        "4",
        "--json",
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    warm_model(spread_checkpoint)  # the one-time export is not what a kill should land in
    for wanted_generation in (2, 5):
        process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 240
        while _generation(library) < wanted_generation and process.poll() is None:
            assert time.monotonic() < deadline, "indexer made no progress"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        partial = _assert_consistent(library)
        assert partial < N_IMAGES
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["indexed"] + report["unchanged"] + report["reused"] == N_IMAGES
    assert _assert_consistent(library, photos) == N_IMAGES
