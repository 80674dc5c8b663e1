"""Bounded work, fairly shared: what one request may cost, and stopping work nobody awaits.

Three pieces (issue 14):

- :class:`RequestWork` is one request's account: whether it should stop (its client
  disconnected, or a model call of it timed out) and how many decoded pixels it may still
  spend. :class:`CancelOnDisconnect` (ASGI middleware) opens one per HTTP request and
  cancels it when the client goes; the routes' threads find it with :func:`current_work`
  (a context variable: Starlette copies the context into the thread that runs a route).
- :class:`SerialEncoder` runs every model call on one dedicated thread, cut into chunks
  (texts :data:`TEXT_CHUNK`, images :data:`IMAGE_CHUNK`) with the request checked before
  each: a disconnected client's batch stops at the next chunk. It has two lanes: a call of
  at most :data:`INTERACTIVE_ITEMS` items (a text search, one upload) goes before the
  chunks of big calls, and a big call queues one chunk at a time, so two greedy clients
  take turns and a search waits for one chunk at most.
- Caps, each a setting with a 4xx answer naming it: prompts per classify request, inputs
  per embeddings request, megapixels decoded per request (:meth:`RequestWork.decode`).

After a large decode the freed pixel buffers are handed back to the system
(:func:`release_memory`): glibc keeps freed heap pages in its arenas otherwise, and a burst
of decompression bombs would leave the server at its peak size for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import ctypes
import ctypes.util
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from indexer.errors import ClipdexError
from indexer.model.identity import Encoder
from retrieval.server.errors import Overloaded

log = logging.getLogger("clipdex.server")

TEXT_CHUNK = 32  # texts per model call: a waiting search waits for one chunk at most
IMAGE_CHUNK = 8
INTERACTIVE_ITEMS = 4  # calls this small (a search, one upload) take the fast lane
TRIM_AFTER_PIXELS = 16_000_000  # a decode this large hands freed memory back afterwards
# Routes that decode uploads or run many model calls. At most HEAVY_AT_ONCE of them run at
# once; the others wait in the event loop, holding no thread, so of the 40 threads that run
# sync routes most stay free for cheap requests (a text search, /readyz, a thumbnail).
HEAVY_ROUTES = frozenset(
    {
        ("POST", "/api/search/image"),
        ("POST", "/api/classify"),
        ("POST", "/v1/embeddings"),
        ("POST", "/api/index"),
    }
)
HEAVY_AT_ONCE = 16


class Cancelled(ClipdexError):
    """The request's client went away (or its time ran out): its work stopped."""

    code = "cancelled"
    http_status = 499  # nginx's "client closed request": nobody reads it


class TooCostly(ClipdexError):
    """One request asks for more work than a per-request cap allows."""

    code = "too_costly"
    http_status = 413


def over_cap(what: str, asked: float, cap: float, setting: str, flag: str) -> TooCostly:
    """The 413 for a request over a per-request cap, naming the setting that allows more."""
    return TooCostly(
        f"this request asks for {asked:g} {what}, over the server's limit of {cap:g} per "
        f"request (--{flag}): send fewer, or raise the limit",
        setting=setting,
    )


def check_prompts(labels: int, templates: int, cap: int) -> None:
    """A classify request's own label set costs ``labels x templates`` text-tower passes."""
    if labels * templates > cap:
        raise over_cap(
            f"prompts ({labels} labels x {templates} templates)",
            labels * templates,
            cap,
            "max_request_prompts",
            "max-request-prompts",
        )


