"""What a user's everyday commands cost on a 10k and a 1M photo library, side by side.

Builds (once, cached under ``--libs``) synthetic libraries through clipdex's own catalog
bulk insert and index, from CLIP-like synthetic vectors (tests/clipvectors.py: uniform
noise has no neighbourhoods, so an approximate index would have to scan everything), with
the index kind ``auto`` picks built up front (so no round pays a kind switch), each with a
64-photo folder indexed for real. Then, in interleaved rounds (the
order of the sizes alternates, so machine drift hits both alike), it times fresh
``clipdex`` processes and prints medians and the 1M/10k ratios:

- a no-op ``clipdex index`` of the 64-photo folder (nothing new);
- ``clipdex info``;
- ``clipdex index`` adding 64 new photos (a new folder each round);
- a checkpoint of 64 new vectors in-process: time and bytes the process wrote;
- a cold ``clipdex search "a dog" -k 10`` (fresh process) twice: with the library's files
  in the OS page cache (``cold_search``: what a second search in a new shell costs), and
  with them evicted first (``evicted_search``: ``posix_fadvise(DONTNEED)`` on every file
  of the library, the first search after a reboot or a long pause; Python, its packages
  and the model stay cached in both); wall time and peak RSS;
- the same evicted search with ``--cutoff auto`` (``evicted_cutoff``: reads the background
  sample, indexer/store/background.py);
- bytes per photo on disk.

``--repo DIR`` runs the CLI (and the in-process checkpoint) from another checkout, to
measure before/after on the same libraries; libraries built by either open in both.
Usage: ``python bench/bench_library_scale.py --libs /work/bench-libs [--sizes 10000,1000000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BUILD_BATCH = 20_000


# -- set-up (untimed) -----------------------------------------------------------------------------
def build_random_checkpoint(path: Path) -> Path:
    """The real architecture with random weights (as tests/conftest.py), saved once."""
    if path.exists():
        return path
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model("MobileCLIP-S2", pretrained=None)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def make_photos(folder: Path, count: int, seed: int) -> Path:
    """``count`` small generated JPEGs (distinct colours and shapes)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        image = Image.new("RGB", (320, 240), tuple(int(c) for c in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = rng.integers(0, 280), rng.integers(0, 200)
            fill = tuple(int(c) for c in rng.integers(0, 255, 3))
            draw.ellipse((x, y, x + rng.integers(10, 60), y + rng.integers(10, 60)), fill=fill)
        image.save(folder / f"gen_{seed}_{i:03d}.jpg", quality=85)
    return folder


def build_library(root: Path, count: int, weights: Path, cache: Path) -> None:
    """A library of ``count`` synthetic photos bound to ``weights``, built through the
    catalog's bulk insert (commit_batch) and the library's own index and checkpoint."""
    from indexer.model.onnx_encoder import weights_identity
    from indexer.store.catalog import ImageRecord
    from indexer.store.kindchoice import ensure_kind
    from indexer.store.library import Library

    repo = Path(__file__).resolve().parents[1]
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    from tests.clipvectors import ClipLike

    synthetic = ClipLike(count)
    started = time.monotonic()
    with Library.open(root, create=True) as library:
        library.acquire_lock()
        library.bind_model(weights_identity(weights, cache))
        for start in range(0, count, BUILD_BATCH):
            vectors = synthetic.vectors(start, min(start + BUILD_BATCH, count))
            records = [
                ImageRecord(
                    f"/photos/{(start + i) // 1000:04d}/img_{start + i:07d}.jpg",
                    2_000_000,
                    1,
                    f"{start + i:064x}",
                    vectors[i],
                    4032,
                    3024,
                    "JPEG",
                )
                for i in range(len(vectors))
            ]
            ids = library.catalog.commit_batch(records)
            library.index.add(np.asarray(ids, np.int64), vectors)
            print(
                f"  {start + len(vectors)}/{count} rows, {time.monotonic() - started:.0f}s",
                file=sys.stderr,
                flush=True,
            )
        library.checkpoint()
        ensure_kind(library, "auto")
    print(f"built {root} ({count} rows) in {time.monotonic() - started:.0f}s", file=sys.stderr)


def prepare(libs: Path, sizes: list[int], repo: Path) -> dict:
    """Weights, ONNX export, photo folders and the libraries (each built once)."""
    weights = build_random_checkpoint(libs / "weights" / "random.pt")
    cache = libs / "cache"
    known = libs / "photos_known"
    if not known.exists():
        make_photos(known, 64, seed=1)
    setup = {"weights": weights, "cache": cache, "known": known, "libraries": {}}
    for size in sizes:
        root = libs / f"library_{size}"
        if not (root / ".built").exists():
            shutil.rmtree(root, ignore_errors=True)
            build_library(root, size, weights, cache)
            run_cli(repo, setup, ["index", str(known)], root, check=True)
            (root / ".built").write_text(str(size))
        setup["libraries"][size] = root
    return setup


# -- measuring ------------------------------------------------------------------------------------
class TreeRss:
    """Samples the summed RSS of a process and its children every 20 ms; keeps the peak."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.02)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_cli(repo: Path, setup: dict, args: list[str], library: Path, *, check=False) -> dict:
    """One fresh ``clipdex`` process from ``repo``: wall seconds and peak RSS."""
    env = dict(
        os.environ,
        PYTHONPATH=str(repo),
        CLIPDEX_CACHE=str(setup["cache"]),
        CLIPDEX_WEIGHTS=str(setup["weights"]),
    )
    command = [sys.executable, "-m", "retrieval.cli", *args, "--library", str(library)]
    if args[0] == "index":
        command += ["--no-prepare-labels", "--quiet"]
    started = time.perf_counter()
    child = subprocess.Popen(
        command, env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    rss = TreeRss(child.pid)
    _, err = child.communicate()
    seconds = time.perf_counter() - started
    peak = rss.stop()
    if child.returncode != 0:
        message = f"{' '.join(args)} failed ({child.returncode}): {err[-2000:]}"
        if check:
            raise SystemExit(message)
        print(message, file=sys.stderr)
    return {"seconds": seconds, "peak_rss": peak}


CHECKPOINT_PROBE = r"""
import sys, time, json, numpy as np
from indexer.store.catalog import ImageRecord
from indexer.store.library import Library
def written():
    for line in open("/proc/self/io"):
        if line.startswith("write_bytes"):
            return int(line.split()[1])
root, tag = sys.argv[1], sys.argv[2]
with Library.open(root) as library:
    library.acquire_lock()
    rng = np.random.default_rng(abs(hash(tag)) % 2**32)
    v = rng.standard_normal((64, 512), np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    recs = [ImageRecord(f"/probe/{tag}/{i}.jpg", 1, 1, f"{tag}{i:060d}"[:64], v[i], 1, 1)
            for i in range(64)]
    len(library.index)  # read the index first: the checkpoint is what is timed
    before, t0 = written(), time.perf_counter()
    ids = library.catalog.commit_batch(recs)
    library.index.add(np.asarray(ids, np.int64), v)
    library.checkpoint()
    print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": written() - before}))
"""


def checkpoint_probe(repo: Path, library: Path, tag: str) -> dict:
    """Commit 64 synthetic vectors and checkpoint, in a fresh process: time and bytes."""
    env = dict(os.environ, PYTHONPATH=str(repo))
    out = subprocess.run(
        [sys.executable, "-c", CHECKPOINT_PROBE, str(library), tag],
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def evict(root: Path) -> None:
    """Drop the library's files from the OS page cache (no root needed: fadvise)."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def photo_count(root: Path) -> int:
    import sqlite3

    with sqlite3.connect(f"file:{root / 'catalog.sqlite'}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT max(id) FROM images").fetchone()[0] or 0


def one_round(repo: Path, setup: dict, size: int, label: str) -> dict:
    if setup.get("search_only"):
        return search_figures(repo, setup, setup["libraries"][size])
    library = setup["libraries"][size]
    fresh = setup["libs"] / f"photos_new_{label}_{size}"
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(setup["new"], fresh)
    figures = {
        "noop_index": run_cli(repo, setup, ["index", str(setup["known"])], library)["seconds"],
        "info": run_cli(repo, setup, ["info"], library)["seconds"],
        "add_64": run_cli(repo, setup, ["index", str(fresh)], library)["seconds"],
    }
    probe = checkpoint_probe(repo, library, f"{label}{size}")
    figures["checkpoint_s"], figures["checkpoint_bytes"] = probe["seconds"], probe["bytes"]
    return {**figures, **search_figures(repo, setup, library)}


def search_figures(repo: Path, setup: dict, library: Path) -> dict:
    """The cold searches: page cache warm, then evicted (plain and --cutoff auto)."""
    figures = {}
    search = ["search", "a dog", "-k", "10"]
    cold = run_cli(repo, setup, search, library)
    figures["cold_search"], figures["cold_search_peak_mb"] = cold["seconds"], cold["peak_rss"] / 1e6
    evict(library)
    cold = run_cli(repo, setup, search, library)
    figures["evicted_search"] = cold["seconds"]
    figures["evicted_search_peak_mb"] = cold["peak_rss"] / 1e6
    evict(library)
    figures["evicted_cutoff"] = run_cli(repo, setup, [*search, "--cutoff", "auto"], library)[
        "seconds"
    ]
    # Leave the page cache as the other figures expect it (the next round's no-op index
    # and info are warm-cache figures): read again what a search and info read.
    run_cli(repo, setup, ["info"], library)
    run_cli(repo, setup, search, library)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--libs", type=Path, required=True, help="cache the libraries here")
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose code to run")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument(
        "--search-only", action="store_true", help="time the cold searches only (quicker)"
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    args.libs.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(args.repo))
    setup = prepare(args.libs, sizes, args.repo.resolve())
    setup["libs"] = args.libs
    setup["search_only"] = args.search_only
    setup["new"] = args.libs / "photos_new"
    if not setup["new"].exists():
        make_photos(setup["new"], 64, seed=2)
    if args.build_only:
        return
    stamp = time.strftime("%H%M%S")
    rounds: dict[int, list[dict]] = {size: [] for size in sizes}
    for r in range(args.rounds):
        order = sizes if r % 2 == 0 else sizes[::-1]
        for size in order:
            rounds[size].append(one_round(args.repo.resolve(), setup, size, f"{stamp}r{r}"))
    report(args, sizes, rounds, setup)


def report(args, sizes: list[int], rounds: dict[int, list[dict]], setup: dict) -> None:
    medians = {
        size: {key: statistics.median(r[key] for r in rounds[size]) for key in rounds[size][0]}
        for size in sizes
    }
    for size in sizes:
        root = setup["libraries"][size]
        medians[size]["bytes_per_photo"] = disk_bytes(root) / max(1, photo_count(root))
    small, large = sizes[0], sizes[-1]
    print(f"code: {args.repo}   rounds: {args.rounds} (medians)")
    print(f"{'':28}{small:>14,}{large:>14,}{'ratio':>9}")
    units = {
        "checkpoint_bytes": "B",
        "cold_search_peak_mb": "MB",
        "evicted_search_peak_mb": "MB",
        "bytes_per_photo": "B",
    }
    for key in medians[small]:
        a, b = medians[small][key], medians[large][key]
        unit = units.get(key, "s")

        def fmt(v, unit=unit):
            return f"{v:.2f} s" if unit == "s" else f"{v:,.0f} {unit}"

        ratio = f"{b / a:.2f}x" if a else "-"
        print(f"{key:28}{fmt(a):>14}{fmt(b):>14}{ratio:>9}")
    if args.json:
        args.json.write_text(json.dumps({"medians": medians, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
