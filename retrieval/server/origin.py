"""Host and Origin checks: DNS rebinding and cross-site requests are refused before any route.

**DNS rebinding.** A hostile page at ``http://evil.example:8000`` makes its own name resolve
to 127.0.0.1; the browser then sends the page's requests to clipdex with
``Host: evil.example:8000`` and lets the page read the answers (same origin, as far as the
browser knows), photos included. The defence is to answer only ``Host`` names an attacker
cannot point at this machine: IP literals (no DNS is involved), ``localhost`` and
``*.localhost`` (browsers resolve those themselves), and the names the user listed with
``--allowed-host``. Everything else gets 421 ``bad_host``. (Vite, Jupyter and Home
Assistant check ``Host`` for the same reason.)

**Cross-site requests.** Any page may make the browser *send* a form POST, an ``<img>`` or
a ``fetch`` to ``http://127.0.0.1:8000``: it cannot read the answer, but the request still
runs (an index job, a classify that holds the model for a minute) and an image's size can
be read. Such requests are refused with 403 ``cross_site`` when the browser says so: an
``Origin`` that is not this server's own (or an allowed host's), or
``Sec-Fetch-Site: cross-site``. Refused are every request that is not GET/HEAD/OPTIONS, and
every other GET (the API, ``/docs``, ``/readyz``) that is not a person following a link (a
top-level navigation). The page shell and ``/healthz`` stay open.
Clients that are not browsers (curl, the OpenAI client) send neither header and pass.
"""

from __future__ import annotations

import ipaddress

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from retrieval.server.errors import error_response

ANY_HOST = "*"
LOOPBACK_NAMES = frozenset({"localhost"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Paths a cross-site GET may reach: the page shell and liveness (nothing private in them).
OPEN_PATHS = frozenset({"/", "/favicon.ico", "/healthz"})
DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_name(name: str) -> str:
    """A host name as compared: lower case, without a trailing dot or IPv6 brackets."""
    return name.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")


def valid_allowed_host(entry: str) -> bool:
    """An ``--allowed-host`` entry: ``*``, a name, ``.example.com`` (the domain and its
    subdomains) or an IP address; no scheme, port or path."""
    if entry == ANY_HOST:
        return True
    if is_ip(entry):
        return True
    name = entry.removeprefix(".")
    labels = name.split(".")
    return bool(name) and all(
        label
        and len(label) <= 63
        and all(c.isascii() and (c.isalnum() or c in "-_") for c in label)
        for label in labels
    )


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])  # an IPv6 zone id is not part of the address
    except ValueError:
        return False
    return True


def split_host(value: str) -> tuple[str, int | None] | None:
    """``name[:port]`` or ``[v6][:port]`` -> (normalised name, port); None when malformed."""
    value = value.strip()
    if not value or not value.isascii() or any(c in value for c in "/@\\ \t?#"):
        return None
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or not is_ip(name) or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:] if rest else ""
    else:
        name, _, port_text = value.partition(":")
        if ":" in port_text:
            return None
    if port_text and not (port_text.isdigit() and 0 < int(port_text) < 65536):
        return None
    name = normalise_name(name)
    if not name:
        return None
    port = int(port_text) if port_text else None
    return name, (None if port in (80, 443) else port)


def split_origin(origin: str) -> tuple[str, int | None] | None:
    """``scheme://host[:port]`` -> (normalised name, port or None for the scheme's default)."""
    scheme, sep, rest = origin.strip().partition("://")
    if not sep or scheme.lower() not in DEFAULT_PORTS:
        return None
    parsed = split_host(rest)
    if parsed is None:
        return None
    name, port = parsed
    return name, (None if port == DEFAULT_PORTS[scheme.lower()] else port)


class HostPolicy:
    """Which ``Host`` names this server answers and which origins it treats as its own."""

    def __init__(self, allowed: tuple[str, ...] = ()) -> None:
        entries = {normalise_name(entry) for entry in allowed}
        self.any_host = ANY_HOST in entries
        self.names = frozenset(e for e in entries if e != ANY_HOST and not e.startswith("."))
        self.suffixes = tuple(e for e in entries if e.startswith("."))

    def named(self, name: str) -> bool:
        """True when ``--allowed-host`` lists ``name`` (exactly or by a ``.domain`` entry)."""
        return name in self.names or any(
            name == suffix[1:] or name.endswith(suffix) for suffix in self.suffixes
        )

    def host_allowed(self, name: str) -> bool:
        """True for names DNS rebinding cannot use, and for the listed ones."""
        if self.any_host or is_ip(name) or name in LOOPBACK_NAMES:
            return True
        return name.endswith(".localhost") or self.named(name)

    def bad_host(self, headers: Headers) -> str | None:
        """The offending ``Host`` value, or None when the request may be answered."""
        values = headers.getlist("host")
        if not values:
            return None  # HTTP/1.0 without Host: not a browser, nothing to rebind
        parsed = split_host(values[0]) if len(values) == 1 else None
        if parsed is None or not self.host_allowed(parsed[0]):
            return ", ".join(values)
        return None

    def cross_site(self, headers: Headers) -> str | None:
        """Why the request comes from another site's page, or None when it does not."""
        if headers.get("sec-fetch-site", "").lower() == "cross-site":
            return "Sec-Fetch-Site: cross-site"
        origin = headers.get("origin")
        if origin is None:
            return None
        parsed = split_origin(origin)
        if parsed is None:
            return f"Origin: {origin}"
        host = split_host(headers.get("host", ""))
        if parsed == host or self.named(parsed[0]):
            return None
        return f"Origin: {origin}"


def needs_same_site(scope: Scope, headers: Headers) -> bool:
    """Requests another site's page may not make: any that can change something, and API
    reads that are not a person following a link."""
    if scope["method"] not in SAFE_METHODS:
        return True
    path = scope["path"]
    if path in OPEN_PATHS or path.startswith("/static/"):
        return False
    top_level = (
        headers.get("sec-fetch-mode") == "navigate" and headers.get("sec-fetch-dest") == "document"
    )
    return not top_level


def printable(value: str, limit: int = 100) -> str:
    """A header value fit to quote in a message: printable ASCII, at most ``limit`` chars."""
    text = "".join(c if c.isascii() and c.isprintable() else "?" for c in value)
    return text if len(text) <= limit else text[:limit] + "…"


class HostOriginGuard:
    """ASGI middleware: 421 ``bad_host`` for a ``Host`` not allowed, 403 ``cross_site`` for
    a request another site's page may not make. On by default; ``--allowed-host`` widens it."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...] = ()) -> None:
        self.app = app
        self.policy = HostPolicy(allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = self.policy.bad_host(headers)
        if host is not None:
            parsed = split_host(host)
            name = printable(parsed[0]) if parsed else "NAME"
            message = (
                f"this server does not answer for the host name '{printable(host)}' (a guard "
                "against DNS rebinding): open it by its IP address or as localhost, or start "
                f"it with --allowed-host {name} (env CLIPDEX_ALLOWED_HOSTS) if that name is yours"
            )
            response = error_response(Request(scope), 421, "bad_host", message)
            await response(scope, receive, send)
            return
        reason = self.policy.cross_site(headers) if needs_same_site(scope, headers) else None
        if reason is not None:
            message = (
                f"refused a cross-site request ({printable(reason)}): a page of another site "
                f"may not {scope['method']} {printable(scope['path'])} here. If that site is "
                "yours (e.g. a reverse proxy's name), start the server with --allowed-host NAME"
            )
            response = error_response(Request(scope), 403, "cross_site", message)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
