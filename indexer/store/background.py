"""A fixed random sample of the library's vectors in one small file: the *background*.

The adaptive cut-off and the word/meaning fusion (:mod:`retrieval.search.cutoff`,
:mod:`retrieval.search.fusion`) need the query's scores over a random sample of the
library (20,000 photos, or 2,048 for the fusion's calibration). Reading those vectors from
the catalog is one random read per photo in a file of gigabytes: 40 s at a million photos
from a cold disk. So a compaction writes the sample beside the base it builds
(``vectors.<g>.faiss.sample``), one contiguous file a query reads in a few milliseconds,
of a size that does not grow with the library:

- *Which photos*: those whose id hashes below ``rate = SAMPLE / base size``
  (:func:`sample_hash`, splitmix64 of the id; ids are never reused). The same
  rule picks the delta's new photos at query time, and tombstoned ids are dropped, so the
  sample follows adds and deletes between compactions (the delta is bounded by the
  compaction threshold, so its size stays about ``SAMPLE``).
- *Nested*: rows are stored in order of their hash, so the first ``m`` rows are themselves
  the photos hashing below the ``m``-th row's hash: a uniform sample of ``m``. The fusion's
  calibration reads 2,048 rows (2 MB), the cut-off all of them (20 MB).
- *Precision*: float16 (scores within about 1e-3 of the float32 ones; the sample's median
  and spread move by far less than their own sampling error).
- *Damage*: a header (magic, dim, rows, rate) and a CRC-32 per block of rows; a missing,
  short or damaged file, or one for another base, reads as None and the caller falls back
  to reading the catalog: never a wrong sample.

A library whose base holds at most ``SAMPLE`` vectors has no file: the whole index is the
sample (and is in memory anyway).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.fsutil import write_atomic

SAMPLE = 20_000  # photos in the cut-off's background sample
SAMPLE_SUFFIX = ".sample"  # beside the base file it was drawn from
BLOCK_ROWS = 1024  # rows per CRC-32
_MAGIC = b"CDXBKG01"
_HEADER = struct.Struct("<8sIQQdI")  # magic, dim, base count, rows, rate, blocks
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's constants
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_HASH_RANGE = float(2**53)


def sample_hash(ids: np.ndarray) -> np.ndarray:
    """A uniform value in [0, 1) per id, fixed forever: splitmix64 of the id, so
    consecutive ids (one import, one video's frames) land all over [0, 1)."""
    x = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / _HASH_RANGE


def sample_rate(count: int, sample: int = SAMPLE) -> float:
    """The share of a base of ``count`` vectors that goes into its sample."""
    return min(1.0, sample / max(count, 1))


def sample_path(base: Path) -> Path:
    return base.with_name(base.name + SAMPLE_SUFFIX)


def _row_dtype(dim: int) -> np.dtype:
    return np.dtype([("id", "<i8"), ("v", "<f2", (dim,))])


def write_sample(
    path: Path, ids: np.ndarray, vectors: np.ndarray, rate: float, base_count: int
) -> None:
    """Write the sample rows (any order: stored by hash) of a base of ``base_count``
    vectors atomically (fsynced, renamed)."""
    ids = np.asarray(ids, dtype=np.int64)
    order = np.argsort(sample_hash(ids), kind="stable")
    rows = np.zeros(len(ids), dtype=_row_dtype(vectors.shape[1]))
    rows["id"] = ids[order]
    rows["v"] = np.asarray(vectors, dtype=np.float32)[order]
    body = rows.tobytes()
    size = rows.dtype.itemsize * BLOCK_ROWS
    crcs = [zlib.crc32(body[at : at + size]) for at in range(0, len(body), size)]
    header = _HEADER.pack(_MAGIC, vectors.shape[1], base_count, len(rows), rate, len(crcs))
    write_atomic(path, header + struct.pack(f"<{len(crcs)}I", *crcs) + body)


@dataclass(frozen=True)
class SampleFile:
    """The header of a sample file: enough to read a prefix of its rows."""

    path: Path
    dim: int
    base_count: int  # vectors in the base it was drawn from
    rows: int
    rate: float
    crcs: tuple[int, ...]

    @property
    def body_offset(self) -> int:
        return _HEADER.size + 4 * len(self.crcs)

    def read(self, count: int) -> tuple[np.ndarray, np.ndarray, float] | None:
        """The first ``count`` rows (ids, float16 vectors) and the hash bound they stand
        for (every id hashing below it is in them); None if the bytes are damaged."""
        count = min(count, self.rows)
        dtype = _row_dtype(self.dim)
        blocks = -(-count // BLOCK_ROWS)
        wanted = min(blocks * BLOCK_ROWS, self.rows) * dtype.itemsize
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.body_offset)
                data = handle.read(wanted)
        except OSError:
            return None
        if len(data) != wanted:
            return None
        size = dtype.itemsize * BLOCK_ROWS
        if any(zlib.crc32(data[i * size : (i + 1) * size]) != self.crcs[i] for i in range(blocks)):
            return None
        rows = np.frombuffer(data, dtype=dtype)[:count]
        ids = rows["id"].astype(np.int64)
        if count == self.rows:
            bound = self.rate
        else:  # just past the last row's hash: every id below it is among these rows
            bound = float(np.nextafter(sample_hash(ids[-1:])[0], 2.0)) if count else 0.0
        return ids, rows["v"], bound


def open_sample(path: Path, dim: int, base_count: int) -> SampleFile | None:
    """The header of the sample file of a base of ``base_count`` vectors, or None when
    there is none or it is not sound (or was drawn from another base)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEADER.size)
            if len(head) != _HEADER.size:
                return None
            magic, file_dim, file_count, rows, rate, blocks = _HEADER.unpack(head)
            crc_bytes = handle.read(4 * blocks)
            size = handle.seek(0, 2)
    except OSError:
        return None
    if magic != _MAGIC or (file_dim, file_count) != (dim, base_count) or not 0.0 < rate <= 1.0:
        return None
    if len(crc_bytes) != 4 * blocks or blocks != -(-rows // BLOCK_ROWS):
        return None
    crcs = struct.unpack(f"<{blocks}I", crc_bytes)
    sample = SampleFile(Path(path), dim, base_count, rows, rate, crcs)
    if size != sample.body_offset + rows * _row_dtype(dim).itemsize:
        return None
    return sample


def draw_sample(path: Path, store, fetch) -> bool:
    """Write the background sample of ``store`` (a base just built) to ``path``, the
    vectors read through ``fetch(ids) -> (ids, vectors)`` (the catalog's full-precision
    copies); returns whether a file was written. A base of at most ``SAMPLE`` vectors gets
    none, and a failed write (disk full) leaves none: queries then read the catalog."""
    count = len(store)
    rate = sample_rate(count, SAMPLE)  # the module's value now (tests make it smaller)
    if rate >= 1.0:
        return False
    ids = store.ids()
    chosen = ids[sample_hash(ids) < rate]
    found, vectors = fetch(chosen.tolist())
    try:
        write_sample(path, found, vectors, rate, count)
    except OSError:
        return False
    return True
