"""How do the vector index kinds scale? exact (flat), ivf (ours: RaBitQ codes, and sq8 codes
beside them as ``ivf-sq8``) and FAISS HNSW, same run.

Synthetic CLIP-like vectors (tests/clipvectors.py: a shared component, Zipf-sized topics,
anisotropic spread, ~5% near-copies in bursts, unit length; not uniform noise), with image-
like and text-like queries (the text ones across a modality gap, best matches ~0.4). Ground
truth: exact search over the same vectors. Per size and kind:

- build time (ivf: sample, train, add, tune nprobe; HNSW: time-boxed, see ``--hnsw-max``);
- recall@10 and recall@1 vs exact, and the largest error of a returned score;
- p50 / p99 single-query latency (one thread, one query at a time, as the server runs);
- resident memory of the index (its serialised size: what a process holds) and bytes per
  photo of the index file on disk;
- add 10k photos, delete 10k photos (index time only; the catalog's cost is the same for
  every kind); ivf: a compaction's fold of 10k added and 10k deleted into a new base (a copy
  of the codes, the 10k encoded against the trained centroids), beside its full build;
- duplicates at 0.95: ivf through its lists (near_pairs, whole library; at sizes up to
  ``DUP_TRUTH_MAX`` also its recall of the true pairs, from an exact range search of every
  photo); exact by range search per photo, timed on a sample and scaled to the library
  (all pairs: O(n^2)).

The process's peak resident memory is printed after each kind (a running maximum).

The ivf kind re-ranks from an in-memory copy of the vectors here; in a library it reads them
from the catalog: ``catalog fetch`` times that read (42 random vectors, the re-rank of a
top-10, from a catalog of ``--catalog-size`` photos) so it can be added to the ivf latency.
10M is projected from the largest measured size with the stated per-kind exponents.

Quick check: ``python bench/bench_scale.py --quick``; full: ``python bench/bench_scale.py``
(100k and 1M; about ten minutes and ~6 GB of memory on a 2-core machine);
``--json FILE`` keeps the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import faiss  # noqa: E402

from indexer.store import ivf as ivf_module  # noqa: E402
from indexer.store.ivf import IVFIndex  # noqa: E402
from indexer.store.vectors import VectorIndex, set_search_threads  # noqa: E402
from tests.clipvectors import ArraySource, ClipLike  # noqa: E402

QUERIES = 100  # per query type (image-like, text-like)
CHANGE = 10_000  # photos added / deleted
EXACT_DUP_SAMPLE = 50  # photos whose range search is timed for the exact kind
DUP_TRUTH_MAX = 100_000  # the true pairs (an exact range search of every photo) up to this
EXACT_LATENCY_QUERIES = 40  # the exact kind's answers are the truth: timed on a subset


# -- measuring ------------------------------------------------------------------------------
def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)]))


def latencies(search, queries: np.ndarray) -> tuple[float, float, np.ndarray]:
    """p50, p99 (ms) of one query at a time, and the ids found."""
    times, found = [], []
    for query in queries:
        started = time.perf_counter()
        _, ids = search(query[None])
        times.append(time.perf_counter() - started)
        found.append(ids[0])
    times_ms = np.asarray(times) * 1000
    return float(np.percentile(times_ms, 50)), float(np.percentile(times_ms, 99)), np.vstack(found)


def file_bytes(save) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "vectors.1.faiss"
        save(path)
        return path.stat().st_size


def timed(call):
    started = time.perf_counter()
    result = call()
    return time.perf_counter() - started, result


def score_error(scores: np.ndarray, ids: np.ndarray, queries: np.ndarray, vectors) -> float:
    """Largest |returned score - exact cosine| over the returned (id >= 0) hits."""
    worst = 0.0
    for row, query in enumerate(queries):
        keep = ids[row] >= 0
        exact = vectors[ids[row][keep]] @ query
        worst = max(worst, float(np.max(np.abs(exact - scores[row][keep]), initial=0.0)))
    return worst


def true_pairs(vectors: np.ndarray, radius: float) -> set[tuple[int, int]]:
    """Every pair (i < j) of rows scoring above ``radius``: an exact range search."""
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    pairs: set[tuple[int, int]] = set()
    for start in range(0, len(vectors), 5_000):
        lims, _, hits = flat.range_search(vectors[start : start + 5_000], radius)
        rows = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims.astype(np.int64)))
        later = hits > rows
        pairs.update(zip(rows[later].tolist(), hits[later].tolist()))
    return pairs


def pair_recall(a: np.ndarray, b: np.ndarray, truth: set) -> float:
    found = set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))
    return len(found & truth) / max(1, len(truth))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


# -- the kinds ------------------------------------------------------------------------------
def bench_exact(vectors, queries, truth, extra) -> dict:
    n = len(vectors)
    seconds, index = timed(lambda: _exact(vectors))
    subset = np.r_[0 : EXACT_LATENCY_QUERIES // 2, QUERIES : QUERIES + EXACT_LATENCY_QUERIES // 2]
    p50, p99, _ = latencies(lambda q: index.search(q, 10), queries[subset])
    found = truth  # exact search is the ground truth
    scores, ids = index.search(queries, 10)
    size = file_bytes(index.save)
    add_s, _ = timed(lambda: index.add(np.arange(n, n + CHANGE), extra))
    delete_s, _ = timed(lambda: index.remove(np.arange(n, n + CHANGE)))
    sample = vectors[:: max(1, n // EXACT_DUP_SAMPLE)][:EXACT_DUP_SAMPLE]
    dup_s, _ = timed(lambda: index.range_search(sample, 0.95))
    return {
        "build_s": seconds,
        "recall_at_10": recall(found, truth, 10),
        "recall_at_1": recall(found, truth, 1),
        "score_error": score_error(scores, ids, queries, vectors),
        "p50_ms": p50,
        "p99_ms": p99,
        "memory_mb": size / 1e6,
        "bytes_per_photo": size / n,
        "add_10k_s": add_s,
        "delete_10k_s": delete_s,
        "duplicates_s": dup_s * n / len(sample),
        "duplicates_note": f"range search of {len(sample)} photos, scaled to {n}",
    }


def _exact(vectors) -> VectorIndex:
    index = VectorIndex()
    index.add(np.arange(len(vectors)), vectors)
    return index


def bench_ivf(
    vectors, queries, truth, extra, dup_truth=None, codes: str = ivf_module.DEFAULT_CODES
) -> dict:
    n = len(vectors)
    source = ArraySource(np.arange(n, dtype=np.int64), vectors)
    set_search_threads(os.cpu_count() or 1)  # the build uses every core, as `clipdex index`
    seconds, index = timed(lambda: IVFIndex.build(source, codes=codes))
    index.attach_source(source.vectors)
    set_search_threads(1)
    p50, p99, found = latencies(lambda q: index.search(q, 10), queries)
    scores, ids = index.search(queries, 10)
    size = file_bytes(index.save)
    index.attach_source(_with_extra(source, n, extra))  # no copy of the library's vectors
    add_s, _ = timed(lambda: index.add(np.arange(n, n + CHANGE), extra))
    delete_s, _ = timed(lambda: index.remove(np.arange(n, n + CHANGE)))
    # A compaction's fold: a new base from this one with 10k added and 10k deleted.
    fold_s, _ = timed(lambda: index.folded(np.arange(n, n + CHANGE), extra, np.arange(CHANGE)))
    index.attach_source(source.vectors)
    set_search_threads(os.cpu_count() or 1)
    dup_s, pairs = timed(lambda: index.near_pairs(0.95))
    set_search_threads(1)
    facts = index.describe()
    unique = len(set(zip(np.minimum(*pairs[:2]).tolist(), np.maximum(*pairs[:2]).tolist())))
    note = f"whole library through the lists: {unique} pairs"
    if dup_truth is not None:
        note += f", recall {pair_recall(pairs[0], pairs[1], dup_truth):.4f} of {len(dup_truth)}"
    return {
        "build_s": seconds,
        "recall_at_10": recall(found, truth, 10),
        "recall_at_1": recall(found, truth, 1),
        "score_error": score_error(scores, ids, queries, vectors),
        "p50_ms": p50,
        "p99_ms": p99,
        "memory_mb": size / 1e6,
        "bytes_per_photo": size / n,
        "add_10k_s": add_s,
        "delete_10k_s": delete_s,
        "fold_10k_s": fold_s,
        "duplicates_s": dup_s,
        "duplicates_note": note,
        "codes": facts["codes"],
        "nlist": facts["nlist"],
        "nprobe": facts["nprobe"],
        "tuned_recall_at_10": facts.get("recall_at_10"),
        "code_score_error": facts.get("score_error"),
    }


def _with_extra(source: ArraySource, n: int, extra: np.ndarray):
    """A fetch over the library's vectors (ids 0..n-1) and ``extra`` (ids n...)."""

    def fetch(wanted):
        wanted = np.asarray(wanted, np.int64)
        old, new = wanted[wanted < n], wanted[(wanted >= n) & (wanted < n + len(extra))]
        found, vectors = source.vectors(old)
        return np.concatenate([found, new]), np.vstack([vectors, extra[new - n]])

    return fetch


