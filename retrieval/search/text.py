"""Which text a query, a label or a filter may be, and which a file path may be.

Every front door (the CLI, Python callers, the REST API) hands user text to the search
layer; this module is the one rule for it, so that text nothing can use is refused with a
message naming the field instead of failing deep inside (``os.path.realpath``, the
tokenizer, SQLite) or quietly answering something else:

- **text** (a query, a label, a template, a filter value, a token): valid Unicode
  without lone surrogates (U+D800..U+DFFF, what a JSON ``\\ud800`` escape or an undecodable
  command-line byte becomes) and without control characters other than tab and line
  breaks (NUL, escape, and the C1 range U+0080..U+009F that bytes which were not UTF-8
  turn into when a form falls back to Latin-1), and without U+FFFD, the replacement
  character that undecodable bytes become when a decoder does not refuse them;
- a **path** (a folder to index, an ``in=`` folder): anything the file system can take.
  A name's undecodable bytes are lone surrogates U+DC80..U+DCFF (``caf\\udce9``), the
  lossless form the CLI's ``--json`` and the API print (see :mod:`indexer.paths`), so they
  are accepted; any other surrogate maps to no byte and is refused, as is NUL.

:func:`text_problem` and :func:`path_problem` say what is wrong (or None); the ``check_``
functions raise :class:`~retrieval.search.errors.QueryError` naming the field.
"""

from __future__ import annotations

import os
import re

from retrieval.search.errors import QueryError

# Lone surrogates, control characters but tab, LF, CR (C0, DEL, C1), U+FFFD.
_BAD_TEXT = re.compile("[\ud800-\udfff\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")
_TEXT_HINT = "send valid UTF-8 text"
_PATH_HINT = "a file name's undecodable byte NN is written \\udcNN, as --json prints it"


def text_problem(text: str) -> str | None:
    """Why ``text`` cannot be used as query, label or filter text; None when it can."""
    if not isinstance(text, str):
        return f"expected text, got {type(text).__name__}"
    bad = _BAD_TEXT.search(text)
    if bad is None:
        return None
    return _describe(bad.group(0), bad.start(), _TEXT_HINT)


def path_problem(path: str) -> str | None:
    """Why ``path`` names no file on this system; None when it can (see the module notes)."""
    if not isinstance(path, str):
        return f"expected a path as text, got {type(path).__name__}"
    if "\x00" in path:
        return _describe("\x00", path.index("\x00"), "no file name holds one")
    try:
        os.fsencode(path)
    except UnicodeEncodeError as exc:
        return _describe(path[exc.start], exc.start, _PATH_HINT)
    return None


def check_text(text: str, field: str) -> str:
    """``text`` unchanged, or :class:`QueryError` naming ``field`` and what is wrong."""
    problem = text_problem(text)
    if problem:
        raise QueryError(f"{field}: {problem}")
    return text


def check_path(path: str, field: str) -> str:
    """``path`` unchanged, or :class:`QueryError` naming ``field`` and what is wrong."""
    problem = path_problem(path)
    if problem:
        raise QueryError(f"{field}: {problem}")
    return path


def _describe(char: str, position: int, hint: str) -> str:
    code = ord(char)
    if 0xD800 <= code <= 0xDFFF:
        what = "a lone surrogate" if hint == _TEXT_HINT else "a lone surrogate that is no byte"
    elif code == 0xFFFD:
        what = "a replacement character (the mark of bytes that were not UTF-8)"
    else:
        what = "a NUL character" if code == 0 else "a control character"
    return f"{what}, U+{code:04X} at character {position + 1}, is not allowed: {hint}"
