"""Metadata filters: user-facing flag values → an :class:`ImageFilter` → allowed photo ids.

The flags (CLI and REST alike)::

    --after DATE / --before DATE   capture time (EXIF, else the file's mtime, local time);
                                   a date means its first instant: --after inclusive,
                                   --before exclusive. DATE: 2021, 2021-06, 2021-06-30,
                                   2021-06-30T18:00 (ISO 8601).
    --in FOLDER_GLOB               photos anywhere under a folder, or under any folder the
                                   glob matches ('*/2019*', '~/Pictures/trips/*'); relative
                                   folders are taken from the current directory; repeatable
                                   (any). Only * and ? are wildcards: [ and ] are plain
                                   characters, so 'Trip [2019]' is that folder and every
                                   folder name, given as it is, matches at least itself.
    --camera TEXT                  every word occurs in "make model", any case ("iphone",
                                   "nikon d750").
    --min-size WxH                 at least this big in either orientation: the long side
                                   >= max(W, H) and the short side >= min(W, H).
    --format FMT                   jpeg, png, heic, avif, webp, tiff, gif, ... (repeatable,
                                   any; jpg also matches multi-picture JPEGs, MPO).
    --tag LABEL                    a label stored by `clipdex tag` (repeatable, all).
    --kind photo|video             only photos, or only videos (a video matches by its row:
                                   its frames follow it).

Resolution happens in SQL and yields the set of allowed ids, which the vector search
applies *during* its scan: a filter that keeps 1% of the library still gets its top-k from
that 1%, never a filtered top-k of everything. This module writes the WHERE clause as plain
parametrised SQLite (:func:`filter_sql`); the catalog only runs it
(:meth:`~indexer.store.catalog.Catalog.ids_where`) and knows nothing of filters.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from indexer.ingest.raw import RAW_FORMATS
from indexer.paths import to_db
from retrieval.search.errors import QueryError

if TYPE_CHECKING:  # either catalog kind: the SQLAlchemy one or the stdlib reader
    from indexer.store.catalog import Catalog
    from indexer.store.catalog_reader import CatalogReader

# The container labels videos are catalogued with (indexer/ingest/video.py).
VIDEO_FORMATS = {"MP4", "M4V", "MOV", "3GP", "MKV", "WEBM", "AVI", "MPEG-TS", "MPEG-PS", "ASF"}
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
    "JPEGXL": ("JXL",),
    # Every camera RAW format (the catalog keeps each RAW's own name: DNG, NEF, CR3, ...).
    "RAW": tuple(dict.fromkeys(RAW_FORMATS.values())),
}


@dataclass(frozen=True)
class ImageFilter:
    """Conditions on catalog rows, all of which must hold; an unset field matches anything.

    ``after``/``before`` bound the capture time (EXIF, else the file's mtime in local time):
    ``after`` inclusive, ``before`` exclusive. ``folders`` are absolute folder paths or
    globs (an image matches when it lies anywhere under one of them). Every word of
    ``camera`` must occur in "make model", case-insensitively ("nikon d750" matches make
    "NIKON CORPORATION", model "D750"). ``min_long``/``min_short`` bound the long
    and the short side, whatever the orientation. ``formats`` are Pillow format names (any
    of them); ``tags`` are labels that must all be present.
    """

    after: dt.datetime | None = None
    before: dt.datetime | None = None
    folders: tuple[str, ...] = ()
    camera: str | None = None
    min_long: int = 0
    min_short: int = 0
    formats: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    kind: str | None = None  # "photo" or "video"

    def is_empty(self) -> bool:
        """Whether the filter lets every photo through."""
        return self == ImageFilter()


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
    kind: str | None = None


KINDS = ("photo", "video")


def parse_kind(text: str | None) -> str | None:
    """``photo`` or ``video`` (plural and any case accepted); None for no filter."""
    if text is None or not text.strip():
        return None
    kind = text.strip().lower().removesuffix("s")
    if kind not in KINDS:
        raise QueryError(f"kind must be photo or video, got {text!r}", setting="kind")
    return kind


def build_filter(args: FilterArgs, cwd: str | None = None) -> ImageFilter:
    """Validate flag values into an :class:`ImageFilter`; bad values raise QueryError."""
    after = parse_date(args.after, "after") if args.after else None
    before = parse_date(args.before, "before") if args.before else None
    if after and before and after >= before:
        raise QueryError(
            f"after {args.after} is not earlier than before {args.before}: nothing can match",
            setting="after",
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
        kind=parse_kind(args.kind),
    )


def parse_date(text: str, setting: str = "after") -> dt.datetime:
    """``2021`` / ``2021-06`` / ``2021-06-30`` / ISO datetime → its first instant (naive).

    ``setting`` names the option the date came from (``after`` or ``before``) for the error.
    """
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
            f"{setting} {text!r} is not a date: use YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDTHH:MM",
            setting=setting,
        )
    if parsed.tzinfo is not None:  # compare in local time, like EXIF times
        parsed = parsed.astimezone().replace(tzinfo=None)
    return parsed


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` → (long side, short side) minimums."""
    match = _SIZE.match(text)
    if not match:
        raise QueryError(
            f"minimum size {text!r} is not WIDTHxHEIGHT, e.g. 1920x1080", setting="min_size"
        )
    width, height = int(match.group(1)), int(match.group(2))
    return max(width, height), min(width, height)


def parse_formats(values: Iterable[str]) -> tuple[str, ...]:
    """Format names or extensions (comma lists allowed) → Pillow format names."""
    values = tuple(values)
    if not values:
        return ()  # without asking Pillow, whose plugin registry costs a query ~60 ms
    known = _known_formats()
    out: list[str] = []
    for value in values:
        for name in (v.strip().lstrip(".").upper() for v in value.split(",")):
            if not name:
                continue
            names = FORMAT_ALIASES.get(name, (name,))
            if names[0] not in known:
                raise QueryError(
                    f"format {name.lower()} is not a format clipdex reads: "
                    "try jpeg, png, heic, avif, webp, tiff, gif, bmp, mp4, mov or webm",
                    setting="format",
                )
            out.extend(names)
    return tuple(dict.fromkeys(out))


def folder_pattern(text: str, cwd: str | None = None) -> str:
    """An absolute folder or glob: ``~`` expanded, relative ones joined to ``cwd``; a URI
    prefix (``s3://bucket/2024``) as written."""
    value = os.path.expanduser(text.strip())
    if "://" in value:  # photos indexed from object storage: s3://bucket/prefix as stored
        return value.rstrip("/")
    if value.startswith("*"):
        return value.rstrip("/") or "*"
    base = cwd or os.getcwd()
    return os.path.normpath(os.path.join(base, value))


def allowed_ids(catalog: Catalog | CatalogReader, spec: ImageFilter) -> np.ndarray | None:
    """The ids a query may return under ``spec``; None when nothing is filtered."""
    if spec.is_empty():
        return None
    if spec.tags and not catalog.has_tags():
        raise QueryError(
            "no photo has tags yet: run `clipdex tag` before filtering by tag", setting="tag"
        )
    if spec.kind == "photo" and not catalog.has_videos():
        # Every row is a photo: nothing to filter (at 1M, listing them all took ~1 s a query).
        spec = replace(spec, kind=None)
        if spec.is_empty():
            return None
    return catalog.ids_where(*filter_sql(spec))


def with_frames(catalog: Catalog | CatalogReader, allowed: np.ndarray) -> np.ndarray:
    """``allowed`` (sorted ids) and the frames of its videos, sorted: the index holds a video
    as several frames. Without a frame among them (a library without videos) ``allowed``
    itself comes back: no union over every allowed id, per query (at 1M photos a filter
    that keeps them all spent ~1 s a query in the frame lookup and the union)."""
    frames = catalog.frame_ids_of(allowed)
    if len(frames):
        return np.union1d(allowed, frames)
    if len(allowed) > 1 and not bool(np.all(allowed[1:] > allowed[:-1])):
        return np.unique(allowed)
    return allowed


def capture_time(row: dict) -> dt.datetime:
    """A row's capture time: EXIF ``taken_at``, else its mtime as a naive local time.

    The same rule as the SQL of :func:`filter_sql`, for sorting results by date.
    """
    taken = row.get("taken_at")
    if isinstance(taken, dt.datetime):
        return taken
    return dt.datetime.fromtimestamp(row["mtime_ns"] / 1e9)


# The SQL below names the catalog's columns (images.*, tags.image_id/label); it is plain
# SQLite with ? placeholders so that any reader of catalog.sqlite can run it.
_CAMERA = "(coalesce(images.camera_make, '') || ' ' || coalesce(images.camera_model, ''))"
# Only * and ? make a folder a glob. SQLite GLOB also reads [...] as a character class,
# but real folders are named "Trip [2019]" far more often than anyone wants a class, so [
# is escaped ([[]) and stays literal: any folder name, typed as it is, matches itself.
_GLOB_CHARS = set("*?")


def filter_sql(spec: ImageFilter) -> tuple[str, list[object]]:
    """The WHERE clause (over ``images``) and its parameters that select ``spec``'s rows."""
    terms: list[str] = []
    params: list[object] = []
    if spec.after is not None or spec.before is not None:
        terms.append(_capture_condition(spec.after, spec.before, params))
    if spec.folders:
        folder_terms = [_folder_condition(folder, params) for folder in spec.folders]
        terms.append("(" + " OR ".join(folder_terms) + ")")
    if spec.camera:
        for word in spec.camera.split():
            terms.append(f"{_CAMERA} LIKE ? ESCAPE '\\'")
            params.append(f"%{_like_escape(word)}%")
    if spec.min_long or spec.min_short:
        terms.append("max(images.width, images.height) >= ?")
        terms.append("min(images.width, images.height) >= ?")
        params.extend([spec.min_long, spec.min_short])
    if spec.formats:
        terms.append(f"upper(images.format) IN ({', '.join('?' * len(spec.formats))})")
        params.extend(f.upper() for f in spec.formats)
    if spec.kind is not None:
        terms.append("images.kind = ?")
        params.append(spec.kind)
    for label in spec.tags:  # tags.label is COLLATE NOCASE: `--tag Cat` finds "cat"
        terms.append("EXISTS (SELECT 1 FROM tags WHERE image_id = images.id AND label = ?)")
        params.append(label)
    return " AND ".join(f"({term})" for term in terms) or "1", params


def _capture_condition(
    after: dt.datetime | None, before: dt.datetime | None, params: list[object]
) -> str:
    """SQL for "the capture time is in [``after``, ``before``)" as two ranges of the capture
    index (``ix_images_capture`` on (taken_at, mtime_ns), schema 10), so a date filter reads
    the rows in its range, not every row: the EXIF time as stored text (the catalog writes it
    as ``YYYY-MM-DD HH:MM:SS.ffffff``, which orders as the times do), else the file's mtime
    against the bounds' instants in local time (the same as comparing the mtime's local wall
    time, but for the hour a clock turned back for daylight saving repeats)."""
    bounds = [(bound, op) for bound, op in ((after, ">="), (before, "<")) if bound is not None]
    exif = " AND ".join(f"images.taken_at {op} ?" for _, op in bounds)
    mtime = " AND ".join(f"images.mtime_ns {op} ?" for _, op in bounds)
    params.extend([_julian_text(bound) for bound, _ in bounds])
    params.extend([_local_ns(bound) for bound, _ in bounds])
    return f"{exif} OR (images.taken_at IS NULL AND {mtime})"


def _local_ns(value: dt.datetime) -> int:
    """The instant of a naive local time, in ns since the epoch (its first occurrence when
    daylight saving repeats it); times before or after what the platform can convert are
    clamped to the ends of the mtime range."""
    low, high = -(2**63), 2**63 - 1  # SQLite's integers
    try:
        seconds = value.timestamp()
    except (OverflowError, OSError, ValueError):
        return low if value.year < 1970 else high
    return min(max(round(seconds * 1e6) * 1000, low), high)


def _julian_text(value: dt.datetime) -> str:
    # Zero-padded year by hand: strftime("%Y") gives "1", not "0001", for year 1 on glibc.
    return f"{value.year:04d}-" + value.strftime("%m-%d %H:%M:%S.%f")


def _folder_condition(folder: str, params: list[object]) -> str:
    """SQL for "the path lies under ``folder``", appending its parameters to ``params``."""
    folder = to_db(folder)
    if _GLOB_CHARS & set(folder):
        params.append(folder.rstrip("/").replace("[", "[[]") + "/*")
        return "images.path GLOB ?"
    # A range on the path answers from the path's unique index, reading only the rows under
    # the folder (substr(path, 1, n) = prefix read every row): stored paths compare by code
    # point, and every path under "F/" lies in ["F/", "F0"), "0" being the character after "/".
    prefix = folder.rstrip("/") + "/"
    params.extend([prefix, prefix[:-1] + "0"])
    return "(images.path >= ? AND images.path < ?)"


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _known_formats() -> set[str]:
    from PIL import Image

    Image.init()
    known = {"HEIF", "AVIF", "MPO", "JPEG2000", "JXL"} | set(RAW_FORMATS.values())
    return set(Image.ID) | known | VIDEO_FORMATS