class RequestWork:
    """One request's account: a stop flag and a budget of decoded megapixels."""

    def __init__(self, max_megapixels: float | None = None) -> None:
        self._stop = threading.Event()
        self.reason = ""
        self.max_megapixels = max_megapixels
        self.megapixels = 0.0  # decoded so far
        self.answered = False  # the response has been sent whole

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def cancel(self, reason: str) -> None:
        if not self._stop.is_set():
            self.reason = reason
            self._stop.set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if this request's work should stop."""
        if self._stop.is_set():
            raise Cancelled(f"stopped: {self.reason}")

    def decode(self, data: bytes, per_image_megapixels: float):
        """``decode_for_model(data)`` within what is left of the request's pixel budget.

        The budget is checked from the image header, before any pixel is decoded: the image
        is decoded with a per-image limit of what is left, and an image refused only by
        that lower limit is answered as over the per-request cap.
        """
        from indexer.ingest.decode import decode_for_model

        self.check()
        limit = per_image_megapixels  # <= 0: no per-image limit
        if self.max_megapixels:
            left = max(self.max_megapixels - self.megapixels, 1e-6)
            if limit <= 0 or left < limit:
                limit = left
        try:
            pixels, info = decode_for_model(data, max_megapixels=limit)
        except ClipdexError as exc:
            if exc.setting == "max_megapixels" and limit != per_image_megapixels:
                raise self._over_budget() from None
            raise
        self.megapixels += info.width * info.height / 1e6
        return pixels, info

    def _over_budget(self) -> TooCostly:
        return TooCostly(
            f"this request's images are over the server's limit of {self.max_megapixels:g} "
            f"megapixels decoded per request ({self.megapixels:.1f} decoded before the image "
            "that would pass it; --max-request-megapixels): send fewer or smaller images",
            setting="max_request_megapixels",
        )


_current: contextvars.ContextVar[RequestWork | None] = contextvars.ContextVar(
    "clipdex_request_work", default=None
)


def current_work() -> RequestWork | None:
    """The account of the HTTP request this thread works for (None outside a request)."""
    return _current.get()


