"""File paths as the catalog stores them and as people read them.

A POSIX file name is bytes. Python decodes it with ``surrogateescape``: every byte that is
not valid UTF-8 becomes a lone surrogate U+DC80..U+DCFF, which round-trips to the same
bytes but which SQLite text (UTF-8) cannot hold. Three forms, then:

- the **real** path (``str`` with surrogates): what ``open()`` and ``os.stat()`` take;
- the **stored** path (:func:`to_db`): valid Unicode, lossless and unchanged for every
  UTF-8 name. An undecodable byte 0xNN is written as U+FDD0 followed by the two hex digits
  ``NN``; a literal U+FDD0 is doubled. U+FDD0 is a Unicode *noncharacter* (reserved for
  exactly this kind of internal use), so no real name changes in practice, and the mapping
  is per character: a folder's stored form is a prefix of its files' stored forms, so
  prefix and glob queries keep working;
- the **display** path (:func:`display`): the bytes decoded with ``\\xNN`` escapes, for
  tables and messages. It is for eyes only: two names can display alike.
"""

from __future__ import annotations

import codecs
import re

ESCAPE = "\ufdd0"
DISPLAY_ERRORS = "clipdex-display"  # codec error handler: stdout shows bytes as \xNN
_SURROGATE_BYTES = re.compile("[\udc80-\udcff\ufdd0]")
_STORED_ESCAPES = re.compile("\ufdd0(\ufdd0|[0-9A-F]{2})")


def to_db(path: str) -> str:
    """The stored (valid Unicode) form of a real path; the identity for UTF-8 names."""
    return _SURROGATE_BYTES.sub(_escape_one, path)


def from_db(stored: str) -> str:
    """The real path of a stored form (inverse of :func:`to_db`)."""
    if ESCAPE not in stored:
        return stored
    return _STORED_ESCAPES.sub(_unescape_one, stored)


def display(path: str) -> str:
    """A printable form of a real path: undecodable bytes shown as ``\\xNN``."""
    if not _SURROGATE_BYTES.search(path):
        return path
    return path.encode("utf-8", DISPLAY_ERRORS).decode("utf-8")


def _display_errors(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: escaped bytes as ``\\xNN``, anything else as ``\\uNNNN``."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    out = []
    for char in exc.object[exc.start : exc.end]:
        code = ord(char)
        out.append(f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}")
    return "".join(out), exc.end


codecs.register_error(DISPLAY_ERRORS, _display_errors)


def _escape_one(match: re.Match) -> str:
    char = match.group(0)
    if char == ESCAPE:
        return ESCAPE + ESCAPE
    return f"{ESCAPE}{ord(char) - 0xDC00:02X}"


def _unescape_one(match: re.Match) -> str:
    code = match.group(1)
    return ESCAPE if code == ESCAPE else chr(0xDC00 + int(code, 16))
