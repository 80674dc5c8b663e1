"""Errors of the query side: a malformed query, filter or option value.

:class:`QueryError` lives here, not in ``indexer/errors.py``, because only the search layer
and the interfaces above it parse queries; the indexer never raises it.
"""

from __future__ import annotations

from indexer.errors import ClipdexError


class QueryError(ClipdexError):
    """A malformed query (grammar, filter, k)."""

    code = "bad_query"
    http_status = 400