class CancelOnDisconnect:
    """ASGI middleware: one :class:`RequestWork` per HTTP request, cancelled when the
    client disconnects.

    A pump task reads the request's messages as they come and hands them to the app in
    order (errors raised by an outer ``receive``, such as a body over the limit, reach the
    app as before); the pump sees ``http.disconnect`` even while the route runs in a thread
    and never reads again, which is when its work is cancelled.

    A request to one of :data:`HEAVY_ROUTES` first waits for one of :data:`HEAVY_AT_ONCE`
    places (first come, first served); one whose client left while it waited never runs.
    """

    def __init__(
        self, app: ASGIApp, max_megapixels: float | None = None, heavy_at_once: int = HEAVY_AT_ONCE
    ) -> None:
        self.app = app
        self.max_megapixels = max_megapixels
        self.heavy_at_once = heavy_at_once
        self._heavy: asyncio.Semaphore | None = None  # made in the server's event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        work = RequestWork(self.max_megapixels)
        inbox: asyncio.Queue[Message | BaseException] = asyncio.Queue()
        what = f"{scope.get('method', '')} {scope.get('path', '')}"
        pump = asyncio.create_task(_pump(receive, inbox, work, what))

        async def relayed_receive() -> Message:
            item = await inbox.get()
            if isinstance(item, BaseException):
                inbox.put_nowait(item)  # a second receive fails alike
                raise item
            if item["type"] == "http.disconnect":
                inbox.put_nowait(item)
            return item

        async def noting_send(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                work.answered = True  # a disconnect from now on is the connection's end
            await send(message)

        token = _current.set(work)
        try:
            if _route(scope) in HEAVY_ROUTES:
                if self._heavy is None:
                    self._heavy = asyncio.Semaphore(self.heavy_at_once)
                async with self._heavy:
                    if not work.cancelled:  # else nobody is left to answer
                        await self.app(scope, relayed_receive, noting_send)
            else:
                await self.app(scope, relayed_receive, noting_send)
        finally:
            _current.reset(token)
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump


def _route(scope: Scope) -> tuple[str, str]:
    """(method, path below the app's root path) of an HTTP request."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return scope.get("method", ""), path


async def _pump(receive: Receive, inbox: asyncio.Queue, work: RequestWork, what: str) -> None:
    """Move messages to ``inbox`` until the client disconnects (then cancel ``work``)."""
    while True:
        try:
            message = await receive()
        except Exception as exc:  # e.g. the body limit or deadline: the app raises it
            inbox.put_nowait(exc)
            return
        inbox.put_nowait(message)
        if message["type"] == "http.disconnect":
            if not work.answered:
                work.cancel("the client disconnected")
                log.debug("the client of %s disconnected: its work stops", what)
            return


# -- the model thread ---------------------------------------------------------------------
class _ModelThread:
    """One thread running queued calls: the fast lane first, then the bulk lane (FIFO each).

    A queued call whose request was cancelled meanwhile is skipped, not run.
    """

    def __init__(self) -> None:
        self._lanes: tuple[deque, deque] = (deque(), deque())
        self._ready = threading.Condition()
        self._closed = False
        self.ran = 0  # calls run (tests count them)
        threading.Thread(target=self._loop, name="clipdex-model", daemon=True).start()

    def submit(self, fn: Callable, args: tuple, fast: bool, work: RequestWork | None) -> Future:
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise Overloaded("the server is stopping")
            self._lanes[0 if fast else 1].append((future, fn, args, work))
            self._ready.notify()
        return future

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not (self._lanes[0] or self._lanes[1] or self._closed):
                    self._ready.wait()
                if self._closed:
                    return
                future, fn, args, work = (self._lanes[0] or self._lanes[1]).popleft()
            if not future.set_running_or_notify_cancel():
                continue
            if work is not None and work.cancelled:
                future.set_exception(Cancelled(f"stopped: {work.reason}"))
                continue
            try:
                self.ran += 1
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller, who raises it
                future.set_exception(exc)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            for lane in self._lanes:
                for future, *_ in lane:
                    future.cancel()
                lane.clear()
            self._ready.notify_all()


class SerialEncoder:
    """An encoder whose calls all run, one at a time, on one dedicated thread.

    One at a time because the model already uses every core; on one thread because OpenMP
    (torch's intra-op pool) keeps a team of worker threads per calling thread: called from
    FastAPI's rotating pool threads, the teams would pile up and spin against each other.

    Calls are cut into chunks, run in turn with other requests' chunks (see the module
    notes); the request is checked before each, so a client that left stops costing model
    time at the next chunk. A call that waits over ``timeout`` seconds in all (queue + run)
    raises :class:`Overloaded` and its remaining chunks are not run, so a backlog does not
    outlive its clients.
    """

    def __init__(self, inner: Encoder, timeout: float | None = None) -> None:
        self.inner = inner
        self.identity = inner.identity
        self.timeout = timeout
        self.chunk_images = True  # index jobs keep their batches whole (see without_timeout)
        self._thread = _ModelThread()

    @property
    def calls_run(self) -> int:
        """Model calls run so far (chunks count one each)."""
        return self._thread.ran

    @property
    def logit_scale(self) -> float:
        return self._run(lambda: self.inner.logit_scale, (), True, current_work())

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        chunk = IMAGE_CHUNK if self.chunk_images else max(len(batch), 1)
        return self._encode(self.inner.encode_images, batch, chunk)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self._encode(self.inner.encode_texts, list(texts), TEXT_CHUNK)

    def without_timeout(self) -> SerialEncoder:
        """The same model thread without the time limit, for index jobs and label
        preparation: their calls may wait behind queries for as long as it takes. Their
        image batches stay whole (index vectors do not depend on how queries chunk)."""
        view = copy.copy(self)
        view.timeout = None
        view.chunk_images = False
        return view

    def warm_up(self) -> None:
        """First calls (weights paged in, kernels chosen) without a time limit."""
        blank = np.zeros((1, 3, 256, 256), np.float32)
        self._thread.submit(self.inner.encode_texts, (["a photo"],), True, None).result()
        self._thread.submit(self.inner.encode_images, (blank,), True, None).result()

    def _encode(self, fn: Callable, items, chunk: int) -> np.ndarray:
        work = current_work()
        fast = len(items) <= INTERACTIVE_ITEMS
        started = time.monotonic()
        parts = []
        for start in range(0, max(len(items), 1), chunk):
            if work is not None:
                work.check()
            parts.append(self._run(fn, (items[start : start + chunk],), fast, work, started))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _run(self, fn: Callable, args: tuple, fast: bool, work, started: float | None = None):
        future = self._thread.submit(fn, args, fast, work)
        wait = None
        if self.timeout is not None:
            elapsed = time.monotonic() - (started if started is not None else time.monotonic())
            wait = max(self.timeout - elapsed, 0.0)
        try:
            return future.result(wait)
        except FutureTimeout:
            future.cancel()  # a no-op once it runs; the answer is then dropped
            if work is not None:
                work.cancel("it waited too long for the model")
            raise Overloaded(
                f"the model is busy: this query waited over {self.timeout:g} s for it "
                "(the server's --request-timeout); retry shortly"
            ) from None

    def close(self) -> None:
        self._thread.close()


# -- memory ---------------------------------------------------------------------------------
def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl, Windows)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _load_trim()


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc's ``malloc_trim``; a no-op where
    there is none). Costs a few ms: called after large decodes only."""
    if _malloc_trim is not None:
        _malloc_trim(0)
