"""HTTP edge of the typed errors: every failure becomes ``{"error": {"code", "message"}}``.

Domain errors (:class:`~indexer.errors.ClipdexError`) carry their own ``code`` and
``http_status``; request-validation and routing errors get a code here. Anything else is a
bug: it is logged with its traceback and answered with a 500 that reveals nothing.
Under ``/v1`` the error also carries OpenAI's ``type`` and ``param`` keys, which the
official client reads.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.errors import ClipdexError, NotFound
from retrieval.server.responses import (
    PathJSONResponse as JSONResponse,  # messages may quote odd file names
)

log = logging.getLogger("clipdex.server")

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "timeout",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    422: "invalid_request",
    429: "busy",
    503: "not_ready",
}


class NotReady(ClipdexError):
    """The library or the model is still loading, or failed to load."""

    code = "not_ready"
    http_status = 503


class Unauthorized(ClipdexError):
    """A token is configured and the request did not carry it."""

    code = "unauthorized"
    http_status = 401


class Forbidden(ClipdexError):
    """The request is understood but not allowed here (e.g. a path outside --index-root)."""

    code = "forbidden"
    http_status = 403


class Busy(ClipdexError):
    """Too much queued work (index jobs) to accept more now."""

    code = "busy"
    http_status = 429


class Overloaded(ClipdexError):
    """A query waited longer than the server's --request-timeout for the model."""

    code = "overloaded"
    http_status = 503


class FileUnavailable(NotFound):
    """A catalogued photo whose file is gone, unreadable or no longer an image."""

    code = "file_unavailable"


class FileChanged(NotFound):
    """A catalogued photo's path now leads to another file (replaced, changed, or a link
    swapped in on any component): 404, and the photo is queued for re-indexing."""

    code = "file_changed"

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message  # short, for the re-index queue


class BodyTooLarge(StarletteHTTPException):
    """Raised while a request body is being received, so FastAPI lets it through as is."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(
            413,
            f"the request body is over the {limit_bytes / 2**20:g} MB limit "
            "(the server's --max-upload-mb)",
        )


class RequestTimeout(StarletteHTTPException):
    """The request body did not arrive in time (a slow or stalled client)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            408,
            f"the request body did not arrive within {seconds:g} s "
            "(the server's --request-timeout)",
            headers={"Connection": "close"},
        )


def error_body(request: Request | None, status: int, code: str, message: str) -> dict:
    """The JSON error document; OpenAI's extra keys under /v1."""
    error: dict = {"code": code, "message": message}
    if request is not None and request.url.path.startswith("/v1/"):
        error["type"] = "invalid_request_error" if status < 500 else "server_error"
        error["param"] = None
    return {"error": error}


def error_response(
    request: Request | None, status: int, code: str, message: str, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(request, status, code, message), status, headers=headers)


async def clipdex_error(request: Request, exc: ClipdexError) -> JSONResponse:
    headers = {"Retry-After": "5"} if exc.http_status == 503 else None
    if isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    body = error_body(request, exc.http_status, exc.code, str(exc))
    if exc.setting:  # the server setting that would fix it, e.g. "max_megapixels"
        body["error"]["setting"] = exc.setting
    return JSONResponse(body, exc.http_status, headers=headers)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status = exc.status_code
    code = STATUS_CODES.get(status, "error")
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
    message = exc.detail if isinstance(exc.detail, str) and exc.detail else phrase
    if status == 404 and message == phrase:
        message = f"no route {request.method} {request.url.path}: see /docs"
    return error_response(request, status, code, message, dict(exc.headers or {}))


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field; only strings go back (inputs may be undecodable bytes)."""
    details = [
        {
            "loc": [str(part) for part in err.get("loc", ())],
            "msg": str(err.get("msg", "")),
            "type": str(err.get("type", "")),
        }
        for err in exc.errors()
    ]
    message = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in details) or "invalid request"
    body = error_body(request, 422, "invalid_request", message)
    body["error"]["details"] = details
    return JSONResponse(body, 422)


async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(request, 500, "internal", "internal error: see the server log")


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""
    app.add_exception_handler(ClipdexError, clipdex_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)
