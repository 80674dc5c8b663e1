"""Load test of `clipdex serve`: concurrent clients mixing text search, image upload and
thumbnails over loopback; throughput, p50/p99 per kind of request, and every error.

Indexes real photos (``data/samples``, plus the shared corpus' ``photos/`` when it is
there) with `clipdex index`, starts the real `clipdex serve` (ONNX backend unless
``--backend`` says otherwise) as a subprocess, then runs ``--clients`` asyncio clients, each
with its own connection (httpx.AsyncClient), for ``--seconds``. Each client picks its next
request at random:

  * ``text (new)``: a text never asked before, so the text tower really runs;
  * ``text (repeat)``: one of a few texts asked again (the server's text-vector cache);
  * ``image upload``: ``POST /api/search/image`` with one of the photos (decode + image tower);
  * ``thumbnail``: ``GET /api/images/{id}/thumbnail`` of a random photo and size.

An error is any answer but 200, or a failed request. The model is MobileCLIP-S2 with
random weights unless ``--weights`` names the real file: its cost does not depend on the
weights' values. The clients share the machine with the server, so the figures are the
whole machine's, client included.

    .venv/bin/python bench/bench_load.py                        # 50 clients, 60 s
    .venv/bin/python bench/bench_load.py --seconds 20 --json

Measured on the project's machine kind (2 cores, server and clients together), 57 photos,
50 clients, 61.6 s: 2662 requests, 43.2 req/s, 0 errors; p50 / p99 ms: new text 2107 / 2807,
repeated text 209 / 1862, image upload 2177 / 3081, thumbnail 240 / 697 (README, Reliability).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_server import WORDS, random_checkpoint, start_server  # noqa: E402

MIX = {"text (new)": 0.30, "text (repeat)": 0.20, "image upload": 0.15, "thumbnail": 0.35}
REPEATED = ["a dog on a beach", "sunset over the sea", "a cat", "snowy mountains",
            "a red car", "people at a concert", "a bowl of fruit", "city at night"]
THUMBNAIL_SIZES = (128, 256, 512)
MAX_UPLOAD_BYTES = 3 * 1024 * 1024
PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".heic", ".heif", ".hif", ".avif", ".webp"}


@dataclass
class Tally:
    """Latencies (ms) and errors per kind of request."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    samples: list[str] = field(default_factory=list)  # the first few errors, for a person

    def error(self, kind: str, what: str) -> None:
        self.errors[kind] += 1
        if len(self.samples) < 10:
            self.samples.append(f"{kind}: {what}")


@dataclass
class Workload:
    """What the clients ask for: photo ids to thumbnail and image bytes to upload."""

    ids: list[int]
    uploads: list[tuple[str, bytes]]
    counter: int = 0

    def new_text(self, rng: random.Random) -> str:
        self.counter += 1
        return f"a photo of {rng.choice(WORDS)} and {rng.choice(WORDS)} #{self.counter}"


def photo_folders() -> list[Path]:
    """data/samples, plus the shared corpus' photos when present."""
    folders = [REPO / "data" / "samples"]
    corpus = os.environ.get("CLIPDEX_CORPUS") or str(REPO.parent / "shared" / "imgcorpus")
    if (Path(corpus) / "photos").is_dir():
        folders.append(Path(corpus) / "photos")
    return folders


