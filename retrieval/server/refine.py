"""Query parameters that refine a search (filters, cut-off, order), shared by the search routes.

``Refine`` is a FastAPI dependency: it validates ``after``, ``before``, ``in``, ``camera``,
``min_size``, ``format``, ``tag``, ``cutoff``, ``min_score`` and ``sort`` into the
engine's :class:`~retrieval.search.ranking.SearchOptions` (paging is filled in by the route), or
None when none is given. Semantics are the CLI's (see retrieval/filters.py); over HTTP a
folder must be absolute or a glob starting with ``*``, since the server's working
directory means nothing to a client.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from fastapi import Depends, Query

from retrieval.search.errors import QueryError
from retrieval.search.filters import FilterArgs, build_filter
from retrieval.search.ranking import SearchOptions

Words = Annotated[str | None, Query(max_length=200)]
Many = list[str] | None


def refinements(
    after: Annotated[str | None, Query(max_length=40, description="Taken on/after DATE.")] = None,
    before: Annotated[str | None, Query(max_length=40, description="Taken before DATE.")] = None,
    folders: Annotated[
        Many, Query(alias="in", description="Absolute folder or glob ('*/2019*'), repeatable.")
    ] = None,
    camera: Annotated[Words, Query(description="Words of the camera make/model.")] = None,
    min_size: Annotated[str | None, Query(max_length=20, description="At least WxH.")] = None,
    formats: Annotated[Many, Query(alias="format", description="jpeg, png, heic, ...")] = None,
    tags: Annotated[Many, Query(alias="tag", description="A `clipdex tag` label; all.")] = None,
    cutoff: Annotated[
        Literal["auto", "none"] | None,
        Query(description="auto: only results that stand out for this query."),
    ] = None,
    min_score: Annotated[
        float | None, Query(ge=-1.0, le=1.0, description="Only results scoring above this.")
    ] = None,
    sort: Annotated[
        Literal["score", "date", "date-asc"],
        Query(description="score, or capture time (date: newest first)."),
    ] = "score",
) -> SearchOptions | None:
    """The refinements of one search request; None when the request has none."""
    args = FilterArgs(
        after=after,
        before=before,
        folders=tuple(_checked_folder(f) for f in folders or ()),
        camera=camera,
        min_size=min_size,
        formats=tuple(_no_nul(f) for f in formats or ())[:20],
        tags=tuple(_no_nul(t) for t in tags or ())[:20],
    )
    if args == FilterArgs() and cutoff is None and min_score is None and sort == "score":
        return None
    return SearchOptions(filter=build_filter(args), cutoff=cutoff, min_score=min_score, sort=sort)


def _checked_folder(folder: str) -> str:
    folder = _no_nul(folder)
    if not (os.path.isabs(folder) or folder.startswith("*")):
        raise QueryError(f"in={folder!r}: give an absolute folder or a glob starting with *")
    return folder


def _no_nul(text: str) -> str:
    if "\x00" in text or len(text) > 1000:
        raise QueryError("a filter value has a NUL character or is over 1000 characters")
    return text


Refine = Annotated[SearchOptions | None, Depends(refinements)]


def page_fields(page) -> dict:
    """The refinement facts of a :class:`~retrieval.search.engine.SearchPage` for a response."""
    return {
        "sort": page.options.sort,
        "total": page.total,
        "cutoff": page.cutoff.as_dict() if page.cutoff else None,
    }
