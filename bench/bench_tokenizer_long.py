"""Long words: the heap BPE against the plain loop, same run, same words (issue 14).

    .venv/bin/python bench/bench_tokenizer_long.py [--lengths 1000 4000 20000]

Prints, per word length, the seconds of each path and their ratio, and checks that both
give the same ids. The plain loop is O(n^2) (20,000 letters: ~16 s on a 2-core EPYC);
the heap is O(n log n).
"""

from __future__ import annotations

import argparse
import copy
import random
import time

from indexer.model import tokenizer as tokenizer_module
from indexer.model.tokenizer import Tokenizer


def timed_ids(tokenizer: Tokenizer, text: str, long_word: int) -> tuple[float, list[int]]:
    """Seconds and ids of ``text`` with words over ``long_word`` symbols on the heap path."""
    saved = tokenizer_module._LONG_WORD
    twin = copy.copy(tokenizer)
    twin._cache = {}
    try:
        tokenizer_module._LONG_WORD = long_word
        started = time.perf_counter()
        ids = twin.encode(text).tolist()
        return time.perf_counter() - started, ids
    finally:
        tokenizer_module._LONG_WORD = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1000, 4000, 8000])
    args = parser.parse_args()
    tokenizer = Tokenizer.load()
    rng = random.Random(14)
    print(f"{'letters':>8} {'plain s':>9} {'heap s':>9} {'ratio':>7}")
    for length in args.lengths:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))
        plain_s, plain = timed_ids(tokenizer, word, 10**9)
        heap_s, heap = timed_ids(tokenizer, word, 0)
        assert plain == heap, f"ids differ at {length} letters"
        print(f"{length:>8} {plain_s:>9.3f} {heap_s:>9.3f} {plain_s / heap_s:>7.1f}")


if __name__ == "__main__":
    main()
