"""The web page: plain HTML, CSS and JS from ``retrieval/web``, no build step.

The page shell and its static files hold no data and need no token (the page asks for the
token when the API answers 401); everything it shows comes from the API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB_DIR = Path(__file__).resolve().parent / "web"
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/")
def page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=NO_CACHE)


@router.get("/favicon.ico")
def favicon() -> FileResponse:
    return FileResponse(WEB_DIR / "favicon.svg", media_type="image/svg+xml", headers=NO_CACHE)


def mount(app: FastAPI) -> None:
    """Add the page and its static files to ``app``."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
