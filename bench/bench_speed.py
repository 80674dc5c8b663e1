"""How fast is clipdex on this machine? Four measurements, each against its reference, in one run.

1. Indexing throughput on real photos (the corpus JPEGs, repeated with a unique JPEG comment
   so every copy has its own hash but the same pixels): `clipdex index` end to end vs the
   naive open_clip loop (PIL open -> open_clip preprocess -> eager encode_image, batch 16),
   and vs the ONNX image tower alone on pre-decoded tensors.
2. Cold `clipdex search "text"` on a 10k-image library: wall time of fresh processes,
   ONNX (torch-free) path vs the torch path.
3. Warm text query through the library call (encode + search + rows) at 100k images.
4. Peak RSS (indexer + decode workers, sampled) of indexing 1,000 photos.

Runs with random MobileCLIP-S2 weights by default (same architecture and cost as the real
ones; built like tests/conftest.py), or the real ones with --weights / CLIPDEX_WEIGHTS.
Quick check: ``python bench/bench_speed.py --quick``. Full run: ``python bench/bench_speed.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.ingest.decode import decode_for_model  # noqa: E402
from indexer.model.onnx_encoder import OnnxEncoder, weights_identity  # noqa: E402
from indexer.store.catalog import ImageRecord  # noqa: E402
from indexer.store.library import Library  # noqa: E402

QUERIES = [
    "a dog on the beach", "sunset over the sea", "a red car in the snow", "two people hiking",
    "a bowl of soup", "city skyline at night", "a cat sleeping on a sofa", "autumn leaves",
    "a birthday cake with candles", "mountains reflected in a lake",
]


# -- helpers --------------------------------------------------------------------------------------
def summary(values: Sequence[float]) -> dict:
    """Median, min, max and count of a sample."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def fmt(stats: dict, unit: str, digits: int = 2) -> str:
    if stats["n"] == 1:
        return f"{stats['median']:.{digits}f} {unit} (n=1)"
    return (
        f"{stats['median']:.{digits}f} {unit} [{stats['min']:.{digits}f}-"
        f"{stats['max']:.{digits}f}, n={stats['n']}]"
    )


def with_comment(jpeg: bytes, text: str) -> bytes:
    """The same JPEG with a COM segment after SOI: other bytes and hash, identical pixels."""
    payload = text.encode()
    segment = b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload
    return jpeg[:2] + segment + jpeg[2:]


def make_photo_folder(photos: list[Path], target: Path, count: int) -> Path:
    """``count`` JPEG files cycling through ``photos``, each with distinct bytes."""
    target.mkdir(parents=True, exist_ok=True)
    originals = [p.read_bytes() for p in photos]
    for i in range(count):
        data = with_comment(originals[i % len(originals)], f"clipdex bench copy {i}")
        (target / f"photo_{i:05d}.jpg").write_bytes(data)
    return target


def corpus_jpegs(corpus: Path) -> list[Path]:
    found = sorted(
        p for p in (corpus / "photos").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg")
    )
    if not found:
        raise SystemExit(f"no JPEGs under {corpus / 'photos'}: pass --corpus")
    return found


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