def index_photos(library: Path, weights: Path, backend: str, folders: list[Path]) -> dict:
    """`clipdex index` the folders (the real CLI, its own process); its --json report."""
    command = [
        sys.executable, "-m", "retrieval.cli", "index", *map(str, folders),
        "--library", str(library), "--weights", str(weights), "--backend", backend, "--json",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"clipdex index failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def upload_pool(folders: list[Path]) -> list[tuple[str, bytes]]:
    """The photos' bytes (those up to 3 MB), to upload as queries."""
    pool = []
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in PHOTO_SUFFIXES and path.stat().st_size <= MAX_UPLOAD_BYTES:
                pool.append((path.name, path.read_bytes()))
    return pool


async def request(client: httpx.AsyncClient, kind: str, work: Workload, rng: random.Random):
    if kind == "text (new)":
        return await client.get("/api/search", params={"q": work.new_text(rng)})
    if kind == "text (repeat)":
        return await client.get("/api/search", params={"q": rng.choice(REPEATED)})
    if kind == "image upload":
        name, data = rng.choice(work.uploads)
        return await client.post("/api/search/image", files={"file": (name, data)})
    size = rng.choice(THUMBNAIL_SIZES)
    return await client.get(f"/api/images/{rng.choice(work.ids)}/thumbnail?size={size}")


async def one_client(url: str, seed: int, work: Workload, tally: Tally, until: float) -> None:
    """One client on its own connection, one request after another until ``until``."""
    rng = random.Random(seed)
    kinds, weights = list(MIX), list(MIX.values())
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        while time.monotonic() < until:
            kind = rng.choices(kinds, weights)[0]
            started = time.perf_counter()
            try:
                response = await request(client, kind, work, rng)
            except httpx.HTTPError as exc:
                tally.error(kind, f"{type(exc).__name__}: {exc}")
                continue
            elapsed = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                tally.error(kind, f"HTTP {response.status_code}: {response.text[:200]}")
                continue
            tally.latencies[kind].append(elapsed)


async def run_load(url: str, clients: int, seconds: float, work: Workload) -> tuple[Tally, float]:
    tally = Tally()
    started = time.monotonic()
    until = started + seconds
    await asyncio.gather(*(one_client(url, i, work, tally, until) for i in range(clients)))
    return tally, time.monotonic() - started


def percentile(ordered: list[float], quantile: float) -> float:
    """Nearest-rank percentile of sorted values (0 when there are none)."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, round(quantile * (len(ordered) - 1)))]


def summarise(tally: Tally, elapsed: float) -> dict:
    rows = {}
    every = []
    for kind in MIX:
        ordered = sorted(tally.latencies[kind])
        every += ordered
        rows[kind] = row(ordered, tally.errors[kind], elapsed)
    rows["all"] = row(sorted(every), sum(tally.errors.values()), elapsed)
    return rows


def row(ordered: list[float], errors: int, elapsed: float) -> dict:
    return {
        "n": len(ordered),
        "req_per_s": round(len(ordered) / elapsed, 1),
        "p50_ms": round(percentile(ordered, 0.50), 1),
        "p99_ms": round(percentile(ordered, 0.99), 1),
        "errors": errors,
    }


def prepare(url: str) -> list[int]:
    """Photo ids to thumbnail; also warms each route once."""
    with httpx.Client(base_url=url, timeout=120) as client:
        hits = client.get("/api/search", params={"q": "warm up", "k": 1000}).json()["results"]
        ids = [hit["id"] for hit in hits]
        client.get(f"/api/images/{ids[0]}/thumbnail?size=256").raise_for_status()
    return ids


def server_log_errors(log: Path) -> list[str]:
    lines = log.read_text(errors="replace").splitlines()
    return [line for line in lines if "Traceback" in line or line.startswith("ERROR")]


def print_table(report: dict) -> None:
    print(f"clipdex serve under load: {report['clients']} clients for {report['seconds']} s, "
          f"{report['photos']} photos, backend {report['backend']}, {report['cpu_count']} CPUs "
          f"shared by server and clients (load {report['load_average_1min']})")
    print(f"{'request':<16}{'n':>7}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for kind, r in report["kinds"].items():
        print(f"{kind:<16}{r['n']:>7}{r['req_per_s']:>8}{r['p50_ms']:>9}{r['p99_ms']:>9}"
              f"{r['errors']:>8}")
    for sample in report["error_samples"]:
        print(f"  error: {sample}")
    if report["server_log_errors"]:
        print(f"  server log: {report['server_log_errors']} error lines")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--weights", type=Path, default=os.environ.get("CLIPDEX_WEIGHTS"))
    parser.add_argument("--backend", default="onnx", help="auto | torch | onnx")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="clipdex-load-") as tmp:
        folder = Path(tmp)
        weights = args.weights or random_checkpoint(folder)
        folders = photo_folders()
        indexed = index_photos(folder / "library", weights, args.backend, folders)
        process, log, url = start_server(folder / "library", weights, args.backend,
                                         folder / "serve.log")
        try:
            work = Workload(prepare(url), upload_pool(folders))
            tally, elapsed = asyncio.run(run_load(url, args.clients, args.seconds, work))
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(60)
            log.close()
        log_errors = server_log_errors(folder / "serve.log")
    report = {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "photos": len(work.ids),
        "not_indexed": indexed["failed"],
        "uploads": len(work.uploads),
        "backend": args.backend,
        "mix": MIX,
        "kinds": summarise(tally, elapsed),
        "error_samples": tally.samples,
        "server_log_errors": len(log_errors),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)
    return 1 if report["kinds"]["all"]["errors"] or log_errors else 0


if __name__ == "__main__":
    sys.exit(main())
