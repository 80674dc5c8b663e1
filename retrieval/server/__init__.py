"""clipdex's HTTP server: REST API, OpenAI-compatible embeddings and the web page.

``create_app(settings)`` builds the FastAPI app; ``clipdex serve`` runs it under uvicorn.

Interfaces layer, beside the CLI: it owns routes, request and response schemas, the
translation of typed errors into JSON and HTTP statuses, auth, limits and the web page. It
imports the layers below (the front door in ``retrieval/``, ``retrieval.search``,
``indexer``) and never the CLI. It is the one home of FastAPI, Starlette and uvicorn.
"""

from retrieval.server.app import create_app
from retrieval.server.settings import Settings

__all__ = ["Settings", "create_app"]
