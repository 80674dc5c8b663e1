"""Synthetic CLIP-like image vectors and text-like queries (seeded), and
:class:`ArraySource` (a catalog stand-in holding them), for index tests and
bench/bench_scale.py.

Not uniform noise, which no index finds structure in: real CLIP image embeddings share a
common component (two unrelated photos score ~0.4-0.5), gather in topics of very unequal
popularity, spread unevenly across directions (a decaying spectrum) and come in bursts of
near-copies. Text queries sit apart from every image (the modality gap): their best
matches score ~0.3. This generator has each of those traits:

- a shared direction (cosine of two unrelated vectors ~0.45);
- ``topics`` centres, chosen with Zipf-like popularity;
- within-topic spread that is anisotropic (per-axis scales decay as a power law);
- about 5% of the rows near-copies of an earlier row (cosine ~0.97-0.995), in bursts;
- unit length, float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

DIM = 512


class ClipLike:
    """A seeded generator of one synthetic library's vectors (rows made in chunks)."""

    def __init__(self, n: int, dim: int = DIM, seed: int = 0, topics: int | None = None):
        self.n, self.dim, self.seed = n, dim, seed
        rng = np.random.default_rng(seed)
        self.topics = topics or max(8, int(4 * np.sqrt(n)))
        self.scales = (np.arange(1, dim + 1) ** -0.45).astype(np.float32)
        self.scales /= np.sqrt(np.mean(self.scales**2))
        rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        self.rotation = rotation.astype(np.float32)
        self.shared = _unit(rng.standard_normal(dim)).astype(np.float32)
        self.text_gap = _unit(rng.standard_normal(dim)).astype(np.float32)
        centres = rng.standard_normal((self.topics, dim)).astype(np.float32) * self.scales
        self.centres = _unit(centres @ self.rotation.T)
        popularity = 1.0 / np.arange(1, self.topics + 1) ** 0.8
        self.popularity = popularity / popularity.sum()

    def vectors(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` (the same rows whatever the chunking)."""
        stop = self.n if stop is None else stop
        chunks = []
        for chunk in range(start // 10_000, (stop - 1) // 10_000 + 1):
            rows = self._chunk(chunk)
            lo, hi = max(start, chunk * 10_000), min(stop, (chunk + 1) * 10_000)
            chunks.append(rows[lo - chunk * 10_000 : hi - chunk * 10_000])
        return np.vstack(chunks) if chunks else np.zeros((0, self.dim), np.float32)

    def _chunk(self, number: int) -> np.ndarray:
        size = min(10_000, self.n - number * 10_000)
        rng = np.random.default_rng([self.seed, number])
        topic = rng.choice(self.topics, size=size, p=self.popularity)
        spread = rng.standard_normal((size, self.dim)).astype(np.float32) * self.scales
        spread = _unit(spread @ self.rotation.T)
        rows = 0.75 * self.shared + 0.55 * self.centres[topic] + 0.45 * spread
        rows = _unit(rows)
        # Near-copies: ~5% of rows repeat an earlier row of the chunk with a little noise.
        copies = np.nonzero(rng.random(size) < 0.05)[0]
        copies = copies[copies > 0]
        originals = (copies - rng.integers(1, 8, len(copies))).clip(0)
        noise = rng.standard_normal((len(copies), self.dim)).astype(np.float32)
        noise *= rng.uniform(0.1, 0.25, (len(copies), 1)) / np.linalg.norm(noise, axis=1)[:, None]
        for copy, original, jitter in zip(copies, originals, noise):
            rows[copy] = _unit(rows[original] + jitter)
        return rows.astype(np.float32)

    def image_queries(self, count: int, seed: int = 1) -> np.ndarray:
        """Image-like queries: new photos from the same distribution (not in the library)."""
        return _fresh(self, count, seed)

    def text_queries(self, count: int, seed: int = 2) -> np.ndarray:
        """Text-like queries: across the modality gap from a topic (best matches ~0.3)."""
        rng = np.random.default_rng([self.seed, seed, 7])
        topic = rng.choice(self.topics, size=count, p=self.popularity)
        noise = _unit(rng.standard_normal((count, self.dim)).astype(np.float32))
        rows = 0.9 * self.text_gap + 0.3 * self.shared + 0.3 * self.centres[topic] + 0.2 * noise
        return _unit(rows).astype(np.float32)


class ArraySource:
    """A catalog stand-in: ids and vectors in memory, looked up by id (what
    ``IVFIndex.build`` reads). ``iter_vectors`` yields ``batch`` rows at a time by default
    (a small batch gives a build several parts)."""

    def __init__(self, ids: np.ndarray, vectors: np.ndarray, batch: int = 10_000) -> None:
        self._ids, self._vectors, self.batch = np.asarray(ids, np.int64), vectors, batch
        self._order = np.argsort(self._ids, kind="stable")  # ids need not be row numbers
        self._sorted = self._ids[self._order]

    def count(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        return self._ids

    def vectors(self, wanted) -> tuple[np.ndarray, np.ndarray]:
        """The ``wanted`` ids this source holds (in the order asked) and their vectors."""
        wanted = np.asarray(wanted, np.int64).reshape(-1)
        if not len(self._ids):
            return wanted[:0], self._vectors[:0]
        where = np.minimum(np.searchsorted(self._sorted, wanted), len(self._ids) - 1)
        held = self._sorted[where] == wanted
        return wanted[held], self._vectors[self._order[where[held]]]

    def iter_vectors(self, batch: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        batch = batch or self.batch
        for start in range(0, len(self._ids), batch):
            yield self._ids[start : start + batch], self._vectors[start : start + batch]


def _fresh(library: ClipLike, count: int, seed: int) -> np.ndarray:
    twin = ClipLike.__new__(ClipLike)
    twin.__dict__.update(library.__dict__)
    twin.n, twin.seed = count, library.seed * 1000 + seed + 17
    return twin.vectors(0, count)


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)
