"""How the app runs under uvicorn, with the limits that keep a slow client from holding it.

One :func:`uvicorn_config` serves ``clipdex serve`` and the tests, so what is tested is
what runs. A slow client (slowloris) can hold a connection at three moments, and each has
a deadline:

- **headers**: uvicorn waits for a request's headers for ever (its keep-alive timer
  stops at the first byte). :class:`GuardedH11Protocol` closes a connection whose request
  headers are not complete ``header_timeout`` seconds after it opened or after the
  previous response. h11 (not httptools) because it also bounds the header bytes it
  buffers (``h11_max_incomplete_event_size``).
- **body**: :class:`SlowClientGuard` answers 408 when a request's body has not fully
  arrived ``request_timeout`` seconds after its headers.
- **response**: the same guard drops a client that takes no response bytes for
  ``request_timeout`` seconds (a full socket buffer would otherwise park the send).

Beyond ``max_connections`` open connections (or running requests) a request is answered
503 at once, so the connections still waiting out a deadline cannot exhaust the process.
uvicorn enforces that cap (``limit_concurrency``) in its protocol, with a fixed plain-text
answer; :class:`GuardedH11Protocol` takes the cap over, applies uvicorn's very rule and
answers in the project's JSON error shape with ``Retry-After`` (see :func:`over_capacity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import h11
import uvicorn
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from indexer.errors import ConfigError
from retrieval.server.errors import Overloaded, RequestTimeout, error_response
from retrieval.server.settings import Settings

log = logging.getLogger("clipdex.server")

KEEP_ALIVE_SECONDS = 5  # an idle keep-alive connection is closed after this
MAX_HEADER_BYTES = 16 * 1024  # request line + headers; more is answered 400 and closed
CAP_RETRY_AFTER_SECONDS = 2  # what a client over --max-connections is told to wait


async def over_capacity(scope: Scope, receive: Receive, send: Send, cap: int) -> None:
    """The answer beyond the connection cap: 503 in the JSON error shape, then close."""
    message = (
        f"the server is at its limit of {cap} open connections or running requests "
        "(the server's --max-connections): retry shortly"
    )
    headers = {"Retry-After": str(CAP_RETRY_AFTER_SECONDS), "Connection": "close"}
    response = error_response(Request(scope), 503, Overloaded.code, message, headers)
    await response(scope, receive, send)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline for each request's headers and a JSON answer
    beyond the connection cap."""

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Take the cap from uvicorn (whose answer is a fixed text/plain 503) and apply it
        # in front of the app instead, where the answer is ours.
        self.connection_cap, self.limit_concurrency = self.limit_concurrency, None
        self._inner_app, self.app = self.app, self._app_within_cap

    def _over_cap(self) -> bool:
        """uvicorn's rule: the connections (this one included) or the running requests
        reached the cap. uvicorn counts before adding this request's task; here it counts."""
        cap = self.connection_cap
        return cap is not None and (len(self.connections) >= cap or len(self.tasks) > cap)

    async def _app_within_cap(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self._over_cap():
            log.warning("over --max-connections (%d): answered 503", self.connection_cap)
            await over_capacity(scope, receive, send, self.connection_cap)
            return
        await self._inner_app(scope, receive, send)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_deadline)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline(self) -> None:
        """Close the connection unless a request arrived since the timer was armed."""
        self._header_timer = None
        busy = self.cycle is not None and not self.cycle.response_complete
        if busy or self.transport.is_closing():
            return
        log.info("closing a connection whose request headers took over %gs", self.header_timeout)
        with contextlib.suppress(h11.LocalProtocolError):  # as uvicorn does on a lost peer
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def guarded_protocol(header_timeout: float) -> type[GuardedH11Protocol]:
    """The protocol class with this header deadline (uvicorn takes a class, not an object)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout})


class SlowClientGuard:
    """ASGI middleware: a deadline for the request body and a stall limit on the response."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        body_done = False
        dropped = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # later receives only wait for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                raise RequestTimeout(self.timeout) from None
            body_done = message["type"] != "http.request" or not message.get("more_body")
            return message

        async def timed_send(message: Message) -> None:
            nonlocal dropped
            if dropped:  # uvicorn closes the connection when the app returns
                return
            try:
                await asyncio.wait_for(send(message), self.timeout)
            except asyncio.TimeoutError:
                dropped = True
                log.info("dropping a client that took no response bytes for %gs", self.timeout)

        await self.app(scope, timed_receive, timed_send)


def uvicorn_config(
    app: ASGIApp, settings: Settings, host: str = "127.0.0.1", port: int = 8000, **options
) -> uvicorn.Config:
    """The uvicorn configuration of ``clipdex serve``; ``options`` go to uvicorn as is."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(settings.header_timeout),
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        limit_concurrency=settings.max_connections,
        server_header=False,
        **options,
    )


def run_server(app: ASGIApp, settings: Settings, host: str, port: int, **options) -> None:
    """Serve until interrupted (what ``clipdex serve`` does); raise if it never started."""
    server = uvicorn.Server(uvicorn_config(app, settings, host, port, **options))
    server.run()  # uvicorn handles SIGINT/SIGTERM: a graceful stop
    if not server.started:
        raise ConfigError(f"the server could not start on {host}:{port}: see the lines above")
