"""Warm text query end to end: the same search at 10k and at 1M photos, same run.

What a user's ``clipdex search "a dog"`` runs once the process is warm (library open, index
loaded, caches filled), minus the text encoder: a fixed query vector (tests/clipvectors.py's
text-like queries) with the parsed terms of a word query, through ``SearchEngine.search``
with the default options (fusion with the stored words, no cut-off, the first 20; ``--cutoff
auto`` times the auto cut-off instead). Rounds alternate between the libraries so machine
drift hits both alike; p50/p99 per library and the ratio of the p50s (issue 10's target:
1M <= 1.2x 10k).

``--weights CHECKPOINT`` (the libraries' own, e.g. ``LIBS/weights/random.pt``) also times
the whole warm query with the text tower: ``Collection.search(text)`` as ``clipdex serve``
answers it (ONNX text encoder on the CPU, a different text each query so nothing is cached),
the same texts at both sizes; the engine-only and the with-encoder ratios are printed side by
side.

``--steps`` prints where the engine's time goes at each size, side by side: the p50 per
query of each step (the word search, the background of the fusion or cut-off, the vector
search and, for an ivf index, its list scan and its re-rank's catalog read, the rows, the
snippets), timed around the product's own functions in a further interleaved run.
``--profile`` adds a cProfile of the largest library's queries.

Libraries: ``bench/bench_library_scale.py`` builds them (``--libs`` folder with
``library_10000`` and ``library_1000000``); they are opened read-only, nothing is written.
Example: ``python bench/bench_warm_query.py --libs /work/bench-libs2``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import retrieval.search.engine as engine_module  # noqa: E402
import retrieval.search.fusion as fusion_module  # noqa: E402
from indexer.store import ivf as ivf_module  # noqa: E402
from indexer.store.catalog_reader import CatalogReader  # noqa: E402
from indexer.store.library import Library  # noqa: E402
from indexer.store.segments import SegmentedStore  # noqa: E402
from indexer.store.vectors import set_search_threads  # noqa: E402
from retrieval.search.engine import SearchEngine  # noqa: E402
from retrieval.search.options import SearchOptions  # noqa: E402
from retrieval.search.query import parse_query  # noqa: E402
from tests.clipvectors import ClipLike  # noqa: E402

WORDS = ("a dog", "beach at sunset", "red car", "birthday cake", "mountain lake")
WARM_UP = 5  # untimed queries per library first: model, index, caches, the cut-off's sample
# --steps: (label, owner, attribute) of the functions timed; an indented label is part of the
# one above it. "ivf: list scan" is the ivf search minus its re-rank and top rows.
STEPS = (
    ("refresh (a newer checkpoint?)", Library, "refresh"),
    ("word search (FTS5, bm25)", CatalogReader, "text_search"),
    ("background (fusion's bulk)", fusion_module, "_bulk"),
    ("vector search (base + delta)", SegmentedStore, "search"),
    ("vector range search (cut-off)", SegmentedStore, "range_search"),
    ("  ivf search (scan + re-rank)", ivf_module.IVFIndex, "search"),
    ("  ivf range search", ivf_module.IVFIndex, "range_search"),
    ("    re-rank: catalog read", ivf_module, "_exact_scores"),
    ("    top rows", ivf_module, "_top_rows"),
    ("word hits' cosines", fusion_module, "_cosines"),
    ("rows (get_images)", CatalogReader, "get_images"),
    ("snippets", engine_module, "add_snippets"),
)


def open_engine(root: Path) -> SearchEngine:
    """A read-only library and its engine (no encoder: the vectors are given)."""
    library = Library.open(root, read_only=True)
    return SearchEngine(library, lambda: None)


def one_query(engine: SearchEngine, vector: np.ndarray, text: str, options: SearchOptions) -> float:
    started = time.perf_counter()
    engine.search(vector, options, parse_query(text))
    return time.perf_counter() - started


def one_text_query(collection, text: str) -> float:
    started = time.perf_counter()
    collection.search(text)
    return time.perf_counter() - started


def interleaved(
    targets: dict[int, object], queries: list, timed: Callable[[object, object], float]
) -> dict[int, list[float]]:
    """Seconds per query and library (``timed(target, query)``) after ``WARM_UP`` untimed
    ones; each query runs on every library in turn, so machine drift hits all alike."""
    for target in targets.values():
        for query in queries[:WARM_UP]:
            timed(target, query)
    times = {size: [] for size in targets}
    for query in queries[WARM_UP:]:
        for size, target in targets.items():
            times[size].append(timed(target, query))
    return times


def time_with_encoder(args, sizes: list[int]) -> dict[int, list[float]]:
    """Warm ``Collection.search(text)`` per library, one shared ONNX text encoder."""
    from retrieval.collection import Collection, EncoderLoader

    encoder = EncoderLoader(args.weights, "cpu", "onnx", args.cache_dir)()
    collections = {
        size: Collection.open(args.libs / f"library_{size}", encoder=encoder, read_only=True)
        for size in sizes
    }
    texts = [f"{WORDS[i % len(WORDS)]} {i}" for i in range(args.queries + WARM_UP)]
    return interleaved(collections, texts, one_text_query)


@contextlib.contextmanager
def timed_steps(spent: dict[str, float]):
    """Inside the block, each function of ``STEPS`` adds its seconds to ``spent[label]``."""

    def timed(function, label):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + time.perf_counter() - started

        return wrapper

    originals = [(owner, name, getattr(owner, name)) for _, owner, name in STEPS]
    try:
        for label, owner, name in STEPS:
            setattr(owner, name, timed(getattr(owner, name), label))
        yield
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


def time_steps(engines: dict, queries: list, options: SearchOptions) -> dict:
    """p50 ms per query of each step at each size (an interleaved run of its own)."""
    spent: dict[str, float] = {}
    per_query: dict[int, list[dict]] = {size: [] for size in engines}

    def one(engine, query):
        spent.clear()
        seconds = one_query(engine, *query, options)
        size = next(s for s, e in engines.items() if e is engine)
        per_query[size].append({**spent, "whole query": seconds})
        return seconds

    with timed_steps(spent):
        interleaved(engines, queries, one)
    table = {}
    for label in [label for label, _, _ in STEPS] + ["whole query"]:
        row = {
            size: 1000 * float(np.median([q.get(label, 0.0) for q in rows[WARM_UP:]]))
            for size, rows in per_query.items()
        }
        if any(row.values()):
            table[label] = row
    scans = {}
    for size in engines:
        scan = [
            q.get("  ivf search (scan + re-rank)", 0.0)
            - q.get("    re-rank: catalog read", 0.0)
            - q.get("    top rows", 0.0)
            for q in per_query[size][WARM_UP:]
        ]
        scans[size] = 1000 * float(np.median(scan))
    if any(scans.values()):
        table["    list scan (FAISS)"] = scans
    sizes = list(engines)
    print("where the engine's time goes, p50 ms per query: " + " | ".join(f"{s:,}" for s in sizes))
    for label, row in table.items():
        print(f"  {label:34s}" + "".join(f"{row[s]:>10.2f}" for s in sizes))
    return table


def report(label: str, times: dict[int, list[float]]) -> dict:
    """p50/p99 per size and the ratio of the p50s, printed and returned."""
    figures = {}
    for size, values in times.items():
        ms = np.asarray(values) * 1000
        figures[size] = {
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
        }
        print(
            f"{label}: {size:>9,} photos: warm text query p50 {figures[size]['p50_ms']:.1f} ms, "
            f"p99 {figures[size]['p99_ms']:.1f} ms"
        )
    small, large = min(times), max(times)
    ratio = figures[large]["p50_ms"] / figures[small]["p50_ms"]
    print(f"{label}: ratio {large:,} / {small:,} (p50): {ratio:.2f}x (target <= 1.2x)")
    return {"sizes": figures, "ratio_p50": ratio}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--libs", type=Path, default=Path("/work/bench-libs2"))
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--queries", type=int, default=40, help="timed queries per library")
    parser.add_argument("--threads", type=int, default=1, help="FAISS search threads")
    parser.add_argument("--cutoff", choices=("auto",), help="time the auto cut-off's path")
    parser.add_argument("--steps", action="store_true", help="p50 ms of each step, each size")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--weights", type=Path, help="also time queries with the text tower")
    parser.add_argument("--cache-dir", type=Path, help="ONNX export cache (with --weights)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    set_search_threads(args.threads)
    engines = {}
    for size in sizes:
        started = time.perf_counter()
        engines[size] = open_engine(args.libs / f"library_{size}")
        index = engines[size].library.index  # load it: the process is warm
        facts = index.describe() if hasattr(index, "describe") else {}
        print(
            f"library_{size}: opened in {time.perf_counter() - started:.1f}s, index "
            + ", ".join(
                f"{k} {facts[k]}" for k in ("kind", "codes", "nlist", "nprobe") if k in facts
            ),
            flush=True,
        )
    # The generator of the libraries (bench_library_scale: ClipLike(count), seed 0): queries
    # across the modality gap from the largest library's topics.
    vectors = ClipLike(max(sizes), seed=0).text_queries(args.queries + WARM_UP, seed=31)
    texts = [WORDS[i % len(WORDS)] for i in range(len(vectors))]
    queries = list(zip(vectors, texts))
    options = SearchOptions(cutoff=args.cutoff)
    times = interleaved(engines, queries, lambda engine, query: one_query(engine, *query, options))
    results = {"engine": report("engine only", times)}
    if args.steps:
        results["steps_p50_ms"] = time_steps(engines, queries, options)
    if args.weights:
        results["with_text_tower"] = report("with text tower", time_with_encoder(args, sizes))
    large = max(sizes)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for vector, text in queries[WARM_UP:]:
            one_query(engines[large], vector, text, options)
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(30)
        print(out.getvalue())
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
