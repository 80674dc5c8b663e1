"""Warm text-query latency of `clipdex serve` over /api/search at 10k indexed images.

Builds a library of N synthetic unit vectors (the index size is what matters for search;
the vectors need not come from photos), starts the real `clipdex serve` on a loopback port
as a subprocess, warms it up, then sends sequential text queries over one keep-alive
connection and prints p50 / p95 / p99:

  * ``distinct``: every query is a new text, so each one runs the text tower + FAISS;
  * ``repeated``: the same text again (the server's text-vector cache), so this is the
    HTTP + search + catalog part alone.

The model is MobileCLIP-S2 with random weights unless ``--weights`` names the real file:
the cost of the text tower does not depend on the weights' values.

    .venv/bin/python bench/bench_server.py                    # 10k images, 200 queries
    .venv/bin/python bench/bench_server.py --images 100000 --backend torch
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WORDS = ["dog", "cat", "beach", "mountain", "city", "street", "car", "bicycle", "child",
         "wedding", "birthday cake", "sunset", "snow", "forest", "river", "bridge", "boat",
         "train", "airplane", "flower", "garden", "kitchen", "concert", "market"]


def random_checkpoint(folder: Path) -> Path:
    """The real MobileCLIP-S2 architecture with random weights (as the tests build it)."""
    import open_clip
    import torch

    torch.manual_seed(0)
    model = open_clip.create_model("MobileCLIP-S2", pretrained=None)
    path = folder / "mobileclip_s2_random.pt"
    torch.save(model.state_dict(), path)
    return path


def build_library(root: Path, count: int, weights: Path) -> None:
    """A library bound to ``weights`` holding ``count`` synthetic photos."""
    from indexer.model.identity import checkpoint_identity, l2_normalise
    from indexer.store.catalog import ImageRecord
    from indexer.store.library import Library

    rng = np.random.default_rng(0)
    with Library.open(root, create=True) as library:
        library.bind_model(checkpoint_identity(weights))
        for start in range(0, count, 2000):
            vectors = l2_normalise(rng.standard_normal((min(2000, count - start), 512)))
            records = [
                ImageRecord(
                    path=f"/synthetic/{start + i:07d}.jpg",
                    size=100_000,
                    mtime_ns=0,
                    sha256=hashlib.sha256(str(start + i).encode()).hexdigest(),
                    vector=vector,
                    width=640,
                    height=480,
                    format="JPEG",
                )
                for i, vector in enumerate(vectors)
            ]
            library.catalog.commit_batch(records)
        library.reconcile()
        library.checkpoint()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(library: Path, weights: Path, backend: str, log: Path) -> tuple:
    port = free_port()
    command = [
        sys.executable, "-m", "retrieval.cli", "serve", "--port", str(port),
        "--library", str(library), "--weights", str(weights), "--backend", backend,
        "--log-level", "warning",
    ]
    handle = open(log, "wb")  # noqa: SIM115 - closed by the caller
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"clipdex serve exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return process, handle, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"clipdex serve not ready: {log.read_text()[-2000:]}")


def measure(client: httpx.Client, texts: list[str], k: int) -> list[float]:
    """Milliseconds per request, sequential, over one keep-alive connection."""
    latencies = []
    for text in texts:
        started = time.perf_counter()
        response = client.get("/api/search", params={"q": text, "k": k})
        latencies.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        assert len(response.json()["results"]) == k
    return latencies


def summary(latencies: list[float]) -> dict:
    ordered = sorted(latencies)

    def pick(quantile: float) -> float:  # nearest rank
        return ordered[min(len(ordered) - 1, round(quantile * (len(ordered) - 1)))]

    return {
        "n": len(ordered),
        "p50_ms": round(pick(0.50), 1),
        "p95_ms": round(pick(0.95), 1),
        "p99_ms": round(pick(0.99), 1),
        "mean_ms": round(statistics.fmean(ordered), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("-k", type=int, default=20)
    parser.add_argument("--weights", type=Path, default=os.environ.get("CLIPDEX_WEIGHTS"))
    parser.add_argument("--backend", default="auto", help="auto | torch | onnx")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="clipdex-bench-") as tmp:
        folder = Path(tmp)
        os.environ.setdefault("XDG_CACHE_HOME", str(folder / "cache"))
        weights = args.weights or random_checkpoint(folder)
        started = time.perf_counter()
        build_library(folder / "library", args.images, weights)
        built = time.perf_counter() - started
        process, log, url = start_server(folder / "library", weights, args.backend,
                                         folder / "serve.log")
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                info = client.get("/api/info").json()
                measure(client, [f"warm up {i}" for i in range(args.warmup)], args.k)
                texts = [f"a photo of a {WORDS[i % len(WORDS)]} ({i})" for i in range(args.queries)]
                distinct = summary(measure(client, texts, args.k))
                repeated = summary(measure(client, [texts[0]] * args.queries, args.k))
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(60)
            log.close()
    report = {
        "images": info["images"],
        "model": info["encoder"],
        "backend": args.backend,
        "k": args.k,
        "library_build_s": round(built, 1),
        "distinct_text_queries": distinct,
        "repeated_text_query": repeated,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other processes skew the figures
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"clipdex serve, {report['images']} images, k={args.k}, backend={args.backend}, "
          f"{report['cpu_count']} CPUs (load {report['load_average_1min']}), "
          f"model {report['model']}")
    print(f"{'GET /api/search':<34}{'n':>6}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'mean':>8}")
    for name, row in (("distinct texts (text tower+search)", distinct),
                      ("repeated text (cached vector)", repeated)):
        print(f"{name:<34}{row['n']:>6}{row['p50_ms']:>9}{row['p95_ms']:>9}"
              f"{row['p99_ms']:>9}{row['mean_ms']:>8}")


if __name__ == "__main__":
    main()
