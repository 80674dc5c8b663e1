"""ASGI middleware for the basics every route gets: a body limit, a token, safe headers.

Pure ASGI (no BaseHTTPMiddleware) so an upload is counted while it streams in and a
refused request never reaches a router.
"""

from __future__ import annotations

import hashlib
import hmac
from http.cookies import SimpleCookie

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.server.errors import BodyTooLarge, error_response

SESSION_COOKIE = "clipdex_session"
PUBLIC_PATHS = frozenset({"/", "/healthz", "/favicon.ico", "/api/session"})
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def session_value(token: str) -> str:
    """The cookie value the web page gets for a token (a MAC of it, not the token)."""
    return hmac.new(token.encode(), b"clipdex-session", hashlib.sha256).hexdigest()


def is_public(path: str) -> bool:
    """Routes that need no token: liveness, the static page shell, and the login itself."""
    return path in PUBLIC_PATHS or path.startswith("/static/")


def token_matches(candidate: str, token: str) -> bool:
    """Constant-time comparison of a presented token with the configured one."""
    return hmac.compare_digest(candidate.encode("utf-8", "replace"), token.encode())


def presented_token_ok(headers: Headers, token: str) -> bool:
    """True when the request carries the token as a bearer header or as the page's cookie."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token_matches(value.strip(), token):
        return True
    cookies = SimpleCookie()
    try:
        cookies.load(headers.get("cookie", ""))
    except Exception:  # a malformed cookie header is just "no cookie"
        return False
    morsel = cookies.get(SESSION_COOKIE)
    return morsel is not None and token_matches(morsel.value, session_value(token))


class TokenAuth:
    """When a token is configured, answer 401 to every non-public request without it."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.token or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        if presented_token_ok(Headers(scope=scope), self.token):
            await self.app(scope, receive, send)
            return
        response = error_response(
            Request(scope),
            401,
            "unauthorized",
            "this server needs a token: send 'Authorization: Bearer TOKEN'",
            {"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before or while they arrive."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit:
            exc = BodyTooLarge(self.limit)
            response = error_response(Request(scope), 413, "too_large", exc.detail)
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


class SecurityHeaders:
    """nosniff, no referrer, no framing everywhere; a strict CSP on the web page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        page = scope["path"] == "/" or scope["path"].startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("X-Frame-Options", "DENY")
                if page:
                    headers.setdefault("Content-Security-Policy", PAGE_CSP)
            await send(message)

        await self.app(scope, receive, with_headers)
