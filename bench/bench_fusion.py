"""What does reading words cost a query, and what does it find? Both measured in one run.

1. **Speed** (``--images``, default 100k): a synthetic library (random unit vectors) whose
   photos all have a file name and folders stored as words (as indexing does), 10% a text
   read in the photo (8-40 words from a 5,000-word Zipf vocabulary) and 5% keywords: FTS5
   over ~215k rows.
   The same warm queries, interleaved, through the library call: semantic only (the query
   vector, no terms: today's search) and fused (the same vector with its parsed terms).
   Words are drawn from the vocabulary (rare, middling and common ones), plus quoted phrases
   and ``text:``/``name:`` prefixes. Encoding the text is left out: it is the same model call
   for both. Prints p50/p90 of each and the p50 difference (issue 12: at most +20 ms).
2. **Recall@10 on rendered text** (``--rendered N``): N photos with 2-4 words drawn on them
   (tests/textphotos.py: signs, receipts, screenshots; sizes, angles, fonts, contrasts) among
   as many photos without text, indexed with ``--ocr always``; for every rendered word, the
   share of the photos showing it that the top 10 holds: fused (calibrated and RRF),
   semantic only, words only (``text:WORD``). With random weights (the default: no real
   weights here) the semantic side is noise, so the word side carries the fused recall;
   ``--weights`` runs it with real ones.

Quick check: ``python bench/bench_fusion.py --images 20000 --queries 60 --rendered 0``.
Full run: ``python bench/bench_fusion.py``.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.store.catalog import ImageRecord  # noqa: E402
from indexer.store.library import Library  # noqa: E402
from retrieval import Collection, SearchOptions  # noqa: E402
from retrieval.search.query import parse_query  # noqa: E402
from tests.conftest import FakeEncoder  # noqa: E402  (the speed part never encodes)
from tests.textfixtures import add_text  # noqa: E402

VOCABULARY = 5_000
TEXT_SHARE, KEYWORD_SHARE = 0.10, 0.05


# -- 1. speed ---------------------------------------------------------------------------------
def vocabulary(rng: random.Random) -> list[str]:
    """Pronounceable made-up words, so that no two collide."""
    syllables = [c + v for c in "bcdfghjklmnprstvz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < VOCABULARY:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def zipf_words(rng: random.Random, words: list[str], n: int) -> list[str]:
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    return rng.choices(words, weights=weights, k=n)


def build_library(root: Path, count: int, words: list[str]) -> Path:
    """``count`` synthetic photos with names, folders, some texts and keywords stored."""
    if (root / "catalog.sqlite").is_file():
        return root
    rng = np.random.default_rng(0)
    text_rng = random.Random(1)
    with Library.open(root, create=True) as library:
        for start in range(0, count, 5000):
            vectors = rng.standard_normal((min(5000, count - start), 512)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
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
            add_text(root, list(text_rows(ids, words, text_rng)))
        library.checkpoint()
    return root


def text_rows(ids: list[int], words: list[str], rng: random.Random):
    """Text read in 10% of the photos, keywords in 5% (names and folders the catalog
    stores by itself, from the paths)."""
    for image_id in ids:
        if rng.random() < TEXT_SHARE:
            yield image_id, "ocr", " ".join(zipf_words(rng, words, rng.randint(8, 40)))
        if rng.random() < KEYWORD_SHARE:
            yield image_id, "keywords", "; ".join(zipf_words(rng, words, rng.randint(1, 5)))


def speed_queries(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Single words (common to rare), two words, phrases, prefixes, a filler-word query."""
    kinds = [
        lambda: rng.choice(words[:20]),  # common: in thousands of texts
        lambda: rng.choice(words[200:1000]),
        lambda: rng.choice(words[2000:]),  # rare
        lambda: f"{rng.choice(words[:500])} {rng.choice(words[500:])}",
        lambda: f'"{rng.choice(words[:50])} {rng.choice(words[:50])}"',
        lambda: f"beach + text:{rng.choice(words[:1000])}",
        lambda: f"name:{rng.randrange(10**6):07d}",
        lambda: "a photo of the beach at sunset",
    ]
    return [kinds[i % len(kinds)]() for i in range(n)]


def timed_ms(call) -> float:
    started = time.perf_counter()
    call()
    return 1000 * (time.perf_counter() - started)


