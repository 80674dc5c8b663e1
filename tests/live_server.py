"""A real uvicorn server on a free loopback port, in a thread, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import uvicorn


class LiveServer:
    """Context manager: ``with LiveServer(app) as server: httpx.get(server.url + ...)``."""

    def __init__(self, app, log_level: str = "warning") -> None:
        self.app = app
        self.log_level = log_level
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LiveServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(self._config())
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def _config(self) -> uvicorn.Config:
        """``clipdex serve``'s own uvicorn configuration (limits, protocol) for a clipdex app."""
        from retrieval.server.serving import uvicorn_config

        state = getattr(getattr(self.app, "state", None), "clipdex", None)
        if state is None:
            return uvicorn.Config(self.app, log_level=self.log_level, timeout_keep_alive=5)
        return uvicorn_config(self.app, state.settings, log_level=self.log_level)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until /readyz says 200 (library open, model loaded)."""
        wait_ready(self.url, timeout)

    def __exit__(self, *exc) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(30)


def wait_ready(url: str, timeout: float = 120.0, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = httpx.get(f"{url}/readyz", headers=headers, timeout=5)
            if last.status_code == 200:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s: {getattr(last, 'text', last)}")


def rotated_photo(path) -> None:
    """A 200x100 JPEG stored landscape with EXIF orientation 6 (shown portrait, 100x200)."""
    from PIL import Image

    image = Image.new("RGB", (200, 100), (200, 30, 30))
    image.paste((30, 30, 200), (0, 0, 100, 100))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, "JPEG", exif=exif, quality=92)


@contextlib.contextmanager
def served(library, encoder, **settings):
    """A live server over ``library`` with ``encoder``; yields (server, httpx client)."""
    from retrieval.server import Settings, create_app

    app = create_app(Settings(library=library, **settings), encoder=encoder)
    headers = {"Authorization": f"Bearer {settings['token']}"} if settings.get("token") else {}
    with LiveServer(app) as server:
        wait_ready(server.url, headers=headers)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield server, client


def raw_request(url: str, data: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``data`` as is on a fresh connection and read the answer to its end.

    No client library in the way: httpx and browsers normalise ``..`` and some encodings
    before sending, which is exactly what a hostile client does not do. Returns the status
    (0 when the server closed without answering) and the whole response bytes.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0].split()
    return (int(status_line[1]) if len(status_line) > 1 else 0), answer


def raw_get(url: str, target: bytes, headers: bytes = b"") -> tuple[int, bytes]:
    """``GET target`` with the target sent byte for byte."""
    request = b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    return raw_request(url, request + headers + b"\r\n")
