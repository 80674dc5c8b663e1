"""clipdex's HTTP server: REST API, OpenAI-compatible embeddings and the web page.

``create_app(settings)`` builds the FastAPI app; ``clipdex serve`` runs it under uvicorn.
"""

from retrieval.server.app import create_app
from retrieval.server.settings import Settings

__all__ = ["Settings", "create_app"]
