"""The Ray path's own cost: the same files indexed locally and through Ray Data, one run.

``--files`` real photos (copies of the corpus JPEGs, default 64) are indexed twice into
fresh libraries with the same model (real MobileCLIP-S2 architecture, the ONNX backend,
random weights unless ``--weights``): once by the local pipeline (``--workers`` decode
processes, default 2), once with ``--cluster local``: a one-node Ray instance started here
with one actor that gets the same CPUs (its decode pool has the same worker count). Both
paths run the same decode and model code, so the gap is the engine: Ray Data's scheduling,
Arrow transfers, the Parquet shards and the per-shard commits.

Printed, from the same run:

- end to end: seconds and img/s of each path, Ray start-up included (actors load the
  model once) and without it (*steady*: from the first committed file to the last);
- the overhead of the engine (target: <= 15 %): end to end (both paths load the model once
  per run: Ray's actor start-up, scheduling, shards and commits all counted), and at steady
  state;
- the coordinator's commit cost per file (shard write + catalog transaction + index), which
  bounds what any number of workers can reach, and a projection table for N workers from the
  measured per-worker rate: ``min(N * per_worker, commit_limit)``.

Each round runs both paths (the order alternates: the machine's load drifts); the ratios
are medians of the per-round ratios.

Then the ivf index build (``--build-vectors``, default 100k synthetic CLIP-like vectors;
0 skips it), in the same run: the one-process build (``IVFIndex.build``) against the build
from parts on the same Ray instance (``RayParts``: trained once here, each batch of 10k
encoded by a task on one CPU, lists merged here), checked to be the same index; the time
split into the coordinator's serial share (sample, train, merge, tune) and the encoding
that tasks share, and a projection for N workers: ``coordinator + encoding / N``.

Usage: ``python bench/bench_ray.py [--files 64] [--workers 2] [--shard-size 8] [--rounds 2]
[--build-vectors 100000] [--weights FILE] [--cache-dir DIR] [--workdir DIR]``
(``--rounds 0``: the index build alone; ``--build-vectors 0``: the indexing alone). The
machine is shared: read the same-run ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class Clock:
    """A pipeline Progress that notes when files were committed: the *steady* rate counts
    the files after the first commit (a model batch locally, a shard on Ray: files within
    0.2 s of the first) over the time from it to the last."""

    def __init__(self) -> None:
        self.first = self.last = None
        self.done = self.in_first = 0

    def start(self, total: int) -> None:
        pass

    def advance(self, count: int = 1) -> None:
        now = time.monotonic()
        self.first = self.first or now
        self.last = now
        self.done += count
        if now - self.first < 0.2:
            self.in_first += count

    def steady_rate(self) -> float:
        """NaN when every file came within 0.2 s of the first (too few commits to say)."""
        span = (self.last or 0) - (self.first or 0)
        after = self.done - self.in_first
        return after / span if span > 0 and after > 0 else float("nan")

    def fail(self, path: str, reason: str) -> None:
        pass


def make_folder(target: Path, count: int) -> Path:
    """``count`` real JPEGs from the corpus (copied round-robin under distinct names; each
    copy gets one changed byte in a comment so no content repeats)."""
    corpus = Path(os.environ.get("CLIPDEX_CORPUS", REPO.parent / "shared" / "imgcorpus"))
    sources = sorted(p for p in (corpus / "photos").rglob("*.jpg") if p.stat().st_size < 3e6)
    if not sources:
        sys.exit(f"no corpus photos under {corpus}/photos: set CLIPDEX_CORPUS")
    target.mkdir(parents=True)
    for i in range(count):
        data = sources[i % len(sources)].read_bytes()
        (target / f"IMG_{i:05d}.jpg").write_bytes(data + f"copy {i}".encode())  # after EOI
    return target


def weights_file(args, work: Path) -> Path:
    if args.weights:
        return Path(args.weights)
    import open_clip
    import torch

    torch.manual_seed(0)
    path = work / "random.pt"
    torch.save(open_clip.create_model("MobileCLIP-S2", pretrained=None).state_dict(), path)
    return path


def run(folder: Path, library: Path, loader, workers: int, cluster=None) -> dict:
    from indexer.ingest.pipeline import IndexOptions
    from retrieval.collection import Collection

    clock = Clock()
    started = time.monotonic()
    with Collection.open(library, encoder=loader) as photos:
        report = photos.index(folder, IndexOptions(workers=workers), clock, cluster)
    total = time.monotonic() - started
    return {
        "files": report.indexed,
        "seconds": total,
        "rate": report.indexed / total,
        "steady_rate": clock.steady_rate(),
        "nodes": report.nodes,
    }


def commit_cost(shard_size: int, dim: int = 512, rounds: int = 5) -> float:
    """Seconds per file the coordinator spends on a shard: Parquet write + commit."""
    import numpy as np

    from indexer.ingest import cluster as cl
    from indexer.ingest.discover import FoundFile
    from indexer.ingest.pipeline import IndexOptions, IndexReport, Progress, _Plan, _Writer
    from indexer.model.identity import ModelIdentity
    from indexer.store.library import Library

    work = Path(tempfile.mkdtemp(prefix="clipdex-commit-"))
    rng = np.random.default_rng(0)
    spent = 0.0
    with Library.open(work / "library", create=True) as library, library.writing():
        library.bind_model(ModelIdentity(weights="bench"))
        writer = _Writer(library, _Plan(), IndexOptions())
        sink = cl.Committer(writer, IndexReport(nodes={}), Progress())
        for r in range(rounds):
            shard = cl._ShardWriter()
            for i in range(shard_size):
                found = FoundFile(f"/photos/{r}/{i}.jpg", 1000 + i, 1, None, None, None)
                item = cl.Outcome(found, f"{r:08d}{i:056d}", fields={"width": 640, "height": 480})
                vector = rng.standard_normal(dim).astype(np.float32)
                shard.add(item, vector / np.linalg.norm(vector))
            table = shard.table({row["path"]: n for n, row in enumerate(shard.rows)}, "bench")
            started = time.monotonic()
            cl.write_shard(work / "shards" / f"{r}.parquet", table)
            sink.commit(cl.shard_rows(table))
            spent += time.monotonic() - started
    shutil.rmtree(work, ignore_errors=True)
    return spent / (rounds * shard_size)


class _Vectors:
    """Synthetic CLIP-like vectors as a build source (what IVFIndex.build reads)."""

    def __init__(self, count: int) -> None:
        import numpy as np

        from tests.clipvectors import ClipLike

        self._vectors = ClipLike(count, seed=1).vectors()
        self._ids = np.arange(count, dtype=np.int64) * 2 + 1

    def count(self) -> int:
        return len(self._ids)

    def ids(self):
        return self._ids

    def vectors(self, wanted):
        import numpy as np

        wanted = np.asarray(wanted, np.int64)
        rows = (wanted - 1) // 2
        keep = (rows >= 0) & (rows < len(self._ids))
        return wanted[keep], self._vectors[rows[keep]]

    def iter_vectors(self, batch: int = 10_000):
        for start in range(0, len(self._ids), batch):
            yield self._ids[start : start + batch], self._vectors[start : start + batch]


def build_figures(count: int) -> dict:
    """The ivf build of ``count`` vectors: one process, from parts encoded here (timed,
    for the split), and from parts encoded by Ray tasks; all three the same index."""
    import ray

    from indexer.ingest.cluster import RayParts
    from indexer.store.ivf import IVFIndex, encode_part

    source = _Vectors(count)
    started = time.monotonic()
    local = IVFIndex.build(source)
    serial = time.monotonic() - started

    encoding = []

    def timed_parts(job, batches):
        for ids, vectors in batches:
            began = time.monotonic()
            part = encode_part(job, ids, vectors)
            encoding.append(time.monotonic() - began)
            yield part

    started = time.monotonic()
    here = IVFIndex.build(source, parts=timed_parts)
    in_parts = time.monotonic() - started
    parts = RayParts(ray)
    started = time.monotonic()
    sharded = IVFIndex.build(source, parts=parts)
    on_ray = time.monotonic() - started
    same = all(
        (one.params, one.ids().tolist()) == (local.params, local.ids().tolist())
        for one in (here, sharded)
    )
    return {
        "vectors": count,
        "nlist": local.nlist,
        "nprobe": local.nprobe,
        "serial": serial,
        "in_parts": in_parts,
        "on_ray": on_ray,
        "encoding": sum(encoding),
        "parts": parts.count,
        "same": same,
        "cpus": int(ray.cluster_resources().get("CPU", 1)),
    }


def print_build(figures: dict) -> None:
    coordinator = max(0.0, figures["in_parts"] - figures["encoding"])
    print(
        f"\nivf index build, {figures['vectors']:,} vectors (nlist {figures['nlist']}, "
        f"nprobe {figures['nprobe']}), {figures['parts']} parts, same index: {figures['same']}"
    )
    print(f"  one process (local build)          {figures['serial']:7.1f} s")
    print(f"  from parts, encoded here            {figures['in_parts']:7.1f} s")
    print(f"  from parts on Ray ({figures['cpus']} CPU tasks)     {figures['on_ray']:7.1f} s")
    print(
        f"  split: coordinator (sample, train, merge, tune) {coordinator:.1f} s, "
        f"encoding {figures['encoding']:.1f} s on one CPU"
    )
    ideal = coordinator + figures["encoding"] / figures["cpus"]
    print(
        f"  Ray's own cost here (task start-up, transfers): {figures['on_ray'] - ideal:+.1f} s "
        f"over coordinator + encoding / {figures['cpus']}"
    )
    print("projection (coordinator + encoding / N, Ray's own cost left out):")
    print(f"{'workers':>8} {'build s':>9} {'vs local':>9}")
    for n in (1, 2, 4, 8, 16, 32, 64):
        projected = coordinator + figures["encoding"] / n
        print(f"{n:>8} {projected:9.1f} {figures['serial'] / projected:8.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--build-vectors", type=int, default=100_000)
    parser.add_argument("--weights")
    parser.add_argument("--cache-dir", help="ONNX export cache (default: a fresh one)")
    parser.add_argument("--workdir")
    args = parser.parse_args()

    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="clipdex-bench-ray-"))
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    rounds = ingest_rounds(args, work) if args.rounds else []
    build = build_figures(args.build_vectors) if args.build_vectors else None
    ray.shutdown()
    if rounds:
        print_ingest(args, rounds, commit_cost(args.shard_size))
    if build:
        print_build(build)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def ingest_rounds(args, work: Path) -> list[dict]:
    """(local, ray) results per round; the order alternates (the machine's load drifts)."""
    from indexer.ingest.cluster import ClusterOptions
    from retrieval.collection import EncoderLoader

    folder = make_folder(work / "photos", args.files)
    cache = Path(args.cache_dir) if args.cache_dir else work / "cache"
    loader = EncoderLoader(weights_file(args, work), "cpu", "onnx", cache)
    loader()  # the one-time ONNX export, outside both timings
    cluster = ClusterOptions(
        "local", shard_size=args.shard_size, actors=1, cpus_per_actor=args.workers
    )
    rounds = []
    for r in range(args.rounds):
        pair = {}
        for name in ("local", "ray") if r % 2 == 0 else ("ray", "local"):
            library = work / f"{name}-{r}"
            on_cluster = cluster if name == "ray" else None
            pair[name] = run(folder, library, loader, args.workers, on_cluster)
        rounds.append(pair)
    return rounds


def print_ingest(args, rounds: list[dict], per_file: float) -> None:
    print(f"{args.files} photos, {args.workers} CPUs each way, shard {args.shard_size} files")
    print(f"{'round':<6} {'path':<6} {'seconds':>8} {'img/s':>7} {'steady img/s':>13}")
    for r, pair in enumerate(rounds):
        for name in ("local", "ray"):
            result = pair[name]
            print(
                f"{r:<6} {name:<6} {result['seconds']:8.1f} {result['rate']:7.2f} "
                f"{result['steady_rate']:13.2f}"
            )
    steady = _median(p["ray"]["steady_rate"] / p["local"]["steady_rate"] for p in rounds)
    whole = statistics.median(p["ray"]["rate"] / p["local"]["rate"] for p in rounds)
    print(f"engine overhead end to end: {1 - whole:+.1%} (median of rounds; target <= 15%)")
    print(f"engine overhead at steady state (first commit to last): {1 - steady:+.1%}")
    limit = 1 / per_file
    print(f"coordinator commit: {per_file * 1e3:.2f} ms/file -> at most {limit:,.0f} img/s")
    per_worker = _median(p["ray"]["steady_rate"] for p in rounds)
    if per_worker != per_worker:  # NaN: too few shards for a steady rate
        per_worker = statistics.median(p["ray"]["rate"] for p in rounds)
    print(f"\nprojection from {per_worker:.2f} img/s per {args.workers}-CPU worker:")
    print(f"{'workers':>8} {'img/s':>10} {'1M photos':>12} {'10M photos':>12}")
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        rate = min(n * per_worker, limit)
        print(f"{n:>8} {rate:10.1f} {_days(1e6 / rate):>12} {_days(1e7 / rate):>12}")


def _median(values) -> float:
    """The median of the values that are numbers (NaN when none is)."""
    known = [v for v in values if v == v]
    return statistics.median(known) if known else float("nan")


def _days(seconds: float) -> str:
    return f"{seconds / 86400:.1f} d" if seconds >= 86400 else f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    main()
