"""Reading the catalog's word index (SQLite FTS5): which photos contain a query's words.

The indexer stores the words of each photo in ``image_text`` (one row per photo and source:
``name``, ``folder``, ``ocr``, ``description``, ``keywords``) and indexes them in the FTS5
table ``text_fts(text, image_id UNINDEXED, source UNINDEXED)`` whose rowid is the
``image_text`` row's id, its text spaced by :func:`indexer.store.textindex.fts_text` (each
CJK character a token). This module only reads them, with
plain SQL that both catalog kinds run (:class:`~indexer.store.catalog.Catalog` through
SQLAlchemy, :class:`~indexer.store.catalog_reader.CatalogReader` through stdlib sqlite3):
each hands in a ``run(sql, params) -> rows`` callable.

User words never reach FTS5's query syntax: every term is written as an FTS5 *string*
(``"..."``, inner quotes doubled), which FTS5 tokenizes as a phrase of plain words, so
``*``, ``-``, ``NEAR(``, ``OR``, ``:`` and unbalanced quotes are only characters. A term
with no word characters at all (``"€"``, ``"*"``) is dropped here, never sent. The
ranking function is FTS5's ``bm25()`` (lower is better there; :class:`TextHit` turns it
into a score where higher is better).

Allowed ids (the filters of a search) are bound as one JSON array (``json_each``), so any
number of them takes one parameter and the reader's connection stays read-only.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from indexer.store.textindex import fts_text

SOURCES = ("name", "folder", "ocr", "description", "keywords")
Run = Callable[[str, Sequence[object]], list[tuple]]

# Han, Kana, Hangul, CJK punctuation, full-width forms: the characters the index spaces
# apart (indexer.store.textindex; tests/test_fusion.py checks that the two agree). A CJK
# word is looked up as the phrase of its characters.
_CJK_CLASS = (
    "[\u1100-\u11ff\u2e80-\u2fdf\u3000-\u30ff\u3100-\u31ff\u3200-\u4dbf\u4e00-\u9fff"
    "\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\uff00-\uffef\U00020000-\U0003ffff]"
)
_WORD = re.compile(r"[^\W_]+")  # letters and digits: FTS5's unicode61 splits on the rest
_TOKEN = re.compile(f"{_CJK_CLASS}|(?:(?!{_CJK_CLASS})[^\\W_])+")  # a token where it stands
_OPEN, _CLOSE = "\x01", "\x02"  # highlight() marks; control characters never in a query
_MAX_TERM_CHARS = 512  # a longer "word" is in no index: cut, not refused
_SNIPPET_TOKENS = 12
_TABLES = "SELECT count(*) FROM sqlite_master WHERE name IN ('image_text', 'text_fts')"
_FTS_ONLY = "SELECT {} FROM text_fts WHERE {}"


@dataclass(frozen=True)
class TextTerm:
    """One part of a word query.

    ``text``: the words; ``phrase``: they must appear together, in this order (else any of
    them counts); ``sources``: the ``image_text`` sources to look in (None: all).
    """

    text: str
    phrase: bool = False
    sources: frozenset[str] | None = None

    def words(self) -> list[str]:
        """The user's words of the term, normalised (a CJK run stays one word)."""
        return words_of(self.text[:_MAX_TERM_CHARS])

    def targets(self) -> list[list[str]]:
        """The token sequences to find: a phrase's tokens, or each word's."""
        if self.phrase:
            tokens = tokens_of(self.text[:_MAX_TERM_CHARS])
            return [tokens] if tokens else []
        return [tokens_of(word) for word in self.words()]


@dataclass
class TextHit:
    """A photo whose text matched: its score (sum of -bm25 over its matching texts,
    higher is better), the query terms found (query order) and the sources they were in."""

    image_id: int
    score: float
    terms: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def normalise(text: str) -> str:
    """Case folded, accents removed (as ``unicode61 remove_diacritics 2`` compares)."""
    if text.isascii():  # the usual case, and 10x faster
        return text.lower()
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def words_of(text: str) -> list[str]:
    """A text's words, normalised: runs of letters and digits (a CJK run is one word)."""
    return _WORD.findall(normalise(text))


def tokens_of(text: str) -> list[str]:
    """A text's tokens as the FTS5 index holds them: its words, CJK characters one by one."""
    return words_of(fts_text(text))


def fts_string(tokens: Sequence[str]) -> str:
    """Tokens as one FTS5 string (a phrase); safe for any characters."""
    return '"' + " ".join(tokens).replace('"', '""') + '"'


