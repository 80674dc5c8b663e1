"""Words of a photo for the full-text index: sources, path words, CJK handling, FTS5 phrases.

Pure functions, no SQL: the catalog stores each photo's texts in ``image_text`` (one row per
source) and mirrors them into the FTS5 table ``text_fts`` through :func:`fts_text`; the
query side builds its MATCH expressions with :func:`fts_phrase`, so both sides agree on how
text becomes tokens.

FTS5's ``unicode61`` tokenizer (with ``remove_diacritics 2``: "Café" matches "cafe") splits on
spaces and punctuation, which CJK scripts do not use: a run of Han, Kana or Hangul would be
one token. :func:`fts_text` therefore spaces every CJK character apart, and a CJK query
becomes a phrase of single characters (``"東 京"``), which finds the characters in order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence

# Where a photo's text comes from (image_text.source).
NAME, FOLDER, DESCRIPTION, KEYWORDS, OCR = "name", "folder", "description", "keywords", "ocr"
SOURCES = (NAME, FOLDER, DESCRIPTION, KEYWORDS, OCR)
PATH_SOURCES = frozenset({NAME, FOLDER})  # follow the path; the others follow the content
CONTENT_SOURCES = frozenset({DESCRIPTION, KEYWORDS, OCR})
MAX_TEXT_CHARS = 20_000  # per (photo, source); longer text is cut (an OCR'd page fits)
UNKNOWN_ROOT_FOLDERS = 3  # folder names kept from a path whose indexed root is unknown

# Han (incl. extensions A/B.., compatibility), Hiragana, Katakana, Hangul syllables and jamo,
# CJK punctuation, full-width forms.
_CJK = re.compile(
    "([\u1100-\u11ff\u2e80-\u2fdf\u3000-\u30ff\u3100-\u31ff\u3200-\u4dbf\u4e00-\u9fff"
    "\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\uff00-\uffef\U00020000-\U0003ffff])"
)
_CAMEL = re.compile(  # lower->Upper, ABCWord, letter->digit, digit->letter
    r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])|(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])"
)
_SEPARATORS = re.compile(r"[\s_\-.]+")


def fts_text(text: str) -> str:
    """``text`` as it goes into the FTS5 index: CJK characters spaced apart."""
    return _CJK.sub(r" \1 ", text)


def fts_phrase(term: str) -> str:
    """One query term or phrase as an FTS5 string literal (a phrase: its tokens in order).

    Quotes are doubled, so user text can never be read as FTS5 syntax (NEAR, *, column
    filters); CJK characters are spaced as :func:`fts_text` spaced them when indexing.
    """
    return '"' + fts_text(term).replace('"', '""') + '"'


def name_words(path: str) -> str:
    """The file name's stem as words: split on ``_ - .`` and camelCase/digit boundaries.

    "IMG_2034" -> "IMG 2034"; "myHolidayInRome" -> "my Holiday In Rome myHolidayInRome" (the
    joined form stays, so searching the whole name still finds it).
    """
    stem = os.path.splitext(os.path.basename(path))[0]
    parts = [p for p in _SEPARATORS.split(stem) if p]
    words: list[str] = []
    for part in parts:
        split = [w for w in _CAMEL.split(part) if w]
        words += split
        if len(split) > 1:
            words.append(part)
    return clean_text(" ".join(words))


def folder_words(path: str, roots: Iterable[str] = ()) -> str:
    """The names of the folders holding ``path``, from its indexed root's own name down.

    ``/photos/Italy 2019/day 1/a.jpg`` indexed from ``/photos`` -> "photos / Italy 2019 /
    day 1". With no known root containing it, the last :data:`UNKNOWN_ROOT_FOLDERS` names.
    """
    folder = os.path.dirname(path)
    parts = [p for p in folder.split(os.sep) if p]
    root = _longest_root(folder, roots)
    if root is not None:
        below = [p for p in root.split(os.sep) if p]
        keep = parts[max(0, len(below) - 1) :]
    else:
        keep = parts[-UNKNOWN_ROOT_FOLDERS:]
    return clean_text(" / ".join(keep))


def _longest_root(folder: str, roots: Iterable[str]) -> str | None:
    best = None
    for root in roots:
        root = root.rstrip(os.sep) or os.sep
        inside = folder == root or folder.startswith(root + os.sep) or root == os.sep
        if inside and (best is None or len(root) > len(best)):
            best = root
    return best


def path_texts(path: str, roots: Sequence[str] = ()) -> list[tuple[str, str, float | None]]:
    """The (source, text, confidence) rows a path gives: its name and its folders."""
    rows = [(NAME, name_words(path), None), (FOLDER, folder_words(path, roots), None)]
    return [row for row in rows if row[1]]


def clean_text(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """Printable text with runs of white space made one space, cut at ``limit`` chars.

    Surrogate-escaped bytes of undecodable file names and control characters go.
    """
    kept = "".join(ch if ch.isprintable() else " " for ch in text[: limit * 2])
    kept = "".join(ch for ch in kept if not 0xD800 <= ord(ch) <= 0xDFFF)
    return " ".join(kept.split())[:limit].strip()
