"""Metadata filters: user-facing flag values → an :class:`ImageFilter` → allowed photo ids.

The flags (CLI and REST alike)::

    --after DATE / --before DATE   capture time (EXIF, else the file's mtime, local time);
                                   a date means its first instant: --after inclusive,
                                   --before exclusive. DATE: 2021, 2021-06, 2021-06-30,
                                   2021-06-30T18:00 (ISO 8601).
    --in FOLDER_GLOB               photos anywhere under a folder, or under any folder the
                                   glob matches ('*/2019*', '~/Pictures/trips/*'); relative
                                   folders are taken from the current directory; repeatable
                                   (any). A name holding *, ? or [ is read as a glob (SQLite
                                   GLOB: write a literal [ as [[]).
    --camera TEXT                  every word occurs in "make model", any case ("iphone",
                                   "nikon d750").
    --min-size WxH                 at least this big in either orientation: the long side
                                   >= max(W, H) and the short side >= min(W, H).
    --format FMT                   jpeg, png, heic, avif, webp, tiff, gif, ... (repeatable,
                                   any; jpg also matches multi-picture JPEGs, MPO).
    --tag LABEL                    a label stored by `clipdex tag` (repeatable, all).

Resolution happens in SQL (the catalog owns it) and yields the set of allowed ids, which
the vector search applies *during* its scan: a filter that keeps 1% of the library still
gets its top-k from that 1%, never a filtered top-k of everything.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from indexer.errors import QueryError
from indexer.store.catalog import Catalog, ImageFilter

_SIZE = re.compile(r"^\s*(\d{1,6})\s*[xX*\u00d7]\s*(\d{1,6})\s*$")
_PARTIAL_DATE = re.compile(r"^(\d{4})(?:-(\d{1,2}))?$")
FORMAT_ALIASES = {
    "JPG": ("JPEG", "MPO"),
    "JPEG": ("JPEG", "MPO"),
    "JPE": ("JPEG", "MPO"),
    "TIF": ("TIFF",),
    "HEIC": ("HEIF",),
    "HIF": ("HEIF",),
    "J2K": ("JPEG2000",),
    "JP2": ("JPEG2000",),
}


@dataclass(frozen=True)
class FilterArgs:
    """Filter flag values as the user typed them (strings), before validation."""

    after: str | None = None
    before: str | None = None
    folders: tuple[str, ...] = ()
    camera: str | None = None
    min_size: str | None = None
    formats: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()


def build_filter(args: FilterArgs, cwd: str | None = None) -> ImageFilter:
    """Validate flag values into an :class:`ImageFilter`; bad values raise QueryError."""
    after = parse_date(args.after, "--after") if args.after else None
    before = parse_date(args.before, "--before") if args.before else None
    if after and before and after >= before:
        raise QueryError(
            f"--after {args.after} is not earlier than --before {args.before}: nothing can match"
        )
    long_side, short_side = parse_size(args.min_size) if args.min_size else (0, 0)
    camera = args.camera.strip() if args.camera and args.camera.strip() else None
    return ImageFilter(
        after=after,
        before=before,
        folders=tuple(folder_pattern(f, cwd) for f in args.folders if f.strip()),
        camera=camera,
        min_long=long_side,
        min_short=short_side,
        formats=parse_formats(args.formats),
        tags=tuple(dict.fromkeys(t.strip() for t in args.tags if t.strip())),
    )


def parse_date(text: str, flag: str = "--after") -> dt.datetime:
    """``2021`` / ``2021-06`` / ``2021-06-30`` / ISO datetime → its first instant (naive)."""
    value = text.strip()
    partial = _PARTIAL_DATE.match(value)
    try:
        if partial:
            return dt.datetime(int(partial.group(1)), int(partial.group(2) or 1), 1)
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        parsed = None
    if parsed is None:
        raise QueryError(
            f"{flag} {text!r} is not a date: use YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDTHH:MM"
        )
    if parsed.tzinfo is not None:  # compare in local time, like EXIF times
        parsed = parsed.astimezone().replace(tzinfo=None)
    return parsed


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` → (long side, short side) minimums."""
    match = _SIZE.match(text)
    if not match:
        raise QueryError(f"--min-size {text!r} is not WIDTHxHEIGHT, e.g. 1920x1080")
    width, height = int(match.group(1)), int(match.group(2))
    return max(width, height), min(width, height)


def parse_formats(values: Iterable[str]) -> tuple[str, ...]:
    """Format names or extensions (comma lists allowed) → Pillow format names."""
    known = _known_formats()
    out: list[str] = []
    for value in values:
        for name in (v.strip().lstrip(".").upper() for v in value.split(",")):
            if not name:
                continue
            names = FORMAT_ALIASES.get(name, (name,))
            if names[0] not in known:
                raise QueryError(
                    f"--format {name.lower()} is not an image format clipdex reads: "
                    "try jpeg, png, heic, avif, webp, tiff, gif or bmp"
                )
            out.extend(names)
    return tuple(dict.fromkeys(out))


def folder_pattern(text: str, cwd: str | None = None) -> str:
    """An absolute folder or glob: ``~`` expanded, relative ones joined to ``cwd``."""
    value = os.path.expanduser(text.strip())
    if value.startswith("*"):
        return value.rstrip("/") or "*"
    base = cwd or os.getcwd()
    return os.path.normpath(os.path.join(base, value))


def allowed_ids(catalog: Catalog, spec: ImageFilter) -> np.ndarray | None:
    """The ids a query may return under ``spec``; None when nothing is filtered."""
    if spec.is_empty():
        return None
    if spec.tags and not catalog.has_tags():
        raise QueryError("no photo has tags yet: run `clipdex tag` before filtering with --tag")
    return catalog.filter_ids(spec)


def _known_formats() -> set[str]:
    from PIL import Image

    Image.init()
    return set(Image.ID) | {"HEIF", "AVIF", "MPO", "JPEG2000"}
