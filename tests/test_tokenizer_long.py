"""Long words: the heap BPE gives today's ids, id for id, with bounded work (issue 14).

A 20,000-letter word used to cost ~16 s of tokenising: the plain BPE loop scans the whole
word once per merge. Words over ``_LONG_WORD`` symbols now take :func:`merge_by_rank`;
these tests hold it to the plain loop (copied here as the reference, so a change to the
tokenizer cannot move both sides) and count its work in rank look-ups, not seconds.
"""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from indexer.model import tokenizer as tokenizer_module
from indexer.model.tokenizer import CONTEXT_LENGTH, Tokenizer, merge_by_rank


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load()


def reference_pieces(word: list[str], rank_of) -> list[str]:
    """The BPE loop as it was before issue 14: lowest rank first, every occurrence."""
    while len(word) > 1:
        ranked = [(rank_of(a, b), a, b) for a, b in itertools.pairwise(word)]
        rank, first, second = min((math.inf if r is None else r, a, b) for r, a, b in ranked)
        if rank == math.inf:
            break
        merged, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def symbols_of(tokenizer: Tokenizer, word: str) -> list[str]:
    """A pre-tokenized word as the BPE sees it: byte symbols, ``</w>`` on the last."""
    symbols = word.encode("utf-8").decode("latin-1").translate(tokenizer._to_alphabet)
    return [*symbols[:-1], symbols[-1] + "</w>"]


# Alphabets that make many merges compete: vowels, repeats, digits, punctuation, accents.
ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz",
    "aeiou",
    "ab",
    "aaaab",
    "est",
    "ing",
    "0123",
    "!?.,",
    "éèàü",
]
words = st.sampled_from(ALPHABETS).flatmap(
    lambda letters: st.text(alphabet=letters, min_size=1, max_size=300)
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(word=words)
def test_heap_bpe_matches_the_plain_loop(tokenizer, word):
    symbols = symbols_of(tokenizer, word)
    pieces = [piece for piece, _ in merge_by_rank(symbols, tokenizer._rank)]
    assert pieces == reference_pieces(symbols, tokenizer._rank)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(word=words, prefix=st.sampled_from(["", "a photo of ", "2 dogs & "]))
def test_long_and_short_paths_give_the_same_ids(tokenizer, word, prefix):
    """Through ``encode``: the heap path (every word long) equals the plain path (none)."""
    text = prefix + word
    saved = tokenizer_module._LONG_WORD
    try:
        tokenizer_module._LONG_WORD = 0
        heap = _unmemoised(tokenizer).encode(text)
        tokenizer_module._LONG_WORD = 10**9
        plain = _unmemoised(tokenizer).encode(text)
    finally:
        tokenizer_module._LONG_WORD = saved
    assert heap.tolist() == plain.tolist()


def _unmemoised(tokenizer: Tokenizer) -> Tokenizer:
    twin = copy.copy(tokenizer)
    twin._cache = {}
    return twin


def test_merge_ranks_give_the_merged_tokens_ids(tokenizer):
    """Each piece's rank is the merge that made it, so its id is 512 + rank."""
    merges = list(tokenizer._ranks)  # in rank order
    symbols = symbols_of(tokenizer, "photographers" * 10)
    pieces = merge_by_rank(symbols, tokenizer._rank)
    assert any(rank is not None for _, rank in pieces)
    for piece, rank in pieces:
        if rank is not None:
            assert merges[rank].replace(" ", "") == piece


def _word(length: int, seed: int = 14) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length))


def test_a_20000_letter_word_does_linear_work(tokenizer):
    """Rank look-ups: at most one per heap entry, entries <= (n - 1) + 2 * merges < 3n.
    The plain loop asks ~n per merge: about n^2 / 2 (2e8 here)."""
    symbols = symbols_of(tokenizer, _word(20_000))
    asked = 0

    def counting(first: str, second: str):
        nonlocal asked
        asked += 1
        return tokenizer._rank(first, second)

    pieces = merge_by_rank(symbols, counting)
    assert asked < 3 * len(symbols)
    assert 1 <= len(pieces) <= len(symbols)


def test_long_words_are_not_memoised(tokenizer):
    long_word = _word(5_000, seed=3)
    tokenizer.encode(long_word)
    assert all(len(key) <= tokenizer_module._LONG_WORD for key in tokenizer._cache)


def test_a_long_word_matches_open_clip():
    """Against open_clip itself (skipped where it is absent): 3,000 letters, several kinds."""
    open_clip = pytest.importorskip("open_clip")
    reference = open_clip.get_tokenizer("MobileCLIP-S2")
    ours = Tokenizer.load()
    texts = [_word(3_000, 1), "a photo of " + "ab" * 1500, "é" * 700 + "x", "0" * 100]
    assert ours.encode(texts).tolist() == reference(texts, context_length=CONTEXT_LENGTH).tolist()


@pytest.mark.slow
def test_a_20000_letter_word_gives_todays_ids(tokenizer):
    """The issue's word, whole: ids equal to the plain loop's (which takes ~16 s)."""
    symbols = symbols_of(tokenizer, _word(20_000))
    heap = [piece for piece, _ in merge_by_rank(symbols, tokenizer._rank)]
    assert heap == reference_pieces(symbols, tokenizer._rank)
