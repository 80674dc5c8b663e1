"""The app factory: one FastAPI app over one library and one model, all injected."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.security import HTTPBearer
from starlette.concurrency import run_in_threadpool

from indexer.store.library import Library
from retrieval.server import api, docs, errors, openai_compat, routes_search_plus, web
from retrieval.server.inputs import Utf8QueryString
from retrieval.server.origin import HostOriginGuard
from retrieval.server.responses import PathJSONResponse
from retrieval.server.security import Auth, BodyLimit, SecurityHeaders, TokenAuth
from retrieval.server.serving import SlowClientGuard
from retrieval.server.settings import Settings
from retrieval.server.state import EncoderSource, ServerState, _version
from retrieval.server.workload import CancelOnDisconnect

DESCRIPTION = """Search a clipdex photo library by text or by image, browse its photos, start
indexing jobs, and embed texts and images with MobileCLIP-S2 through an OpenAI-compatible
endpoint. Errors are `{"error": {"code", "message"}}` with the HTTP status."""


def create_app(
    settings: Settings,
    *,
    encoder: EncoderSource | None = None,
    library: Library | None = None,
) -> FastAPI:
    """Build the app. ``encoder`` (an encoder or a factory) and ``library`` default to the
    ones ``settings`` names; tests hand in a fake encoder or an open library."""
    state = ServerState(settings, encoder, library)
    owns_library = library is None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.start()
        yield
        await run_in_threadpool(state.close, owns_library)

    app = FastAPI(
        title="clipdex",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        redoc_url=None,
        docs_url=None,  # .docs serves /docs without a CDN
        default_response_class=PathJSONResponse,  # file paths lossless, as the CLI's --json
    )
    app.state.clipdex = state
    app.state.auth = Auth(
        settings.token,
        settings.session_seconds,
        settings.auth_free_failures,
        settings.auth_backoff,
    )
    errors.install(app)
    # Documents the bearer scheme in /openapi.json; TokenAuth below does the enforcing.
    guard = [Depends(HTTPBearer(auto_error=False))] if settings.token else []
    app.include_router(api.router, dependencies=guard)
    app.include_router(routes_search_plus.router, dependencies=guard)
    app.include_router(openai_compat.router, dependencies=guard)
    web.mount(app)
    docs.mount(app)
    # Innermost: a request's model and decode work stops when its client disconnects.
    app.add_middleware(CancelOnDisconnect, max_megapixels=settings.max_request_megapixels)
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    app.add_middleware(Utf8QueryString)  # q=%FF is refused, not searched for as U+FFFD
    app.add_middleware(TokenAuth, auth=app.state.auth)
    # Outside the token check: a rebound or cross-site request learns nothing, token or not.
    app.add_middleware(HostOriginGuard, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(SlowClientGuard, timeout=settings.request_timeout)
    return app