def match_expression(terms: Iterable[TextTerm]) -> str | None:
    """The FTS5 MATCH text that finds any of ``terms`` (a phrase as a whole, a term's
    words each); None when no term has a word."""
    parts = [fts_string(target) for term in terms for target in term.targets() if target]
    parts = list(dict.fromkeys(parts))
    return " OR ".join(parts) if parts else None


def has_text(run: Run) -> bool:
    """Whether the catalog has a word index with at least one row (cheap: two lookups)."""
    if run(_TABLES, ())[0][0] < 2:
        return False
    return bool(run("SELECT 1 FROM image_text LIMIT 1", ()))


def text_search(
    run: Run, terms: Sequence[TextTerm], limit: int, allowed_ids: np.ndarray | None = None
) -> list[TextHit]:
    """Photos whose text matches any of ``terms``, best first, at most ``limit``.

    Terms with different sources are looked up separately and their hits merged per photo
    (scores add up). ``allowed_ids``: only these photos (None: all).
    """
    if not terms or limit <= 0 or not has_text(run):
        return []
    merged: dict[int, TextHit] = {}
    for sources, group in _by_sources(terms).items():
        for hit in _search_group(run, group, sources, limit, allowed_ids):
            seen = merged.setdefault(hit.image_id, TextHit(hit.image_id, 0.0))
            seen.score += hit.score
            seen.terms = _union(seen.terms, hit.terms)
            seen.sources = _union(seen.sources, hit.sources)
    order = _query_order(terms)
    for hit in merged.values():
        hit.terms.sort(key=lambda t: order.get(t, len(order)))
    hits = sorted(merged.values(), key=lambda h: (-h.score, h.image_id))
    return hits[:limit]


def ids_with(run: Run, term: TextTerm, allowed_ids: np.ndarray | None = None) -> np.ndarray:
    """The ids of every photo whose text holds ``term`` (a phrase: as a whole), ascending.
    A term without any word matches nothing."""
    expression = match_expression([TextTerm(term.text, True, term.sources)])
    if expression is None or not has_text(run):
        return np.zeros(0, dtype=np.int64)
    where, params = _conditions(expression, term.sources, allowed_ids)
    sql = f"SELECT DISTINCT image_id FROM text_fts WHERE {where}"
    return np.sort(np.asarray([row[0] for row in run(sql, params)], dtype=np.int64))


def snippets(
    run: Run, image_ids: Sequence[int], terms: Sequence[TextTerm]
) -> dict[int, list[dict]]:
    """Where the terms stand in the given photos' texts: per photo, ``{"source", "text"}``
    with each match between ``[[`` and ``]]`` (for a page to highlight), around the first
    match of each text. One query for all the photos; the marking is done here, on the text
    as stored (not on FTS5's copy of it)."""
    targets = [target for term in terms for target in term.targets() if target]
    if not targets or not image_ids or not has_text(run):
        return {}
    sql = "SELECT image_id, source, text FROM image_text WHERE image_id IN ({}) ORDER BY rowid"
    rows: list[tuple] = []
    ids = [int(i) for i in image_ids]
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        rows += run(sql.format(", ".join("?" * len(chunk))), chunk)
    out: dict[int, list[dict]] = {}
    for image_id, source, text in rows:
        marked = mark(text or "", targets)
        if marked is not None:
            out.setdefault(image_id, []).append({"source": source, "text": marked})
    return out


