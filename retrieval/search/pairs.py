"""RAW+JPEG pairs: a camera that writes both makes two files of one shot; search shows it once.

A *pair* is a camera RAW file (:data:`indexer.ingest.raw.RAW_SUFFIXES`) and an ordinary
photo (JPEG, HEIC, ...: :data:`FACE_SUFFIXES`) with the same name stem in the same folder:
``IMG_0001.CR2`` + ``IMG_0001.JPG``. The photo is the pair's *face*: a search lists the face
once, at the better of the two ranks and scores, and notes the RAW beside it
(:attr:`~retrieval.search.engine.SearchResult.raw`). ``SearchOptions(raw_pairs=True)`` lists
both files instead.

The grouping is derived at query time from the paths in the catalog (no column, no
migration beyond a partial index of RAW paths, :mod:`indexer.store.rawindex`): one SQL
pass over that index finds the RAW rows, one lookup per candidate name their faces, and
the map is kept until the catalog's generation changes (the next indexing checkpoint).
A RAW is folded into its face only when the face passes the query's filters:
``--format dng`` still finds the RAW.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np

from indexer.paths import to_db

# fmt: off
FACE_SUFFIXES = (
    ".jpg", ".jpeg", ".heic", ".heif", ".hif", ".jxl", ".avif", ".png", ".tif", ".tiff",
    ".webp",
)
# fmt: on
_CHUNK = 400  # SQLite bound parameters per statement, well under its limit


class RawPairs:
    """RAW id -> face id for the whole library, recomputed when the catalog changes.

    One instance lives as long as the engine that holds it; it is safe to share between
    the server's threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._generation: object = None
        self._faces: dict[int, int] = {}

    def faces(self, catalog) -> dict[int, int]:
        """``{raw_id: face_id}`` for every RAW whose face is in the library."""
        # Every write that adds, removes or moves a row bumps the generation; counting the
        # rows as well would cost a scan of the catalog on every query (~20 ms at 100k).
        generation = (id(catalog), catalog.generation())
        with self._lock:
            if generation != self._generation:
                self._faces = find_faces(catalog)
                self._generation = generation
            return self._faces


def find_faces(catalog) -> dict[int, int]:
    """Pair every catalogued RAW with the photo of the same folder and stem (lowest id).

    The RAW rows come from the catalog's partial index of RAW paths (``raw_files``): the
    cost follows the number of RAW files, not the library's size."""
    raw_rows = catalog.raw_files()
    if not raw_rows:
        return {}
    wanted: dict[str, int] = {}  # candidate face path (stored form) -> raw id
    for raw_id, path in raw_rows:
        stem = os.path.splitext(path)[0]
        for suffix in FACE_SUFFIXES:
            for variant in (suffix, suffix.upper()):
                wanted[to_db(stem + variant)] = raw_id
    faces: dict[int, int] = {}
    for face_id, stored in _ids_for_paths(catalog, list(wanted)):
        raw_id = wanted[stored]
        faces[raw_id] = min(face_id, faces.get(raw_id, face_id))
    return faces


def fold_pairs(
    ids: np.ndarray,
    scores: np.ndarray,
    faces: dict[int, int],
    allowed: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """Replace each RAW whose face is allowed by that face, keeping one entry per pair.

    ``ids``/``scores`` are ranked (best first); a pair keeps the rank and score of its
    first member. Returns the folded lists and ``{face_id: raw_id}`` for the pairs kept.
    """
    if not faces:
        return ids, scores, {}
    allowed_set = None if allowed is None else set(allowed.tolist())
    out_ids: list[int] = []
    out_scores: list[float] = []
    seen: set[int] = set()
    companions: dict[int, int] = {}
    raw_of = {face: raw for raw, face in faces.items()}
    for image_id, score in zip(ids.tolist(), scores.tolist()):
        face = faces.get(image_id)
        if face is not None and allowed_set is not None and face not in allowed_set:
            face = None  # the face is filtered out: the RAW stands for itself
        shown = image_id if face is None else face
        if shown in seen:
            continue
        seen.add(shown)
        out_ids.append(shown)
        out_scores.append(score)
        raw = raw_of.get(shown)
        if raw is not None and (allowed_set is None or raw in allowed_set):
            companions[shown] = raw
    return (
        np.asarray(out_ids, dtype=np.int64),
        np.asarray(out_scores, dtype=np.float32),
        companions,
    )


def _ids_for_paths(catalog, stored_paths: Sequence[str]) -> list[tuple[int, str]]:
    """(id, stored path) of the catalogued files among exactly these stored paths."""
    found: list[tuple[int, str]] = []
    for start in range(0, len(stored_paths), _CHUNK):
        chunk = stored_paths[start : start + _CHUNK]
        marks = ", ".join("?" * len(chunk))
        ids = catalog.ids_where(f"path IN ({marks})", chunk)
        rows = catalog.get_images(ids.tolist())
        found.extend((i, to_db(rows[i]["path"])) for i in ids.tolist() if i in rows)
    return found
