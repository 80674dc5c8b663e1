"""A cold `clipdex search` against the bare-ONNX floor, side by side in one run.

The floor (``bench/floor_query.py``) is a fresh Python process that imports numpy and
onnxruntime, builds a session from the cached text tower with default options, tokenises
one query and runs it. The product is a fresh ``clipdex search "a dog" --library L
--weights W`` (the installed console script, else ``python -m retrieval.cli``) on a small
library: it does all that plus the CLI, the catalog, the vector search and the table.

Set-up happens once and is not timed: a random-weights MobileCLIP-S2 checkpoint (the real
architecture, as tests/conftest.py makes it; or the real one with ``--weights``), the ONNX
export (``CLIPDEX_CACHE`` inside the work folder; ~15 s) and a library of a few dozen
generated photos plus ``data/samples``, indexed by ``clipdex index`` itself. Then one
untimed run of each warms the page cache, and ``--rounds`` interleaved rounds (the order
alternates per round) time both. It prints the medians, the median of the per-round
ratios and their range: the machine is shared, so only same-run ratios mean anything.

Usage: ``python bench/bench_cold.py [--rounds 7] [--workdir DIR] [--weights FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOOR = Path(__file__).resolve().with_name("floor_query.py")
TARGET = 1.3  # clipdex search may take at most this many times the floor


# -- set-up (untimed) -------------------------------------------------------------------------
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


def make_photos(folder: Path, count: int) -> Path:
    """``count`` generated photos (distinct colours and shapes) plus the shipped samples."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(count):
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        image = Image.new("RGB", (480 + 8 * i, 360), colour)
        box = tuple(int(v) for v in sorted(rng.integers(0, 360, 2))) * 2
        ImageDraw.Draw(image).ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        image.save(folder / f"generated_{i:03d}.jpg", quality=90)
    for sample in (REPO / "data" / "samples").iterdir():
        shutil.copy(sample, folder / sample.name)
    return folder


def clipdex_command() -> list[str]:
    """The installed console script beside this Python, else ``python -m retrieval.cli``."""
    script = Path(sys.executable).with_name("clipdex")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "retrieval.cli"]


def set_up(work: Path, weights: Path | None, images: int, env: dict) -> tuple[Path, Path, Path]:
    """(weights, library, text tower file), building whatever the work folder lacks."""
    weights = weights or build_random_checkpoint(work / "weights" / "random.pt")
    library = work / "library"
    if not (library / "catalog.sqlite").exists():
        photos = make_photos(work / "photos", images)
        command = [
            *clipdex_command(),
            "index",
            str(photos),
            "--library",
            str(library),
            "--weights",
            str(weights),
            "--backend",
            "onnx",
        ]
        run_checked(command, env)
    return weights, library, text_model(weights, Path(env["CLIPDEX_CACHE"]))


def text_model(weights: Path, cache: Path) -> Path:
    """The cached export's text tower (``clipdex index`` made it)."""
    sys.path.insert(0, str(REPO))
    from indexer.model.onnx_encoder import TEXT_FILE, export_dir, weights_identity

    path = export_dir(weights_identity(weights, cache), cache) / TEXT_FILE
    if not path.is_file():
        raise SystemExit(f"no ONNX text tower at {path}: did `clipdex index` fail?")
    return path


def run_checked(command: list[str], env: dict) -> float:
    """Run ``command`` in a fresh process; its wall time, or exit if it failed."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or not done.stdout.strip():
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed


# -- the timed rounds -------------------------------------------------------------------------
def rounds(commands: dict[str, list[str]], count: int, env: dict) -> dict[str, list[float]]:
    """Time each command once per round, alternating which goes first."""
    for command in commands.values():  # warm the page cache; not timed
        run_checked(command, env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    names = list(commands)
    for number in range(count):
        order = names if number % 2 == 0 else names[::-1]
        for name in order:
            times[name].append(run_checked(commands[name], env))
        print(
            f"  round {number + 1}/{count}: "
            + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names),
            file=sys.stderr,
            flush=True,
        )
    return times


def report(times: dict[str, list[float]], commands: dict[str, list[str]]) -> dict:
    """Medians, ranges and the per-round ratios clipdex / floor."""
    ratios = [c / f for c, f in zip(times["clipdex"], times["floor"])]
    result = {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
        for name, v in times.items()
    }
    result["ratio"] = {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "of_medians": result["clipdex"]["median"] / result["floor"]["median"],
    }
    result["commands"] = {name: " ".join(c) for name, c in commands.items()}
    return result


def print_report(result: dict) -> None:
    for name in ("floor", "clipdex"):
        stats = result[name]
        print(
            f"{name:8s} median {stats['median']:.3f} s  "
            f"[{stats['min']:.3f}-{stats['max']:.3f}]  {result['commands'][name]}"
        )
    ratio = result["ratio"]
    verdict = "OK" if ratio["median"] <= TARGET else "ABOVE TARGET"
    print(
        f"ratio    median {ratio['median']:.2f}x  [{ratio['min']:.2f}-{ratio['max']:.2f}] "
        f"per round; of medians {ratio['of_medians']:.2f}x  "
        f"(target <= {TARGET}x: {verdict})"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds")
    parser.add_argument("--images", type=int, default=36, help="generated photos to index")
    parser.add_argument("--query", default="a dog")
    parser.add_argument("--weights", type=Path, help="a checkpoint (default: random weights)")
    parser.add_argument("--workdir", type=Path, help="keep checkpoint/export/library here")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="clipdex-cold-"))
    env = {**os.environ, "CLIPDEX_CACHE": str(work / "cache")}
    try:
        weights, library, model = set_up(work, args.weights, args.images, env)
        commands = {
            "floor": [sys.executable, str(FLOOR), str(model), args.query],
            "clipdex": [
                *clipdex_command(),
                "search",
                args.query,
                "--library",
                str(library),
                "--weights",
                str(weights),
            ],
        }
        print(f"load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
        result = report(rounds(commands, args.rounds, env), commands)
        result["load_after"] = os.getloadavg()[0]
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