def build_library(root: Path, count: int, weights: Path, cache: Path) -> Path:
    """A library of ``count`` synthetic images (random unit vectors) bound to ``weights``."""
    if Library.exists(root):
        return root
    rng = np.random.default_rng(0)
    with Library.open(root, create=True) as library:
        library.bind_model(weights_identity(weights, cache))
        for start in range(0, count, 5000):
            vectors = rng.standard_normal((min(5000, count - start), 512)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            records = [
                ImageRecord(
                    f"/photos/{(start + i) // 1000:04d}/img_{start + i:07d}.jpg", 2_000_000, 1,
                    f"{start + i:064x}", vectors[i], 4032, 3024, "JPEG",
                )
                for i in range(len(vectors))
            ]
            ids = library.catalog.commit_batch(records)
            library.index.add(np.asarray(ids, np.int64), vectors)
        library.checkpoint()
    return root


def clipdex_command() -> list[str]:
    return [sys.executable, "-m", "retrieval.cli"]


class TreeRss:
    """Samples the summed RSS of a process and its children every 50 ms; keeps the peak."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.peak_total = 0
        self.peak_main = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                main = self.process.memory_info().rss
                total = main
                for child in self.process.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        total += child.memory_info().rss
                self.peak_main = max(self.peak_main, main)
                self.peak_total = max(self.peak_total, total)
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_index(folder: Path, library: Path, weights: Path, workers: int | None) -> dict:
    """`clipdex index` in a fresh process: its own timing, wall time, peak RSS."""
    shutil.rmtree(library, ignore_errors=True)
    command = [*clipdex_command(), "index", str(folder), "--library", str(library),
               "--weights", str(weights), "--backend", "onnx", "--json"]
    if workers:
        command += ["--workers", str(workers)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = TreeRss(process.pid)
    out, err = process.communicate()
    rss.stop()
    if process.returncode != 0:
        raise SystemExit(f"clipdex index failed: {err.strip()[-2000:]}")
    report = json.loads(out)
    report.update(wall=time.perf_counter() - started, peak_rss=rss.peak_total,
                  peak_rss_main=rss.peak_main)
    return report


# -- 1. throughput ---------------------------------------------------------------------------
def naive_loop(files: list[Path], weights: Path) -> float:
    """img/s of the reference loop: PIL -> open_clip preprocess -> eager model, batch 16."""
    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(
        "MobileCLIP-S2", pretrained=str(weights), image_mean=(0.0, 0.0, 0.0),
        image_std=(1.0, 1.0, 1.0), image_interpolation="bilinear", image_resize_mode="shortest",
    )
    model.eval()
    started = time.perf_counter()
    for start in range(0, len(files), 16):
        batch = []
        for path in files[start : start + 16]:
            with Image.open(path) as image:
                batch.append(preprocess(image.convert("RGB")))
        with torch.no_grad():
            model.encode_image(torch.stack(batch))
    return len(files) / (time.perf_counter() - started)


def tower_only(pixels: np.ndarray, encoder: OnnxEncoder) -> float:
    """img/s of the exported image tower alone on pre-decoded tensors, batch 16.

    A session with ONNX Runtime's defaults (all optimisations, one thread per core,
    spin-waiting on), the best settings for the tower on its own: the reference is not
    weakened to flatter clipdex's ratio.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(encoder.folder / "image.onnx"), providers=["CPUExecutionProvider"]
    )
    session.run(None, {"pixels": pixels[:2]})  # first-run allocations
    started = time.perf_counter()
    for start in range(0, len(pixels), 16):
        session.run(None, {"pixels": pixels[start : start + 16]})
    return len(pixels) / (time.perf_counter() - started)


