"""ASGI middleware for the basics every route gets: a body limit, a token, safe headers;
and the web page's sessions.

Pure ASGI (no BaseHTTPMiddleware) so an upload is counted while it streams in and a
refused request never reaches a router.

Sessions: ``POST /api/session`` trades the token for a random session id (a cookie), kept
in this process's memory with an expiry, so it ends on logout, after ``session_hours``,
and with the process (a restart, perhaps with a new token, invalidates every id). Wrong
tokens, at the login or as a bearer header, are throttled per client address: after
``auth_free_failures`` the client must wait, doubling each time, and is answered 429 with
``Retry-After`` until then, the right token included.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie

from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.server.errors import BodyTooLarge, error_response

SESSION_COOKIE = "clipdex_session"
PUBLIC_PATHS = frozenset({"/", "/healthz", "/favicon.ico", "/api/session"})
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
MAX_SESSIONS = 10_000  # live sessions kept; beyond, the oldest ends
MAX_THROTTLED_CLIENTS = 10_000  # client addresses remembered; beyond, the oldest is forgotten
BACKOFF_CAP_SECONDS = 900.0  # the longest wait the doubling reaches
FORGET_FAILURES_SECONDS = 3600.0  # a client's failures are forgotten after an hour without one

Clock = Callable[[], float]


def is_public(path: str) -> bool:
    """Routes that need no token: liveness, the static page shell, and the login itself."""
    return path in PUBLIC_PATHS or path.startswith("/static/")


def token_matches(candidate: str, token: str) -> bool:
    """Constant-time comparison of a presented token with the configured one."""
    return hmac.compare_digest(candidate.encode("utf-8", "replace"), token.encode())


class Sessions:
    """The web page's sessions: random ids, each valid until it expires or is revoked.

    Only a hash of each id is kept (a lookup's timing tells nothing about live ids). Thread
    safe: the login route runs in a worker thread, the middleware on the event loop.
    """

    def __init__(self, ttl: float, clock: Clock = time.monotonic, limit: int = MAX_SESSIONS):
        self.ttl = ttl
        self.clock = clock
        self.limit = limit
        self._expiry: OrderedDict[bytes, float] = OrderedDict()  # oldest first
        self._lock = threading.Lock()

    @staticmethod
    def _key(session_id: str) -> bytes:
        return hashlib.sha256(session_id.encode("utf-8", "replace")).digest()

    def create(self) -> str:
        """A new session id, valid for ``ttl`` seconds."""
        session_id = secrets.token_urlsafe(32)
        now = self.clock()
        with self._lock:
            self._drop_expired(now)
            while len(self._expiry) >= self.limit:
                self._expiry.popitem(last=False)
            self._expiry[self._key(session_id)] = now + self.ttl
        return session_id

    def valid(self, session_id: str) -> bool:
        """True while ``session_id`` was made here, has not expired and was not revoked."""
        key = self._key(session_id)
        with self._lock:
            expiry = self._expiry.get(key)
            if expiry is None:
                return False
            if self.clock() >= expiry:
                del self._expiry[key]
                return False
            return True

    def revoke(self, session_id: str) -> None:
        """End a session (logout); an unknown id is ignored."""
        with self._lock:
            self._expiry.pop(self._key(session_id), None)

    def __len__(self) -> int:
        with self._lock:
            self._drop_expired(self.clock())
            return len(self._expiry)

    def _drop_expired(self, now: float) -> None:
        expired = [key for key, expiry in self._expiry.items() if expiry <= now]
        for key in expired:
            del self._expiry[key]


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class LoginThrottle:
    """Wrong tokens per client address: ``free`` of them pass, then each one locks the
    client out for ``backoff`` seconds, doubling (capped at 15 min). Failures are forgotten
    after an hour without one, or at the first right token."""

    def __init__(
        self,
        free: int,
        backoff: float,
        clock: Clock = time.monotonic,
        limit: int = MAX_THROTTLED_CLIENTS,
    ):
        self.free = free
        self.backoff = backoff
        self.clock = clock
        self.limit = limit
        self._clients: OrderedDict[str, _Failures] = OrderedDict()
        self._lock = threading.RLock()

    def retry_after(self, client: str) -> float:
        """Seconds ``client`` must still wait before a token is checked again (0: none)."""
        with self._lock:
            entry = self._clients.get(client)
            return 0.0 if entry is None else max(0.0, entry.locked_until - self.clock())

    def attempt(self, client: str, correct: Callable[[], bool]) -> tuple[str, float]:
        """Check a token for ``client`` unless it must wait, as one step (concurrent guesses
        cannot slip in between): ("locked", wait), ("ok", 0) or ("wrong", wait it caused)."""
        with self._lock:
            wait = self.retry_after(client)
            if wait > 0:
                return "locked", wait
            if correct():
                self.succeeded(client)
                return "ok", 0.0
            return "wrong", self.failed(client)

    def failed(self, client: str) -> float:
        """Count a wrong token; returns the wait it imposes (0 while still free)."""
        now = self.clock()
        with self._lock:
            entry = self._clients.pop(client, None)
            if entry is None or now - entry.last > FORGET_FAILURES_SECONDS:
                entry = _Failures()
            while len(self._clients) >= self.limit:
                self._clients.popitem(last=False)
            self._clients[client] = entry  # most recent last
            entry.count += 1
            entry.last = now
            beyond = entry.count - self.free
            if beyond <= 0:
                return 0.0
            cap = max(BACKOFF_CAP_SECONDS, self.backoff)
            wait = min(self.backoff * 2.0 ** min(beyond - 1, 60), cap)
            entry.locked_until = now + wait
            return wait

    def succeeded(self, client: str) -> None:
        """The right token: this client's failures are forgotten."""
        with self._lock:
            self._clients.pop(client, None)


def client_key(scope: Scope) -> str:
    """The address a throttle counts by: the client's IP (an IPv6 client by its /64, which
    one machine usually owns whole). Behind a proxy that is the proxy's, unless uvicorn
    trusts its X-Forwarded-For."""
    client = scope.get("client")
    host = client[0] if client else "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def throttled_response(request: Request, wait: float) -> Response:
    """429 ``too_many_attempts`` with ``Retry-After``."""
    seconds = max(1, math.ceil(wait))
    message = (
        f"too many wrong tokens from this address: try again in {seconds} s "
        "(each further wrong token doubles the wait)"
    )
    return error_response(request, 429, "too_many_attempts", message, {"Retry-After": str(seconds)})


class Auth:
    """The token, the page's sessions and the wrong-token throttle of one server."""

    def __init__(
        self,
        token: str | None,
        session_ttl: float = 12 * 3600.0,
        free_failures: int = 5,
        backoff: float = 1.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.token = token
        self.sessions = Sessions(session_ttl, clock)
        self.throttle = LoginThrottle(free_failures, backoff, clock)

    def check(self, scope: Scope, candidate: str) -> Response | None:
        """Check a presented token for the client of ``scope``: None when it is the token,
        else the answer (401 wrong token, or 429 while the client must wait)."""
        token = self.token
        assert token is not None
        outcome, wait = self.throttle.attempt(
            client_key(scope), lambda: token_matches(candidate, token)
        )
        if outcome == "ok":
            return None
        if outcome == "locked":
            return throttled_response(Request(scope), wait)
        headers = {"WWW-Authenticate": "Bearer"}
        if wait > 0:
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
        return error_response(Request(scope), 401, "unauthorized", "wrong token", headers)

    def session_cookie(self, response: Response, scope: Scope) -> None:
        """Start a session and set its cookie on ``response``."""
        response.set_cookie(
            SESSION_COOKIE,
            self.sessions.create(),
            max_age=int(self.sessions.ttl),
            **cookie_attributes(scope),
        )

    def end_session(self, response: Response, scope: Scope) -> None:
        """Revoke the request's session (if any) and delete its cookie on ``response``."""
        session_id = session_cookie_value(Headers(scope=scope))
        if session_id is not None:
            self.sessions.revoke(session_id)
        response.delete_cookie(SESSION_COOKIE, **cookie_attributes(scope))


def cookie_attributes(scope: Scope) -> dict:
    """The same attributes on every Set-Cookie: HttpOnly, SameSite=Strict, Path=/, and
    Secure when the request came over https (directly or from a trusted proxy)."""
    secure = scope.get("scheme") == "https"
    return {"httponly": True, "samesite": "strict", "path": "/", "secure": secure}


def session_cookie_value(headers: Headers) -> str | None:
    """The session id the request's cookie carries, or None."""
    cookies = SimpleCookie()
    try:
        cookies.load(headers.get("cookie", ""))
    except Exception:  # a malformed cookie header is just "no cookie"
        return None
    morsel = cookies.get(SESSION_COOKIE)
    return morsel.value if morsel is not None and morsel.value else None


def bearer_token(headers: Headers) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None when there is none."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


class TokenAuth:
    """When a token is configured, answer 401 to every non-public request without it (a
    live session cookie or the bearer token), and 429 to a client guessing it."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.auth.token or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        session_id = session_cookie_value(headers)
        if session_id is not None and self.auth.sessions.valid(session_id):
            await self.app(scope, receive, send)
            return
        candidate = bearer_token(headers)
        if candidate is None:
            response = error_response(
                Request(scope),
                401,
                "unauthorized",
                "this server needs a token: send 'Authorization: Bearer TOKEN'",
                {"WWW-Authenticate": "Bearer"},
            )
        else:
            response = self.auth.check(scope, candidate)
        if response is None:
            await self.app(scope, receive, send)
            return
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
