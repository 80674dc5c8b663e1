"""Interfaces, command line: the ``clipdex`` typer app (thin commands over the front door).

Owns parsing flags and environment variables (resolved here, passed inward as plain
objects), rendering results and turning typed errors into a message and an exit code (one
place: ``app.fail``). It imports the layers below: the front door (modules directly in
``retrieval/``), ``retrieval.search`` and ``indexer``. It never imports the server, except
that ``clipdex serve`` launches it through ``retrieval.server.serving`` and its settings.
It is the one home of typer and rich.
"""

from retrieval.cli.app import app, main

__all__ = ["app", "main"]
