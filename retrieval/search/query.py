"""Query arithmetic: weighted text terms (and photos) combined into one query vector.

Grammar (whitespace between tokens is free)::

    query    := [sign] term (sign term)*
    sign     := "+" | "-"
    term     := [weight ":"] [field ":"] phrase
    weight   := a decimal number from 0.01 to 100: 2, 0.5, 1.25, .5, 1e2
    field    := "text" | "name"                  (any case) look for the words only there
    phrase   := '"' any text but '"' '"'        a quoted phrase, taken literally
              | bare words                        up to the next operator

``+`` and ``-`` are operators only where a token starts (at the start of the query or after
whitespace), so hyphenated words stay words: ``"well-lit t-shirt"`` is one term, while
``"beach -people"`` and ``"beach - people"`` both subtract ``people``. Quote a phrase that
must contain an operator or a colon after a number: ``"rock + roll" + "12:30"``.

Examples::

    beach + sunset - people      three terms, weights +1, +1, -1
    2:dog + cat                  dog counts twice as much as cat
    "salt + pepper" - 0.5:blurry

Words (when the library has stored words: file and folder names, keywords, captions, text
read in the photos; see :mod:`retrieval.search.fusion`): the words of every positive term are
also looked up in that text and the two rankings are fused. A quoted phrase must appear as
written (``"out of order"``: only photos whose text holds those words in that order; with
``-`` in front: no photo that holds them). ``text:`` and ``name:`` make a term a word term
only, looked up in one kind of text and not encoded: ``text:`` = text read in the photo,
descriptions and keywords; ``name:`` = file and folder names (``name:italy``,
``text:"total due"``). A library without stored words ignores the difference: quoted
phrases are plain terms, and a query of only ``text:``/``name:`` terms is refused.

Every term is encoded on its own (unit vector ``e_i``), photos given with ``--like`` /
``--unlike`` join with weight +1 / -1, and the query is ``normalise(sum w_i e_i)``. A
single term of weight 1 is exactly the plain text query. Only the ratios of the weights
matter (the sum is normalised), so they are bounded to 0.01..100: a ratio of 10,000 is
more than any query needs, and a weight beyond float32 would zero or erase every score.
The query text must be usable text (:mod:`.text`: no lone surrogates or control
characters). Malformed queries raise :class:`QuerySyntaxError`, whose message marks the
offending spot (``«»``) and whose ``position`` is the 0-based character index.

Note on mixing modalities: CLIP text and image vectors live in one space but image-image
cosines (~0.5-1) run higher than text-image ones (~0.1-0.35), so a photo term pulls the
query strongly towards that photo's look; lower its influence by weighting the text up
(``3:red car`` with ``--like photo``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.search.errors import QueryError
from retrieval.search.text import check_text

MAX_TERMS = 16
MIN_WEIGHT, MAX_WEIGHT = 0.01, 100.0
_WEIGHT = re.compile(r"((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*:")  # 2, .5, 1e2
FIELDS = ("text", "name")
_FIELD = re.compile(r"(text|name):", re.IGNORECASE)


class QuerySyntaxError(QueryError):
    """A query the grammar rejects; ``position`` is the 0-based index of the problem."""

    def __init__(self, query: str, position: int, reason: str) -> None:
        self.query = query
        self.position = position
        self.reason = reason
        marked = f"{query[:position]}«{query[position : position + 1]}»{query[position + 1 :]}"
        super().__init__(f"bad query at character {position + 1}: {reason}: {marked}")


@dataclass(frozen=True)
class Term:
    """One weighted part of a query: a text phrase, or a photo (by id or path)."""

    text: str
    weight: float
    kind: str = "text"  # "text" | "photo"
    quoted: bool = False  # a quoted phrase: its words must appear (when words are stored)
    field: str | None = None  # "text" | "name": a word term looked up there only

    @property
    def encoded(self) -> bool:
        """Whether the term joins the query vector (a ``text:``/``name:`` term does not)."""
        return self.field is None

    def as_dict(self) -> dict:
        document = {"kind": self.kind, "text": self.text, "weight": self.weight}
        if self.quoted:
            document["quoted"] = True
        if self.field is not None:
            document["field"] = self.field
        return document


class _Scanner:
    """A one-pass scanner over the query text (see the module grammar)."""

    def __init__(self, query: str) -> None:
        self.query = query
        self.pos = 0

    def error(self, reason: str, position: int | None = None) -> QuerySyntaxError:
        return QuerySyntaxError(self.query, self.pos if position is None else position, reason)

    def skip_space(self) -> None:
        while self.pos < len(self.query) and self.query[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        return self.pos >= len(self.query)

    def peek(self) -> str:
        return self.query[self.pos]

    def weight(self) -> float:
        match = _WEIGHT.match(self.query, self.pos)
        if not match:
            return 1.0
        value = float(match.group(1))  # digits only: finite or inf, never NaN
        if value <= 0:
            raise self.error("a weight must be greater than 0 (use - to subtract)")
        if not MIN_WEIGHT <= value <= MAX_WEIGHT:
            raise self.error(
                f"a weight must be between {MIN_WEIGHT:g} and {MAX_WEIGHT:g} "
                "(only the ratios between weights matter)"
            )
        self.pos = match.end()
        self.skip_space()
        if self.at_end() or self.peek() in "+-":
            raise self.error(f"expected a phrase after the weight '{match.group(1)}:'")
        return value

    def field(self) -> str | None:
        """A ``text:`` or ``name:`` prefix (then a phrase must follow), or None."""
        match = _FIELD.match(self.query, self.pos)
        if not match:
            return None
        self.pos = match.end()
        self.skip_space()
        if self.at_end() or self._operator_here() or self.peek() in "+-":
            raise self.error(f"expected a phrase after '{match.group(0)}'")
        return match.group(1).lower()

    def phrase(self) -> str:
        if self.peek() == '"':
            return self.quoted()
        start = self.pos
        while not self.at_end() and not self._operator_here():
            if self.peek() == '"':
                raise self.error("a quote inside a phrase: quote the whole phrase")
            self.pos += 1
        return self.query[start : self.pos].strip()

    def quoted(self) -> str:
        start = self.pos
        end = self.query.find('"', start + 1)
        if end < 0:
            raise self.error("this quote is never closed", start)
        text = self.query[start + 1 : end].strip()
        if not text:
            raise self.error("an empty quoted phrase", start)
        self.pos = end + 1
        return text

    def _operator_here(self) -> bool:
        """An operator starts a token: it follows whitespace (never a word character)."""
        return self.peek() in "+-" and self.pos > 0 and self.query[self.pos - 1].isspace()


def parse_query(query: str) -> list[Term]:
    """Parse a query into signed, weighted text terms (see the module docstring)."""
    if not query or not query.strip():
        raise QueryError("the text query is empty: type what the photo shows")
    check_text(query, "the query")
    scan = _Scanner(query)
    terms: list[Term] = []
    while True:
        scan.skip_space()
        sign, operator_at = _read_sign(scan)
        scan.skip_space()
        if scan.at_end():
            if operator_at is not None:
                raise scan.error(f"expected a phrase after '{query[operator_at]}'")
            return _checked(scan, terms)
        if scan.peek() in "+-":
            raise scan.error("two operators in a row")
        weight = scan.weight()
        field = scan.field()
        quoted = scan.peek() == '"'
        terms.append(Term(scan.phrase(), sign * weight, quoted=quoted, field=field))
        if len(terms) > MAX_TERMS:
            raise scan.error(f"more than {MAX_TERMS} terms")
        scan.skip_space()
        if not scan.at_end() and scan.peek() not in "+-":
            raise scan.error("expected + or - between two phrases")


def _read_sign(scan: _Scanner) -> tuple[float, int | None]:
    """The sign before a term (+1 when none) and where its operator stood."""
    if scan.at_end() or scan.peek() not in "+-":
        return 1.0, None
    at = scan.pos
    scan.pos += 1
    return (-1.0 if scan.query[at] == "-" else 1.0), at


def _checked(scan: _Scanner, terms: list[Term]) -> list[Term]:
    if not terms:
        raise scan.error("expected a phrase", 0)
    return terms


def photo_terms(like: Sequence[str] = (), unlike: Sequence[str] = ()) -> list[Term]:
    """``--like`` photos as +1 terms, ``--unlike`` photos as -1 terms."""
    return [Term(str(p), 1.0, "photo") for p in like] + [
        Term(str(p), -1.0, "photo") for p in unlike
    ]


def combine(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """``normalise(sum w_i v_i)`` over unit vectors; refuses a query with nothing positive.

    Only the ratios count, so the weights are scaled to a largest magnitude of 1 first:
    any finite weights then give the direction they ask for (float32 sums would overflow
    to inf and NaN past ~1e19). A weight that is not a finite number is refused.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if not np.isfinite(weights).all():
        raise QueryError(f"every weight must be a finite number, got {weights.tolist()}")
    if not len(weights) or not (weights > 0).any():
        raise QueryError(
            "a query needs at least one positive term: add a phrase or --like PHOTO "
            "(subtracting alone finds nothing)"
        )
    weights = (weights / np.abs(weights).max()).astype(np.float32)  # a lone 1 stays 1
    total = (np.asarray(vectors, dtype=np.float32) * weights[:, None]).sum(axis=0)
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise QueryError("the terms of this query cancel out: change a weight")
    return np.ascontiguousarray(total / norm, dtype=np.float32)


def describe(terms: Sequence[Term]) -> str:
    """A canonical one-line form of parsed terms, e.g. ``2:dog + cat - photo:12``."""
    parts = []
    for i, term in enumerate(terms):
        sign = "-" if term.weight < 0 else "+"
        weight = abs(term.weight)
        if term.kind == "photo":
            body = f"photo:{term.text}"
        else:
            body = f'"{term.text}"' if term.quoted else _quoted_if_needed(term.text)
            body = f"{term.field}:{body}" if term.field else body
        text = body if weight == 1 else f"{weight:g}:{body}"
        parts.append(text if i == 0 and sign == "+" else f"{sign} {text}")
    return " ".join(parts)


def _quoted_if_needed(text: str) -> str:
    needs = re.search(r"(^|\s)[+-]", text) or _WEIGHT.match(text) or _FIELD.match(text)
    return f'"{text}"' if needs else text