def mark(text: str, targets: Sequence[list[str]], context: int = _SNIPPET_TOKENS) -> str | None:
    """``text`` with every occurrence of a target (a word sequence) between ``[[`` ``]]``,
    cut to ``context`` words around the first one; None when no target occurs."""
    text = text[:20_000]
    plain = normalise(text)
    if not any(target[0] in plain for target in targets):  # the usual case: cheap
        return None
    spans = [(m.start(), m.end(), words_of(m.group(0))) for m in _TOKEN.finditer(text)]
    flat = [(start, end, word) for start, end, words in spans for word in words]
    tokens = [word for _, _, word in flat]
    marks: list[tuple[int, int]] = []
    for i in range(len(tokens)):
        for target in targets:
            if tokens[i : i + len(target)] == target:
                marks.append((i, i + len(target) - 1))
    if not marks:
        return None
    first = marks[0][0]
    low, high = max(0, first - context // 2), min(len(flat), first + context)
    pieces, cursor = [], flat[low][0]
    for begin, last in sorted(set(marks)):
        if begin < low or last >= high or flat[begin][0] < cursor:
            continue
        pieces += [text[cursor : flat[begin][0]], "[[", text[flat[begin][0] : flat[last][1]], "]]"]
        cursor = flat[last][1]
    pieces.append(text[cursor : flat[high - 1][1]])
    prefix = "…" if low > 0 else ""
    suffix = "…" if high < len(flat) else ""
    return prefix + "".join(pieces).strip() + suffix


# -- helpers ---------------------------------------------------------------------------------
def _by_sources(terms: Sequence[TextTerm]) -> dict[frozenset[str] | None, list[TextTerm]]:
    groups: dict[frozenset[str] | None, list[TextTerm]] = {}
    for term in terms:
        groups.setdefault(term.sources, []).append(term)
    return groups


def _conditions(
    expression: str, sources: frozenset[str] | None, allowed_ids: np.ndarray | None
) -> tuple[str, list[object]]:
    where = ["text_fts MATCH ?"]
    params: list[object] = [expression]
    if sources is not None:
        where.append(f"source IN ({', '.join('?' * len(sources))})")
        params.extend(sorted(sources))
    if allowed_ids is not None:
        where.append("image_id IN (SELECT value FROM json_each(?))")
        params.append(json.dumps([int(i) for i in np.asarray(allowed_ids).tolist()]))
    return " AND ".join(where), params


def _search_group(
    run: Run,
    terms: list[TextTerm],
    sources: frozenset[str] | None,
    limit: int,
    allowed_ids: np.ndarray | None,
) -> list[TextHit]:
    """One MATCH over one group of terms: the best rows (a few per photo), merged per photo.
    ``rank`` is FTS5's bm25() (lower is better)."""
    expression = match_expression(terms)
    if expression is None:
        return []
    where, params = _conditions(expression, sources, allowed_ids)
    rows_wanted = 2 * limit  # a photo has a few texts (name, folder, ocr...)
    # One word or phrase: every matching text holds it, no need to mark where.
    single = [t for term in terms for t in term.targets() if t]
    marks = "NULL" if len(single) == 1 else f"highlight(text_fts, 0, '{_OPEN}', '{_CLOSE}')"
    # FTS5 ranks and cuts by itself (ORDER BY rank); the UNINDEXED columns filter its rows.
    sql = (
        f"SELECT image_id, source, -rank, {marks} FROM text_fts WHERE {where} ORDER BY rank LIMIT ?"
    )
    every = _every_term(terms) if len(single) == 1 else None
    hits: dict[int, TextHit] = {}
    for image_id, source, score, marked in run(sql, [*params, rows_wanted]):
        hit = hits.setdefault(image_id, TextHit(image_id, 0.0))
        hit.score += float(score)
        hit.terms = _union(hit.terms, every if every is not None else _found(terms, marked or ""))
        hit.sources = _union(hit.sources, [source])
    return list(hits.values())


def _every_term(terms: Sequence[TextTerm]) -> list[str]:
    """What a hit of a one-target group matched: that phrase, or that word."""
    return [t.text if t.phrase else w for t in terms for w in (t.words()[:1] or [t.text])]


def _found(terms: Sequence[TextTerm], marked: str) -> list[str]:
    """Which terms a highlighted text holds: a phrase within one marked span, a word as
    (part of) a span; reported as the phrase's text or the word (normalised)."""
    spans = [tokens_of(span) for span in re.findall(f"{_OPEN}(.*?){_CLOSE}", marked, re.S)]
    found: list[str] = []
    for term in terms:
        if term.phrase:
            if any(_contains(span, target) for target in term.targets() for span in spans):
                found.append(term.text)
            continue
        for word, target in zip(term.words(), term.targets()):
            if any(_contains(span, target) for span in spans):
                found.append(word)
    return found


def _query_order(terms: Sequence[TextTerm]) -> dict[str, int]:
    """Where each reported term (a phrase's text, a plain term's words) stands in the query."""
    order: dict[str, int] = {}
    for term in terms:
        for key in [term.text] if term.phrase else term.words():
            order.setdefault(key, len(order))
    return order


def _contains(span: list[str], words: list[str]) -> bool:
    n = len(words)
    return n > 0 and any(span[i : i + n] == words for i in range(len(span) - n + 1))


def _union(a: list[str], b: Iterable[str]) -> list[str]:
    return list(dict.fromkeys([*a, *b]))