def bench_speed(root: Path, queries: list[str], options: SearchOptions) -> dict:
    rng = np.random.default_rng(2)
    plain, fused = [], []
    with Collection.open(root, encoder=FakeEncoder(), read_only=True) as photos:
        for round_ in range(2):  # the first round warms caches, the second is measured
            plain_ms, fused_ms = [], []
            for i, query in enumerate(queries):
                vector = rng.standard_normal(512).astype(np.float32)
                vector /= np.linalg.norm(vector)
                terms = parse_query(query)
                sides = [
                    (plain_ms, lambda v=vector: photos.search_vector(v, options)),
                    (fused_ms, lambda v=vector, t=terms: photos.search_vector(v, options, terms=t)),
                ]
                for times, call in sides if (i + round_) % 2 == 0 else sides[::-1]:
                    times.append(timed_ms(call))
            plain, fused = plain_ms, fused_ms
    return {"plain": plain, "fused": fused}


def describe(times: list[float]) -> str:
    ordered = sorted(times)
    p90 = ordered[int(0.9 * (len(ordered) - 1))]
    return f"p50 {statistics.median(ordered):7.2f} ms   p90 {p90:7.2f} ms"


# -- 2. recall on rendered text -----------------------------------------------------------------
def bench_recall(work: Path, count: int, weights: Path, cache: Path) -> dict | None:
    try:
        from indexer.ingest.pipeline import IndexOptions
        from tests.textphotos import make_plain_set, make_text_set

        options = IndexOptions(ocr="always")
    except (ImportError, TypeError) as exc:
        print(f"recall part skipped: this clipdex has no OCR at indexing yet ({exc})")
        return None
    made = make_text_set(work / "photos" / "text", count)
    make_plain_set(work / "photos" / "plain", count)
    from indexer.model.onnx_encoder import OnnxEncoder

    encoder = OnnxEncoder(weights, cache_dir=cache)
    with Collection.open(work / "lib-rendered", encoder=encoder) as photos:
        photos.index([work / "photos"], options)
        shows = {}
        for photo in made:
            image_id = photos.library.catalog.id_for_path(str(photo.path))
            for word in photo.words:
                shows.setdefault(word, set()).add(image_id)
        recall: dict[str, list[float]] = {}
        top = SearchOptions(k=10)
        for word, ids in shows.items():
            vector, terms = photos.query_vector(word)
            runs = {
                "fused (calibrated)": photos.search_vector(vector, top, terms=terms),
                "fused (rrf)": photos.search_vector(vector, top, terms=terms, fusion="rrf"),
                "semantic only": photos.search_vector(vector, top),
                "words only": photos.search(f"text:{word}", options=top),
            }
            for name, page in runs.items():
                found = {r.id for r in page.results} & ids
                recall.setdefault(name, []).append(len(found) / min(len(ids), 10))
    return {name: float(np.mean(values)) for name, values in recall.items()}


# -- main -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000, help="speed: library size")
    parser.add_argument("--queries", type=int, default=200, help="speed: queries per side")
    parser.add_argument("--rendered", type=int, default=40, help="recall: photos with text")
    parser.add_argument("--weights", type=Path, help="real MobileCLIP-S2 weights (recall)")
    parser.add_argument(
        "--random-checkpoint", type=Path, help="a random-weights checkpoint to use (else built)"
    )
    parser.add_argument("--cache-dir", type=Path, help="exported ONNX models (else under --work)")
    parser.add_argument("--work", type=Path, help="where libraries are built (kept)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-fusion-"))
    rng = random.Random(0)
    words = vocabulary(rng)
    if args.images:
        started = time.perf_counter()
        root = build_library(work / f"lib-{args.images}", args.images, words)
        print(f"library: {args.images} photos at {root} ({time.perf_counter() - started:.0f} s)")
        with sqlite3.connect(root / "catalog.sqlite") as db:
            rows = db.execute("SELECT count(*) FROM image_text").fetchone()[0]
        print(f"words stored: {rows} rows in FTS5")
        queries = speed_queries(words, args.queries, rng)
        for label, options in [
            ("top 20", SearchOptions(k=20)),
            ("auto cut-off", SearchOptions(k=20, cutoff="auto")),
        ]:
            times = bench_speed(root, queries, options)
            plain, fused = times["plain"], times["fused"]
            extra = statistics.median(fused) - statistics.median(plain)
            print(f"{label:>13}: semantic only {describe(plain)}")
            print(f"{'':>13}  fused         {describe(fused)}   p50 +{extra:.2f} ms")
    if args.rendered:
        weights = args.weights or args.random_checkpoint
        if weights is None:
            from bench.bench_speed import build_random_checkpoint

            weights = build_random_checkpoint(work / "weights" / "random.pt")
        cache = args.cache_dir or work / "cache"
        recall = bench_recall(work / "rendered", args.rendered, weights, cache)
        if recall:
            model = "real" if args.weights else "random (the semantic side is noise)"
            print(f"recall@10 of rendered words, {args.rendered} text photos, weights {model}:")
            for name, value in recall.items():
                print(f"  {name:<20} {value:.3f}")


if __name__ == "__main__":
    main()
