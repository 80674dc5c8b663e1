"""Torch-free CLIP text tokenizer for MobileCLIP-S2.

``open_clip.get_tokenizer('MobileCLIP-S2')`` is open_clip's ``SimpleTokenizer`` with its
defaults: OpenAI CLIP's byte-level BPE (``bpe_simple_vocab_16e6.txt.gz``, shipped in
``indexer/assets``), the ``'lower'`` clean function, no reduction mask, context length 77.
This module reproduces it id for id with stdlib, numpy, ftfy and regex only, so a text
query answered through ONNX Runtime never pays the ~8 s ``import torch, open_clip``.
ftfy (~70 ms to import) is imported only for a text it could change: plain printable
ASCII without ``&`` passes through it unchanged (tests/test_cold_query.py checks that).
"""

from __future__ import annotations

import functools
import gzip
import heapq
import html
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import regex

CONTEXT_LENGTH = 77
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_MERGE_COUNT = 49152 - 256 - 2  # open_clip reads lines 1..48894 of the merges file
_SPECIALS = ("<start_of_text>", "<end_of_text>")
# open_clip's pre-tokenizer, flags included: IGNORECASE matters for the specials and the
# contractions (e.g. U+017F "long s" case-folds to "s").
_PATTERN = regex.compile(
    "|".join(_SPECIALS) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_CACHE_LIMIT = 100_000  # words; keeps a long-running server's memo bounded
# Words longer than this (in byte symbols) take the heap BPE (O(n log n), same result as
# the plain loop, which is O(n^2)) and are not memoised (a key could be megabytes).
_LONG_WORD = 64


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, in open_clip's order (= vocabulary ids)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    rest = (b for b in range(256) if b not in table)
    table.update((b, chr(256 + n)) for n, b in enumerate(rest))
    return table


# Characters ftfy.fix_text never changes when a text holds nothing else: printable ASCII
# and the whitespace it only normalises (collapsed by clean() anyway). Not "&", which
# starts an HTML entity that fix_text would unescape once more than clean() does.
_PLAIN = frozenset(map(chr, range(0x20, 0x7F))) - {"&"} | {"\t", "\n", "\r"}


def clean(text: str) -> str:
    """open_clip's ``'lower'`` clean: ftfy, HTML-unescape twice, collapse whitespace, lowercase."""
    if not is_plain(text):
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def is_plain(text: str) -> bool:
    """Whether ``text`` is made of characters ftfy and HTML unescaping leave as they are."""
    return text.isascii() and _PLAIN.issuperset(text)


def _merge_pair(word: list[str], first: str, second: str) -> list[str]:
    """Merge every non-overlapping ``first second`` pair in ``word``, scanning left to right."""
    merged: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
            merged.append(first + second)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def merge_by_rank(
    symbols: Sequence[str], rank_of: Callable[[str, str], int | None]
) -> list[tuple[str, int | None]]:
    """BPE in O(n log n): the very result of the plain loop in :meth:`Tokenizer._bpe`.

    Returns the pieces in order, each with the rank of the merge that made it (None for a
    symbol left as it came).

    The plain loop repeatedly takes the lowest-ranked adjacent pair and merges every
    non-overlapping occurrence of it, left to right; each round scans the whole word, so a
    20,000-letter word costs ~16 s. Here the symbols are a linked list (nodes keep their
    original index, so index order is word order) and every adjacent pair with a rank sits
    in a heap as ``(rank, left index, first, second)``. One round pops *all* entries of the
    lowest rank, drops the stale ones (a node merged away or changed since: a node's text
    only grows, so comparing the stored pair is exact), merges the rest in index order (the
    left-to-right, non-overlapping pass: ranks name pairs uniquely, and a merge cannot make
    another occurrence of its own pair) and only then pushes the pairs it made, as the
    loop's next round would see them. Entries pushed are at most ``(n - 1) + 2 * merges``
    and ``rank_of`` is asked once per entry, so the work is O(n log n) whatever the word.
    """
    text: list[str | None] = list(symbols)
    made: list[int | None] = [None] * len(text)
    size = len(text)
    after = [*range(1, size), -1]
    before = list(range(-1, size - 1))
    heap: list[tuple[int, int, str, str]] = []

    def push(left: int) -> None:
        right = after[left]
        if right != -1:
            first, second = text[left], text[right]
            rank = rank_of(first, second)  # type: ignore[arg-type]
            if rank is not None:
                heapq.heappush(heap, (rank, left, first, second))  # type: ignore[arg-type]

    for left in range(size - 1):
        push(left)
    while heap:
        rank = heap[0][0]
        round_: list[tuple[int, int, str, str]] = []
        while heap and heap[0][0] == rank:
            round_.append(heapq.heappop(heap))
        touched: list[int] = []
        for _, left, first, second in sorted(round_, key=lambda entry: entry[1]):
            right = after[left]
            if text[left] != first or right == -1 or text[right] != second:
                continue  # stale: merged away or changed since it was pushed
            text[left], text[right], made[left] = first + second, None, rank
            after[left] = after[right]
            if after[right] != -1:
                before[after[right]] = left
            touched.append(left)
        lefts = {before[node] for node in touched if before[node] != -1}
        for left in sorted(lefts.union(touched)):
            if text[left] is not None:
                push(left)
    return [(piece, made[node]) for node, piece in enumerate(text) if piece is not None]


class Tokenizer:
    """CLIP byte-level BPE tokenizer; ``encode`` matches open_clip's ``SimpleTokenizer``."""

    def __init__(self, merges: Sequence[str]) -> None:
        """Build the vocabulary from ordered BPE merges, each ``"first second"`` (rank =
        position).

        Ids are open_clip's: the 256 byte symbols, the same with ``</w>``, one token per
        merge (merged tokens are all distinct, so a merge's token has id 512 + its rank),
        then the two specials. Only the 512 base ids are tabulated; a merged token's id
        comes from the merge that made it, which keeps loading cheap (a cold query pays it).
        """
        alphabet = _byte_alphabet()
        chars = list(alphabet.values())
        base = [*chars, *(c + "</w>" for c in chars)]
        self._ids = {token: i for i, token in enumerate(base)}
        self._ids.update((s, len(base) + len(merges) + i) for i, s in enumerate(_SPECIALS))
        self._ranks = {merge: rank for rank, merge in enumerate(merges)}
        self._first_merge_id = len(base)
        self._to_alphabet = str.maketrans(alphabet)
        self._cache: dict[str, tuple[int, ...]] = {}
        self.sot_id, self.eot_id = (self._ids[s] for s in _SPECIALS)
        self.vocab_size = len(base) + len(merges) + len(_SPECIALS)

    @classmethod
    def from_file(cls, path: Path) -> Tokenizer:
        """Read a gzipped CLIP merges file (header line, then one ``a b`` merge per line)."""
        lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
        return cls(lines[1 : _MERGE_COUNT + 1])

    @classmethod
    @functools.cache
    def load(cls) -> Tokenizer:
        """The tokenizer over the vocabulary shipped with clipdex, built once per process."""
        with resources.as_file(resources.files("indexer.model") / "assets" / VOCAB_FILE) as path:
            return cls.from_file(path)

    def encode(
        self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH
    ) -> np.ndarray:
        """Token ids, shape ``(len(texts), context_length)``, int64, zero-padded.

        Each row is ``<sot> tokens <eot>``; a text too long keeps its first
        ``context_length - 2`` tokens and still ends in ``<eot>`` (open_clip's truncation).
        """
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        texts = [texts] if isinstance(texts, str) else texts
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            body = itertools.islice(self.token_ids(text), context_length - 2)
            ids = [self.sot_id, *body, self.eot_id]
            out[row, : len(ids)] = ids
        return out

    def token_ids(self, text: str) -> Iterator[int]:
        """Lazily yield the BPE ids of ``text`` (no ``<sot>``/``<eot>``)."""
        for match in _PATTERN.finditer(clean(text)):
            yield from self._word_ids(match.group())

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-tokenized word, memoised."""
        symbols = word.encode("utf-8").decode("latin-1").translate(self._to_alphabet)
        ids = self._cache.get(symbols)
        if ids is None:
            ids = self._bpe(symbols)
            if len(symbols) > _LONG_WORD:
                return ids  # not memoised: the memo is bounded in words, not in bytes
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[symbols] = ids
        return ids

    def _bpe(self, symbols: str) -> tuple[int, ...]:
        """Ids after applying merges lowest rank first until none applies; specials pass
        through whole."""
        if symbols in _SPECIALS:
            return (self._ids[symbols],)
        word = [*symbols[:-1], symbols[-1] + "</w>"]
        if len(word) > _LONG_WORD:
            pieces = merge_by_rank(word, self._rank)
            return tuple(
                self._ids[piece] if rank is None else self._first_merge_id + rank
                for piece, rank in pieces
            )
        made: dict[str, int] = {}  # merged token -> its id (512 + the merge's rank)
        while len(word) > 1:
            rank, first, second = min(
                (self._ranks.get(f"{a} {b}", math.inf), a, b) for a, b in itertools.pairwise(word)
            )
            if rank == math.inf:
                break
            made[first + second] = self._first_merge_id + int(rank)
            word = _merge_pair(word, first, second)
        return tuple(made[piece] if piece in made else self._ids[piece] for piece in word)

    def _rank(self, first: str, second: str) -> int | None:
        """The rank of merging ``first second``, or None when no merge joins them."""
        return self._ranks.get(f"{first} {second}")
