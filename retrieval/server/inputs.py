"""Query strings must be UTF-8: a parameter whose bytes are not is refused, not guessed.

Starlette percent-decodes a query string with ``errors="replace"``, so ``q=%ED%A0%80`` (the
bytes of a lone surrogate) or ``in=%FF`` would quietly reach a route as U+FFFD and be
searched for. This middleware looks at the raw bytes first and answers 400 ``bad_query``
naming the parameter. The same rule for JSON bodies and form text is in
:mod:`retrieval.search.text` (through :mod:`.schemas` and the search layer).
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from retrieval.server.errors import error_response


def undecodable_parameter(query_string: bytes) -> str | None:
    """The name of the first parameter whose name or value is not UTF-8, else None."""
    for pair in query_string.split(b"&"):
        name, _, value = pair.partition(b"=")
        raw_name = unquote_to_bytes(name.replace(b"+", b" "))
        for part in (raw_name, unquote_to_bytes(value.replace(b"+", b" "))):
            try:
                part.decode("utf-8")
            except UnicodeDecodeError:
                return raw_name.decode("utf-8", "backslashreplace")
    return None


class Utf8QueryString:
    """Answer 400 to a request whose query string percent-decodes to bytes that are not UTF-8."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = scope.get("query_string", b"") if scope["type"] == "http" else b""
        name = undecodable_parameter(query) if query else None
        if name is None:
            await self.app(scope, receive, send)
            return
        message = (
            f"the query parameter {name!r} is not UTF-8 text once percent-decoded: "
            "send UTF-8, percent-encoded"
        )
        response = error_response(Request(scope), 400, "bad_query", message)
        await response(scope, receive, send)
