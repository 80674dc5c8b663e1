"""The search routes' query parameters as one :class:`~retrieval.search.options.SearchOptions`.

``Options`` is a FastAPI dependency: it reads ``k``, ``offset``, ``after``, ``before``,
``in``, ``camera``, ``min_size``, ``format``, ``tag``, ``cutoff``, ``min_score``,
``sort`` and ``raw_pairs`` and builds the same options object the CLI and Python callers
build, which validates them (bad values: 400). Semantics are the CLI's (see
retrieval/search/filters.py); over HTTP a folder must be absolute or a glob starting with
``*``, since the server's working directory means nothing to a client.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

from fastapi import Depends, Query

from retrieval.search.errors import QueryError
from retrieval.search.options import MAX_K, SearchOptions

Words = Annotated[str | None, Query(max_length=200)]
Many = list[str] | None
K = Annotated[int, Query(ge=1, le=MAX_K, description="How many results.")]
Offset = Annotated[int, Query(ge=0, le=MAX_K, description="Skip this many (paging).")]


def search_options(
    k: K = 20,
    offset: Offset = 0,
    after: Annotated[str | None, Query(max_length=40, description="Taken on/after DATE.")] = None,
    before: Annotated[str | None, Query(max_length=40, description="Taken before DATE.")] = None,
    folders: Annotated[
        Many, Query(alias="in", description="Absolute folder or glob ('*/2019*'), repeatable.")
    ] = None,
    camera: Annotated[Words, Query(description="Words of the camera make/model.")] = None,
    min_size: Annotated[str | None, Query(max_length=20, description="At least WxH.")] = None,
    formats: Annotated[Many, Query(alias="format", description="jpeg, png, heic, ...")] = None,
    tags: Annotated[Many, Query(alias="tag", description="A `clipdex tag` label; all.")] = None,
    kind: Annotated[
        Literal["photo", "video"] | None, Query(description="Only photos, or only videos.")
    ] = None,
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
    raw_pairs: Annotated[
        bool,
        Query(description="List both files of a RAW+JPEG pair (default: once, the JPEG)."),
    ] = False,
) -> SearchOptions:
    """The options of one search request (paging, filters, cut-off, order)."""
    return SearchOptions(
        k=k,
        offset=offset,
        after=after,
        before=before,
        folders=checked_folders(folders),
        camera=camera,
        min_size=min_size,
        formats=tuple(_no_nul(f) for f in formats or ())[:20],
        tags=tuple(_no_nul(t) for t in tags or ())[:20],
        kind=kind,
        cutoff=cutoff,
        min_score=min_score,
        sort=sort,
        raw_pairs=raw_pairs,
    )


def checked_folders(folders: list[str] | None) -> tuple[str, ...]:
    """``in=`` values: each absolute or a glob starting with ``*`` (QueryError otherwise)."""
    return tuple(_checked_folder(f) for f in folders or ())


def _checked_folder(folder: str) -> str:
    folder = _no_nul(folder)
    if not (os.path.isabs(folder) or folder.startswith("*")):
        raise QueryError(f"in={folder!r}: give an absolute folder or a glob starting with *")
    return folder


def _no_nul(text: str) -> str:
    if "\x00" in text or len(text) > 1000:
        raise QueryError("a filter value has a NUL character or is over 1000 characters")
    return text


Options = Annotated[SearchOptions, Depends(search_options)]


def page_fields(page) -> dict:
    """The refinement facts of a :class:`~retrieval.search.engine.SearchPage` for a response."""
    return {
        "sort": page.options.sort,
        "total": page.total,
        "cutoff": page.cutoff.as_dict() if page.cutoff else None,
        **({"fusion": page.fusion} if page.fusion is not None else {}),
    }