def bench_hnsw(vectors, queries, cap: int) -> dict:
    """HNSW (M=32) on the first ``cap`` vectors (time-boxed), efSearch raised until
    recall@10 >= 0.98; build time and memory scaled to the whole library."""
    n = len(vectors)
    m = min(n, cap)
    part = vectors[:m]
    _, truth = _exact(part).search(queries, 10)
    index = faiss.IndexHNSWFlat(part.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    set_search_threads(os.cpu_count() or 1)
    seconds, _ = timed(lambda: index.add(part))
    set_search_threads(1)
    chosen = None
    for ef in (16, 32, 64, 128, 256, 512):
        index.hnsw.efSearch = ef
        p50, p99, found = latencies(lambda q: index.search(q, 10), queries)
        chosen = (ef, p50, p99, recall(found, truth, 10), recall(found, truth, 1))
        if chosen[3] >= 0.98:
            break
    ef, p50, p99, r10, r1 = chosen
    size = file_bytes(lambda path: faiss.write_index(index, str(path)))
    scale = n / m * (math.log(n) / math.log(m) if m > 1 and n > m else 1.0)
    return {
        "build_s": seconds * scale,
        "build_note": f"built on {m} photos in {seconds:.1f}s"
        + (", scaled by n log n" if n > m else ""),
        "recall_at_10": r10,
        "recall_at_1": r1,
        "score_error": 0.0,  # full vectors: its scores are exact
        "p50_ms": p50,
        "p99_ms": p99,
        "latency_note": f"efSearch {ef}, measured on {m} photos",
        "memory_mb": size / m * n / 1e6,
        "bytes_per_photo": size / m,
    }


def catalog_fetch_ms(size: int) -> tuple[float, float]:
    """p50 of reading 42 random vectors from a catalog of ``size`` photos (the ivf re-rank
    of a top-10 in a library)."""
    from indexer.model.identity import ModelIdentity
    from indexer.store.catalog import ImageRecord
    from indexer.store.catalog_reader import CatalogReader
    from indexer.store.library import Library

    vectors = ClipLike(size, seed=5).vectors()
    with tempfile.TemporaryDirectory() as folder:
        with Library.open(Path(folder) / "lib", create=True) as library:
            library.bind_model(ModelIdentity(weights="fake"))
            for start in range(0, size, 5_000):
                records = [
                    ImageRecord(f"/p/{i}.jpg", 1, 1, f"{i:064x}", vectors[i], 64, 48, "JPEG")
                    for i in range(start, min(size, start + 5_000))
                ]
                library.catalog.commit_batch(records)
        reader = CatalogReader(Library.catalog_path(Path(folder) / "lib"))
        rng = np.random.default_rng(0)
        times = []
        for _ in range(200):
            wanted = rng.integers(1, size + 1, 42)
            started = time.perf_counter()
            reader.vectors(wanted)
            times.append(time.perf_counter() - started)
        catalog_bytes = Library.catalog_path(Path(folder) / "lib").stat().st_size
        reader.close()
    return float(np.percentile(np.asarray(times) * 1000, 50)), catalog_bytes / size


# -- the run --------------------------------------------------------------------------------
def run_size(n: int, hnsw_cap: int, kinds: list[str]) -> dict:
    print(f"\n== {n:,} photos ==", flush=True)
    generator = ClipLike(n, seed=0)
    seconds, vectors = timed(generator.vectors)
    print(f"generated in {seconds:.1f}s", flush=True)
    queries = np.vstack([generator.image_queries(QUERIES), generator.text_queries(QUERIES)])
    extra = ClipLike(CHANGE, seed=99).vectors()
    set_search_threads(os.cpu_count() or 1)
    _, truth = _exact(vectors).search(queries, 10)
    dup_truth = None
    if n <= DUP_TRUTH_MAX and any(kind.startswith("ivf") for kind in kinds):
        seconds, dup_truth = timed(lambda: true_pairs(vectors, 0.95))
        print(f"true pairs above 0.95: {len(dup_truth)} ({seconds:.0f}s)", flush=True)
    rows = {}
    for kind in kinds:
        started = time.perf_counter()
        if kind == "exact":
            rows[kind] = bench_exact(vectors, queries, truth, extra)
        elif kind == "ivf":  # the default codes (what a new index uses)
            rows[kind] = bench_ivf(vectors, queries, truth, extra, dup_truth)
        elif kind.startswith("ivf-"):  # another code kind beside it: ivf-sq8
            rows[kind] = bench_ivf(vectors, queries, truth, extra, dup_truth, codes=kind[4:])
        elif kind == "hnsw":
            rows[kind] = bench_hnsw(vectors, queries, hnsw_cap)
        rows[kind]["peak_rss_gb"] = peak_rss_gb()
        print(
            f"{kind}: {time.perf_counter() - started:.0f}s, process peak {peak_rss_gb():.1f} GB",
            flush=True,
        )
        set_search_threads(os.cpu_count() or 1)
    return rows


# How each figure grows with n, to project 10M from the largest measured size.
EXPONENTS = {
    "exact": {"build_s": 1.0, "p50_ms": 1.0, "p99_ms": 1.0, "memory_mb": 1.0, "duplicates_s": 2.0},
    # nlist ~ sqrt(n): assignment n*sqrt(n); a query scans nprobe lists of ~sqrt(n) codes;
    # near_pairs compares within lists: n * sqrt(n).
    "ivf": {"build_s": 1.5, "p50_ms": 0.5, "p99_ms": 0.5, "memory_mb": 1.0, "duplicates_s": 1.5},
    "ivf-sq8": {
        "build_s": 1.5,
        "p50_ms": 0.5,
        "p99_ms": 0.5,
        "memory_mb": 1.0,
        "duplicates_s": 1.5,
    },
    "hnsw": {"build_s": 1.1, "p50_ms": 0.2, "p99_ms": 0.2, "memory_mb": 1.0},
}


def project(rows: dict, n: int, target: int) -> dict:
    out = {}
    for kind, row in rows.items():
        factor = target / n
        out[kind] = {
            key: row[key] * factor**exponent
            for key, exponent in EXPONENTS.get(kind, {}).items()
            if key in row
        }
        out[kind]["bytes_per_photo"] = row["bytes_per_photo"]
    return out


COLUMNS = [
    ("build_s", "build s", "{:.1f}"),
    ("recall_at_10", "R@10", "{:.3f}"),
    ("recall_at_1", "R@1", "{:.3f}"),
    ("score_error", "score err", "{:.1e}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("memory_mb", "mem MB", "{:.0f}"),
    ("bytes_per_photo", "B/photo", "{:.0f}"),
    ("add_10k_s", "add 10k s", "{:.2f}"),
    ("delete_10k_s", "del 10k s", "{:.2f}"),
    ("fold_10k_s", "fold 10k s", "{:.1f}"),
    ("duplicates_s", "dups s", "{:.0f}"),
]


def print_table(title: str, rows: dict) -> None:
    print(f"\n{title}")
    print(f"{'kind':8}" + "".join(f"{label:>11}" for _, label, _ in COLUMNS))
    for kind, row in rows.items():
        cells = [fmt.format(row[key]) if key in row else "-" for key, _, fmt in COLUMNS]
        print(f"{kind:8}" + "".join(f"{cell:>11}" for cell in cells))
    for kind, row in rows.items():
        for key in ("build_note", "latency_note", "duplicates_note"):
            if key in row:
                print(f"  {kind} {key.split('_')[0]}: {row[key]}")
        if "nlist" in row:
            print(
                f"  {kind}: {row['codes']} codes, nlist {row['nlist']}, nprobe {row['nprobe']}"
                f" (tuned recall@10 "
                f"{row['tuned_recall_at_10']}, code score error {row['code_score_error']})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated sizes")
    parser.add_argument("--quick", action="store_true", help="one small size (20k), fast")
    parser.add_argument(
        "--kinds", default="exact,ivf,ivf-sq8,hnsw", help="ivf: default codes; ivf-sq8: sq8"
    )
    parser.add_argument(
        "--hnsw-max",
        type=int,
        default=100_000,
        help="HNSW is built on at most this many photos (time box)",
    )
    parser.add_argument("--catalog-size", type=int, default=100_000)
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    sizes = [20_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    catalog_size = 10_000 if args.quick else args.catalog_size
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    print(
        f"bench_scale: sizes {sizes}, kinds {kinds}, {os.cpu_count()} cores, "
        f"faiss {faiss.__version__}, recall target {ivf_module.RECALL_TARGET}"
    )
    figures: dict = {"sizes": {}, "machine": {"cores": os.cpu_count()}}
    for n in sizes:
        rows = run_size(n, args.hnsw_max, kinds)
        figures["sizes"][str(n)] = rows
        print_table(f"{n:,} photos (measured)", rows)
    fetch_ms, catalog_per_photo = catalog_fetch_ms(catalog_size)
    figures["catalog"] = {
        "fetch_42_p50_ms": fetch_ms,
        "bytes_per_photo": catalog_per_photo,
        "size": catalog_size,
    }
    print(
        f"\ncatalog ({catalog_size:,} photos): re-rank fetch of 42 vectors p50 "
        f"{fetch_ms:.2f} ms; catalog {catalog_per_photo:.0f} B/photo (vector + metadata), "
        "the same for every kind: a library is catalog + index file"
    )
    for n in sizes:
        for kind, row in figures["sizes"][str(n)].items():
            if kind.startswith("ivf"):
                print(
                    f"{n:,} {kind}: p50 with the catalog re-rank fetch ~"
                    f"{row['p50_ms'] + fetch_ms:.2f} ms (index p50 + fetch p50)"
                )
    largest = max(sizes)
    if largest < 10_000_000:
        projected = project(figures["sizes"][str(largest)], largest, 10_000_000)
        figures["projected_10M"] = projected
        print_table(
            f"10,000,000 photos (projected from {largest:,}; exponents in the source)", projected
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    main()