def bench_throughput(args, work: Path, weights: Path, encoder: OnnxEncoder) -> dict:
    folder = make_photo_folder(corpus_jpegs(args.corpus), work / "photos", args.files)
    files = sorted(folder.iterdir())
    pixels = np.stack([decode_for_model(str(p))[0] for p in files])
    runs: dict[str, list[float]] = {"naive": [], "tower": [], "clipdex": []}
    for repeat in range(args.repeats):
        print(f"  [1] repeat {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
        runs["naive"].append(naive_loop(files, weights))
        runs["tower"].append(tower_only(pixels, encoder))
        report = run_index(folder, work / "lib-throughput", weights, args.workers)
        runs["clipdex"].append(report["indexed"] / report["seconds"])
    stats = {name: summary(values) for name, values in runs.items()}
    ratios = {
        "clipdex/naive": summary([c / n for c, n in zip(runs["clipdex"], runs["naive"])]),
        "clipdex/tower": summary([c / t for c, t in zip(runs["clipdex"], runs["tower"])]),
    }
    distinct = min(len(files), len(corpus_jpegs(args.corpus)))
    return {"files": len(files), "distinct": distinct, **stats, "ratios": ratios}


# -- 2. cold search ---------------------------------------------------------------------------
def cold_search(library: Path, weights: Path, backend: str) -> float:
    command = [*clipdex_command(), "search", "a dog on the beach", "--library", str(library),
               "--weights", str(weights), "--backend", backend, "--json", "-k", "20"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or len(json.loads(done.stdout)["results"]) != 20:
        raise SystemExit(f"clipdex search ({backend}) failed: {done.stderr.strip()[-2000:]}")
    return elapsed


def bench_cold(args, work: Path, weights: Path, cache: Path) -> dict:
    library = build_library(work / f"lib-{args.cold_images}", args.cold_images, weights, cache)
    cold_search(library, weights, "onnx")  # page cache warm, as for a user's second query
    runs: dict[str, list[float]] = {"onnx": [], "torch": []}
    for run in range(args.cold_runs):
        print(f"  [2] run {run + 1}/{args.cold_runs}", file=sys.stderr, flush=True)
        for backend in runs:
            runs[backend].append(cold_search(library, weights, backend))
    stats = {name: summary(values) for name, values in runs.items()}
    return {"images": args.cold_images, **stats,
            "torch/onnx": stats["torch"]["median"] / stats["onnx"]["median"]}


# -- 3. warm query ----------------------------------------------------------------------------
def timed(func: Callable[[], object]) -> float:
    started = time.perf_counter()
    func()
    return 1000 * (time.perf_counter() - started)


def bench_warm(args, work: Path, weights: Path, cache: Path) -> dict:
    from retrieval import Collection, SearchOptions

    library_dir = build_library(work / f"lib-{args.warm_images}", args.warm_images, weights, cache)
    encoder = OnnxEncoder(weights, cache_dir=cache)
    options = SearchOptions(k=20)
    with Collection.open(library_dir, encoder=encoder, read_only=True) as photos:
        photos.search("warm up", options=options)
        total, encode, search = [], [], []
        for i in range(args.warm_queries):
            text = f"{QUERIES[i % len(QUERIES)]} {i}"
            total.append(timed(lambda t=text: photos.search(t, options=options)))
            vector = encoder.encode_texts([text])[0]
            encode.append(timed(lambda t=text: encoder.encode_texts([t])))
            search.append(timed(lambda v=vector: photos.search_vector(v, options)))
    return {
        "images": args.warm_images,
        "total_ms": summary(total) | {"p90": float(np.percentile(total, 90))},
        "encode_ms": summary(encode),
        "search_ms": summary(search),
    }


# -- 4. memory --------------------------------------------------------------------------------
def bench_rss(args, work: Path, weights: Path) -> dict:
    folder = make_photo_folder(corpus_jpegs(args.corpus), work / "photos-rss", args.rss_photos)
    report = run_index(folder, work / "lib-rss", weights, args.workers)
    return {
        "photos": args.rss_photos,
        "peak_rss_gb": report["peak_rss"] / 1e9,
        "peak_rss_main_gb": report["peak_rss_main"] / 1e9,
        "img_per_s": report["indexed"] / report["seconds"],
        "failed": report["failed"],
    }


# -- report -----------------------------------------------------------------------------------
def print_report(results: dict) -> None:
    print(f"\nclipdex speed benchmark — {results['machine']}")
    loads = ", ".join(f"{k} {a:.1f}->{b:.1f}" for k, (a, b) in results["load"].items())
    print(f"load average (1 min) before->after each section: {loads}")
    if "throughput" in results:
        r = results["throughput"]
        print(f"1. indexing throughput, {r['files']} JPEG files ({r['distinct']} distinct photos)")
        print(f"   naive open_clip loop        {fmt(r['naive'], 'img/s')}")
        print(f"   ONNX image tower alone      {fmt(r['tower'], 'img/s')}")
        print(f"   clipdex index, end to end   {fmt(r['clipdex'], 'img/s')}")
        print(f"   clipdex / naive             {fmt(r['ratios']['clipdex/naive'], 'x')}"
              "   (target ≥ 2.5x)")
        print(f"   clipdex / tower             {fmt(r['ratios']['clipdex/tower'], 'x')}"
              "   (target ≥ 0.80x)")
    if "cold" in results:
        r = results["cold"]
        print(f"2. cold `clipdex search` at {r['images']:,} images, fresh processes")
        print(f"   onnx (no torch import)      {fmt(r['onnx'], 's')}   (target ≤ 1.0 s)")
        print(f"   torch                       {fmt(r['torch'], 's')}")
        print(f"   torch / onnx                {r['torch/onnx']:.1f}x")
    if "warm" in results:
        r = results["warm"]
        print(f"3. warm text query (search_text, k=20) at {r['images']:,} images")
        print(f"   total                       {fmt(r['total_ms'], 'ms', 1)}, "
              f"p90 {r['total_ms']['p90']:.1f} ms   (target p50 ≤ 60 ms)")
        print(f"   of which text encode        {fmt(r['encode_ms'], 'ms', 1)}")
        print(f"   of which search + rows      {fmt(r['search_ms'], 'ms', 1)}")
    if "rss" in results:
        r = results["rss"]
        print(f"4. indexing {r['photos']:,} photos: peak RSS {r['peak_rss_gb']:.2f} GB "
              f"(indexer alone {r['peak_rss_main_gb']:.2f} GB; target ≤ 2.5 GB), "
              f"{r['img_per_s']:.1f} img/s, {r['failed']} failed")


def machine() -> str:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} CPUs ({cpu}), onnxruntime {onnxruntime.__version__}"


FULL = {"files": 200, "repeats": 3, "cold_images": 10_000, "cold_runs": 5,
        "warm_images": 100_000, "warm_queries": 50, "rss_photos": 1000}
QUICK = {"files": 32, "repeats": 1, "cold_images": 1000, "cold_runs": 2,
         "warm_images": 10_000, "warm_queries": 10, "rss_photos": 48}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--only", default="1,2,3,4", help="which sections, e.g. 1,3")
    parser.add_argument("--weights", type=Path, default=os.environ.get("CLIPDEX_WEIGHTS"))
    parser.add_argument("--corpus", type=Path,
                        default=os.environ.get("CLIPDEX_CORPUS", REPO.parent / "shared/imgcorpus"))
    parser.add_argument("--workdir", type=Path, help="keep libraries/exports here between runs")
    parser.add_argument("--workers", type=int, help="decode workers for clipdex index")
    for name, value in FULL.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            help=f"default {value} ({QUICK[name]} with --quick)")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.corpus = Path(args.corpus)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sections = {int(s) for s in args.only.split(",")}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="clipdex-bench-"))
    cache = work / "cache"
    os.environ["CLIPDEX_CACHE"] = str(cache)  # the CLI processes find the export here
    weights = args.weights or build_random_checkpoint(work / "weights" / "random.pt")
    encoder = OnnxEncoder(weights, cache_dir=cache)
    encoder.prepare()  # the one-time export is not part of any figure
    results: dict = {"machine": machine(), "weights": str(weights), "load": {}}
    steps = {
        1: ("throughput", lambda: bench_throughput(args, work, weights, encoder)),
        2: ("cold", lambda: bench_cold(args, work, weights, cache)),
        3: ("warm", lambda: bench_warm(args, work, weights, cache)),
        4: ("rss", lambda: bench_rss(args, work, weights)),
    }
    try:
        for number in sorted(sections):
            name, step = steps[number]
            before = os.getloadavg()[0]
            results[name] = step()
            results["load"][name] = (before, os.getloadavg()[0])
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
