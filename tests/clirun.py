"""Driving the real `clipdex` CLI as subprocesses, for the soak and concurrency tests.

The processes run the product's own entry point (``python -m retrieval.cli``) with the
random-weights MobileCLIP-S2 checkpoint: real loading, real ONNX export (once per session,
shared through ``CLIPDEX_CACHE``), real decode workers, real files, real signals.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.store.library import Library
from indexer.store.segments import read_manifest

REPO = Path(__file__).resolve().parents[1]


def clipdex(*args: str) -> list[str]:
    return [sys.executable, "-m", "retrieval.cli", *args]


def run(*args: str):
    """The CLI in this process (typer's test runner; an exception is raised, not caught)."""
    from typer.testing import CliRunner

    from retrieval.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def optimize(library: Path) -> str:
    """Run `clipdex optimize --json` on ``library`` (it must succeed); its JSON output."""
    done = subprocess.run(
        clipdex("optimize", "--library", str(library), "--json"),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def make_photos(folder: Path, count: int, seed: int = 7) -> set[str]:
    """``count`` small distinct PNGs; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
    return {str(folder / f"img_{i:03d}.png") for i in range(count)}


def warm_model(weights: Path, timeout: float = 600) -> None:
    """Export the ONNX model once, so no test kills a process in the middle of it."""
    done = subprocess.run(
        clipdex("embed", "--text", "warm up", "--weights", str(weights), "--json"),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr


def generation(library: Path) -> int:
    """The catalog generation of the index's last checkpoint (-1 without one)."""
    manifest = read_manifest(library) if library.exists() else None
    return manifest.generation if manifest is not None else -1


def check_library(library: Path) -> list[str]:
    """Open the library (stamps verified) and check it is whole; returns its paths.

    Index and catalog hold the same ids; every index vector is its catalog vector; no path
    twice; no damaged vector; nothing recorded as failed (a kill is not a file's fault).
    """
    with Library.open(library) as lib:
        ids = lib.catalog.ids()
        assert sorted(lib.index.ids()) == sorted(ids), "index and catalog disagree"
        if len(ids):
            _, vectors = lib.catalog.vectors(ids)
            stored = np.vstack([lib.index.reconstruct(i) for i in ids])
            np.testing.assert_allclose(stored, vectors, atol=1e-6)
        assert lib.catalog.unsound_vectors() == []
        assert lib.catalog.list_failures() == []
        paths = [row["path"] for row in lib.catalog.get_images(ids).values()]
    assert len(paths) == len(set(paths)), "an image is catalogued twice"
    return paths
