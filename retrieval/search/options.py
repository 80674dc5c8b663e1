"""The one options object of a search: how many, which page, which photos, which order.

The CLI's flags, the REST query parameters and Python callers all build the same
:class:`SearchOptions` from plain values; it validates them once, here, raising
:class:`~retrieval.search.errors.QueryError`, and carries the resulting
:class:`~retrieval.search.filters.ImageFilter` for the engine::

    SearchOptions(k=10, after="2021-06", folders=("~/Pictures/trips",), cutoff="auto")
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field

from retrieval.search.errors import QueryError
from retrieval.search.filters import FilterArgs, ImageFilter, build_filter, folder_pattern
from retrieval.search.text import check_path, check_text

MAX_K = 10_000
SORTS = ("score", "date", "date-asc")
CUTOFFS = ("auto", "none")

DateLike = str | dt.date | None


@dataclass(frozen=True)
class SearchOptions:
    """How to rank, filter and page one search; every field has the plain-search default.

    - ``k`` results (1..10000) from ``offset`` on (paging through one stable order).
    - Filters (all must hold): ``after`` / ``before`` (a date, a datetime, or text
      ``YYYY[-MM[-DD]]`` / ISO; ``after`` inclusive, ``before`` exclusive), ``folders``
      (folders or globs, any; relative ones are resolved against the current directory
      here), ``camera`` (words of "make model"), ``min_size`` (``"WxH"`` or ``(w, h)``,
      either orientation), ``formats`` (jpeg, png, heic, mp4, ...; any), ``tags`` (labels
      stored by ``clipdex tag``; all), ``kind`` (``"photo"`` or ``"video"``).
    - ``cutoff="auto"`` keeps only results that stand out for the query; ``min_score``
      keeps results scoring at least that; ``sort`` is ``score``, ``date`` (newest
      first) or ``date-asc``.
    - A RAW and a JPEG of one shot (same folder and name stem) count as one result, the
      JPEG, with the RAW noted; ``raw_pairs=True`` lists both files.
    """

    k: int = 20
    offset: int = 0
    after: DateLike = None
    before: DateLike = None
    folders: tuple[str, ...] = ()
    camera: str | None = None
    min_size: str | tuple[int, int] | None = None
    formats: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    kind: str | None = None  # "photo" | "video" | None (both)
    cutoff: str | None = None  # "auto" | "none" | None
    min_score: float | None = None
    sort: str = "score"
    raw_pairs: bool = False  # list both files of a RAW+JPEG pair
    filter: ImageFilter = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_int("k", self.k, 1, MAX_K)
        _check_int("offset", self.offset, 0, None)
        if self.sort not in SORTS:
            raise QueryError(f"sort must be one of {', '.join(SORTS)}, got {self.sort!r}")
        if self.cutoff is not None and self.cutoff not in CUTOFFS:
            raise QueryError(f"cutoff must be auto or none, got {self.cutoff!r}")
        if self.min_score is not None and not -1.0 <= float(self.min_score) <= 1.0:
            raise QueryError(f"min_score must be between -1 and 1, got {self.min_score}")
        for name in ("folders", "formats", "tags"):
            object.__setattr__(self, name, _strings(name, getattr(self, name)))
        self._check_text()
        # Relative folders mean the caller's current directory: fix them now, once.
        folders = tuple(folder_pattern(f) for f in self.folders if f.strip())
        object.__setattr__(self, "folders", folders)
        object.__setattr__(self, "filter", build_filter(self._filter_args()))

    def _check_text(self) -> None:
        """Filter values must be usable text, folders usable paths (see .text)."""
        for name in ("after", "before", "camera", "min_size", "kind"):
            if isinstance(getattr(self, name), str):
                check_text(getattr(self, name), name)
        for name in ("formats", "tags"):
            for value in getattr(self, name):
                check_text(value, name)
        for folder in self.folders:
            check_path(folder, "folders")

    def _filter_args(self) -> FilterArgs:
        size = self.min_size
        if isinstance(size, tuple | list):
            size = "x".join(str(int(side)) for side in size)
        return FilterArgs(
            after=_date_text(self.after),
            before=_date_text(self.before),
            folders=self.folders,
            camera=self.camera,
            min_size=size,
            formats=self.formats,
            tags=self.tags,
            kind=self.kind,
        )


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise QueryError(f"{name} must be a whole number of at least {low}, got {value!r}")
    if high is not None and value > high:
        raise QueryError(f"{name} must be at most {high}, got {value}")


def _strings(name: str, values: str | Iterable[str] | None) -> tuple[str, ...]:
    """A tuple of strings from one string, any iterable of strings, or None."""
    if values is None:
        return ()
    if isinstance(values, str):
        return (values,)
    out = tuple(values)
    if not all(isinstance(v, str) for v in out):
        raise QueryError(f"{name} must be strings, got {out!r}")
    return out


def _date_text(value: DateLike) -> str | None:
    """Dates and datetimes as the ISO text the filter parser reads."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dt.date):
        return value.isoformat()
    raise QueryError(f"a date must be text or a date, got {value!r}")
