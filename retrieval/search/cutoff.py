"""Relevance cut-offs: keep the results whose score stands out for *this* query.

A flat similarity threshold does not work with CLIP: the scores of a text query over a
library sit around 0.1-0.3 and the level moves with the wording ("a dog" vs "a photo of a
small brown dog on a beach") and with the library; image queries live around 0.5-1.0.
What does carry over between queries is the *shape*: most photos are unrelated to a
query and their scores form a unimodal bulk, while relevant photos form a thin right tail.

Rule (``--cutoff auto``): with ``f = atanh(score)``, keep ``f > median + z(n) * sigma`` where

- ``median`` and ``sigma = 1.4826 * MAD`` describe the bulk of the query's ``f`` over the
  library (all of it, or a fixed random sample of about ``SAMPLE`` photos in large
  libraries: the one a compaction stores beside the index, :mod:`indexer.store.background`,
  read in one go; without that file, ``SAMPLE`` photos read from the catalog).
  Median and MAD are robust: the relevant tail, even a fifth of the library, barely moves
  them, where a mean and standard deviation would be dragged up by it.
- ``atanh`` is Fisher's transform: a cosine of unit vectors behaves like a correlation
  coefficient, and on the ``atanh`` scale its spread no longer shrinks against the bound
  at 1. It is a near-identity for text queries (|s| < 0.4: within 6%) and matters for
  image queries, whose scores crowd below 1: on the raw scale a broad bulk puts
  ``median + z * sigma`` above 1, so nothing — not even the photo itself — could pass
  (seen on the corpus); on the ``atanh`` scale the threshold, mapped back with ``tanh``,
  is always below 1 and near-copies at 0.99 stand far out.
- ``z(n) = sqrt(2 ln n)``, ``n`` the number of candidate photos (the filtered set or the
  library), at least ``MIN_Z``: Donoho and Johnstone's *universal threshold*. For ``n``
  scores that were all bulk (Gaussian) the largest one stays below it with high
  probability; the expected number of bulk photos above it is about
  ``1 / (z * sqrt(2 pi))`` — 0.13 at n=100, 0.09 at n=10^4, 0.08 at n=10^6 — so a query
  that matches nothing returns (almost) nothing, at any library size, while the threshold
  rises only slowly with the library (3.0 sigma at 100 photos, 4.3 at 10^4, 5.3 at 10^6).

With fewer than ``MIN_POPULATION`` photos the bulk cannot be estimated and everything is
kept (the cut-off says so). ``--min-score X`` is a fixed threshold; with both, the higher
one applies. A search that also reads words (:mod:`.fusion`) applies the same threshold to
its fused score, a cosine moved up by ``evidence * (z + 1) * sigma`` on the ``atanh``
scale for the words a photo holds: a photo holding every word of the query passes even
with a bulk cosine, one without words passes exactly as it does here.

Evidence: tests/test_cutoff.py (synthetic bulk + planted tails, and the corpus with the
real MobileCLIP-S2 architecture: an image query keeps exactly the photo and its generated
near-copies; an unrelated text query keeps next to nothing); tests/test_fusion.py for the
fused list.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from indexer.store.background import SAMPLE as BACKGROUND_SAMPLE
from retrieval.search.errors import QueryError

SAMPLE = BACKGROUND_SAMPLE
MIN_POPULATION = 8
MIN_Z = 2.0
MAD_TO_SIGMA = 1.4826  # sigma of a normal distribution = 1.4826 * its MAD
FISHER_CLIP = 1 - 1e-6  # atanh(+-1) is infinite; float32 cosines of a vector with itself hit 1
CUTOFF_CHOICES = ("auto", "none")


@dataclass(frozen=True)
class Cutoff:
    """A resolved threshold and how it was reached (shown with --json)."""

    rule: str  # "auto" | "min-score" | "auto+min-score"
    threshold: float
    median: float | None = None
    sigma: float | None = None
    z: float | None = None
    population: int | None = None

    def as_dict(self) -> dict:
        """JSON-ready: floats rounded, a non-finite threshold (keep everything) as None."""
        return {
            key: (round(value, 6) if math.isfinite(value) else None)
            if isinstance(value, float)
            else value
            for key, value in asdict(self).items()
        }


def universal_z(population: int) -> float:
    """``sqrt(2 ln n)``, never below ``MIN_Z``."""
    return max(MIN_Z, math.sqrt(2.0 * math.log(max(population, 2))))


def auto_cutoff(background: np.ndarray, population: int) -> Cutoff:
    """The universal-threshold cut-off from a query's scores over (a sample of) the library.

    ``median`` and ``sigma`` are reported on the ``atanh`` scale; ``threshold`` is a cosine.
    """
    scores = np.asarray(background, dtype=np.float64)
    if len(scores) < MIN_POPULATION:
        return Cutoff("auto", -math.inf, population=population)
    fisher = np.arctanh(np.clip(scores, -FISHER_CLIP, FISHER_CLIP))
    median = float(np.median(fisher))
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(fisher - median)))
    z = universal_z(population)
    threshold = math.tanh(median + z * max(sigma, 1e-6))
    return Cutoff("auto", threshold, median, sigma, z, population)


def resolve_cutoff(
    cutoff: str | None, min_score: float | None, sort: str = "score"
) -> tuple[bool, float | None]:
    """(use the auto rule?, fixed minimum) from the flags; ``--sort date`` implies auto.

    Date order only makes sense over a relevance-filtered set ("the matching photos, newest
    first"), so without --cutoff or --min-score a date sort uses the auto rule.
    """
    choice = (cutoff or "").strip().lower() or None
    if choice not in (None, *CUTOFF_CHOICES):
        raise QueryError(
            f"cut-off {cutoff!r} is not one of: {', '.join(CUTOFF_CHOICES)}", setting="cutoff"
        )
    if min_score is not None and not -1.0 <= min_score <= 1.0:
        raise QueryError(
            f"the minimum score must be between -1 and 1 (a cosine), got {min_score}",
            setting="min_score",
        )
    auto = choice == "auto" or (choice is None and min_score is None and sort != "score")
    return auto, min_score


def combine_cutoffs(auto: Cutoff | None, min_score: float | None) -> Cutoff | None:
    """The stricter of the auto rule and a fixed minimum (either may be absent)."""
    if auto is None:
        return None if min_score is None else Cutoff("min-score", float(min_score))
    if min_score is None or min_score <= auto.threshold:
        return auto if min_score is None else Cutoff(**{**asdict(auto), "rule": "auto+min-score"})
    return Cutoff(**{**asdict(auto), "rule": "auto+min-score", "threshold": float(min_score)})


def background_ids(ids: np.ndarray, sample: int = SAMPLE, seed: int = 0) -> np.ndarray | None:
    """A fixed random subset of the library's ids to estimate the bulk; None: use all."""
    if len(ids) <= sample:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(ids, size=sample, replace=False))


def background_scores(index, vector: np.ndarray, sample: int = SAMPLE) -> np.ndarray:
    """The query's cosines over a fixed random sample of about ``sample`` live photos (all
    of them in a library that small).

    From the index's stored background sample when it has one (a few MB read in one go,
    whatever the library's size); else from ``sample`` ids drawn with
    :func:`background_ids` and scored by the index (a random read per photo in a large
    library whose index re-ranks from the catalog)."""
    stored = index.background(sample) if hasattr(index, "background") else None
    if stored is not None:
        _, vectors = stored
        return np.einsum("ij,j->i", vectors, vector.astype(np.float32, copy=False))
    ids = background_ids(index.ids(), sample)
    _, scores, _ = index.range_search(vector[None], -np.inf, ids)
    return scores
