"""Interfaces, command line: the ``clipdex`` typer app (thin commands over the front door)."""

from retrieval.cli.app import app, main

__all__ = ["app", "main"]
