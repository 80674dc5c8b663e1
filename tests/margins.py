"""Thresholds and orders that float rounding cannot decide.

Scores computed by numpy and by FAISS (or by two encoder backends) agree only to ~1e-6,
so a test that puts a cut-off exactly on a computed score, or compares the order of two
scores closer than that, is decided by rounding. These helpers place a threshold strictly
between two scores and check that the gaps a test relies on are wide enough; a failed
check means the test data must change, not that the product is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Two scores closer than this may swap between numpy and FAISS: never rely on their order.
MIN_GAP = 1e-4


def threshold_between(
    scores: Sequence[float] | np.ndarray, keep: int, gap: float = MIN_GAP
) -> float:
    """A threshold that keeps exactly the ``keep`` best of ``scores`` by a margin.

    It lies halfway between the keep-th and the (keep+1)-th best score, and those two must
    be at least ``gap`` apart, so no rounding can move a score across it.
    """
    ordered = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    assert 0 < keep < len(ordered), f"cannot keep {keep} of {len(ordered)} scores"
    inside, outside = float(ordered[keep - 1]), float(ordered[keep])
    assert inside - outside >= gap, (
        f"scores {inside!r} and {outside!r} are closer than {gap}: pick other test data"
    )
    return (inside + outside) / 2


def assert_clear_order(scores: Sequence[float] | np.ndarray, gap: float = MIN_GAP) -> None:
    """Check that scores sorted best first are pairwise at least ``gap`` apart.

    Call it on the expected scores of a test that compares a ranked list exactly.
    """
    ordered = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    gaps = ordered[:-1] - ordered[1:]
    assert len(gaps) == 0 or gaps.min() >= gap, (
        f"two expected scores are only {gaps.min():.2e} apart: their order is rounding noise"
    )
