"""``/docs``: the Swagger UI page over ``/openapi.json``, served from this machine.

FastAPI's own page loads Swagger UI from a CDN, so it is blank offline or behind a strict
firewall, which is where a photo server often runs. The ``fastapi-offline`` package ships
the Swagger UI 5 files (Apache-2.0; Swagger UI 5 is needed for OpenAPI 3.1); only those
files are used, under ``/docs-assets``. Without that package the page falls back to the
CDN, as FastAPI does by default.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
ASSET_NAMES = ("swagger-ui-bundle.js", "swagger-ui.css")


def swagger_assets() -> Path | None:
    """The folder holding Swagger UI's files, when the package that ships them is there."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "static"
    return folder if all((folder / name).is_file() for name in ASSET_NAMES) else None


def mount(app: FastAPI) -> None:
    """Add ``/docs`` (the app must be made with ``docs_url=None``)."""
    assets = swagger_assets()
    if assets is not None:
        app.mount(ASSETS_URL, StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        local = {}
        if assets is not None:
            local = {
                "swagger_js_url": f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
                "swagger_css_url": f"{root}{ASSETS_URL}/swagger-ui.css",
            }
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API",
            swagger_favicon_url=f"{root}/favicon.ico",
            **local,
        )
