"""The JSON every route answers with: file paths lossless, exactly as the CLI's ``--json``.

A POSIX file name is bytes; Python holds an undecodable byte as a lone surrogate
(``caf\\udce9.jpg``, see :mod:`indexer.paths`), which UTF-8 cannot encode, so the stock
response would fail with a 500. Here each one is written as the JSON escape ``\\udcNN``:
valid JSON that ``json.loads`` + ``os.fsencode`` turn back into the very bytes, the same
text ``clipdex search --json`` prints. Every other character is plain UTF-8.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse


def json_bytes(content: Any) -> bytes:
    """``content`` as compact UTF-8 JSON, lone surrogates written as ``\\udcNN`` escapes."""
    text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    # A lone surrogate only ever appears inside a JSON string, where "\udcNN" is its escape.
    return text.encode("utf-8", "backslashreplace")


class PathJSONResponse(JSONResponse):
    """JSONResponse whose body may carry any file path the catalog holds."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)
