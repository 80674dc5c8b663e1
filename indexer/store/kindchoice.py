"""Which vector index kind a library uses: ``clipdex index --index auto|exact|ivf``.

The choice is recorded in the catalog (meta ``index_kind``) and kept by later runs that do
not name one. ``auto`` (the default) picks by library size and memory:

- ``exact`` (every vector scanned, answers exact) below ``AUTO_IVF_PHOTOS`` photos: there a
  flat scan is still a few milliseconds, and exact is free of any recall question;
- ``ivf`` (8-bit codes + exact re-rank, recall@10 >= 0.98, scores exact) from
  ``AUTO_IVF_PHOTOS`` photos on, or sooner when a flat index would take more than
  ``AUTO_MEMORY_SHARE`` of the machine's memory. Where ivf starts to pay is measured by
  ``bench/bench_scale.py`` (single-query latency of both kinds, same run). A library that
  shrinks goes back to exact only below half the threshold, so one near the line does not
  flip at every run.

Switching kinds, and re-training an ivf index after the library has grown to
``RETRAIN_GROWTH`` times the vectors it was trained on, rebuild the index from the catalog's
vectors: no photo is decoded or encoded again.
"""

from __future__ import annotations

import os

from indexer.errors import ConfigError
from indexer.store.vectorstore import KINDS

INDEX_CHOICES = ("auto", *sorted(KINDS))
DEFAULT_CHOICE = "auto"
META_KEY = "index_kind"
AUTO_IVF_PHOTOS = 100_000
AUTO_MEMORY_SHARE = 0.25
RETRAIN_GROWTH = 4.0


def check_choice(text: str | None) -> str | None:
    """A valid choice (lower-cased) or None for "keep the recorded one"; else ConfigError."""
    if text is None:
        return None
    choice = text.strip().lower()
    if choice not in INDEX_CHOICES:
        raise ConfigError(
            f"index kind {text!r} is not one of: {', '.join(INDEX_CHOICES)}", setting="index"
        )
    return choice


def recorded_choice(catalog) -> str:
    """The library's recorded choice (``auto`` when none was ever made)."""
    value = catalog.get_meta(META_KEY)
    return value if value in INDEX_CHOICES else DEFAULT_CHOICE


def wanted_kind(choice: str, count: int, current: str, dim: int = 512) -> str:
    """The kind ``choice`` asks for a library of ``count`` photos now built as ``current``."""
    if choice != "auto":
        return choice
    threshold = min(AUTO_IVF_PHOTOS, _photos_for_memory_share(dim))
    if current == "ivf" and count >= threshold // 2:
        return "ivf"
    return "ivf" if count >= threshold else "exact"


def needs_retraining(facts: dict, count: int) -> bool:
    """Whether an ivf index (``facts``: :func:`index_facts`) was built for far fewer
    vectors than the library now holds."""
    built_for = int(facts.get("built_for", 0) or 0)
    return (
        facts.get("kind") == "ivf" and count > RETRAIN_GROWTH * max(built_for, 1) and count >= 2_000
    )


def ensure_kind(library, choice: str | None = None) -> str | None:
    """Record ``choice`` (if given) and rebuild the index when the wanted kind differs from
    the built one (or an ivf index needs re-training); returns the kind built, or None.

    The caller holds the writer lock.
    """
    if choice is not None and choice != recorded_choice(library.catalog):
        library.catalog.set_meta(META_KEY, choice)
    count = library.catalog.count()
    facts = index_facts(library)  # from the index file's stamp: no vector is read
    kind = wanted_kind(recorded_choice(library.catalog), count, facts["kind"])
    if kind == facts["kind"] and not needs_retraining(facts, count):
        return None
    library.rebuild_index(kind)
    return kind


def _photos_for_memory_share(dim: int) -> int:
    """Photos whose flat float32 vectors fill AUTO_MEMORY_SHARE of physical memory."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return AUTO_IVF_PHOTOS
    return max(1, int(memory * AUTO_MEMORY_SHARE / (4 * dim)))


def repair_kind(library) -> str:
    """The kind to rebuild a lost index as: the recorded choice for the catalog's size."""
    return wanted_kind(
        recorded_choice(library.catalog), library.catalog.count(), "exact", library.index.dim
    )


def index_facts(library) -> dict:
    """What `clipdex info` and /api/info show of the index: the store's own description
    (kind, count; for ivf nlist, nprobe and measured recall; delta and tombstones), read
    from the index's manifest and stamp without loading it, and the recorded choice."""
    return {**library.index_summary(), "choice": recorded_choice(library.catalog)}
