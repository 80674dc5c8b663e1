"""Small file-system helpers: atomic writes of library and cache files, and file identity."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def child_pythonpath() -> str:
    """``PYTHONPATH`` for a child process (decode workers, the ONNX export) to import this copy.

    The folder holding the ``indexer`` package goes first, so a child imports the very code
    that started it, installed or run from a checkout, wherever its modules sit.
    """
    root = str(Path(__file__).resolve().parents[1])  # this file is indexer/fsutil.py
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A reader, or a crash, only ever sees the old file or the whole new one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_key(stat: os.stat_result) -> tuple[int, int]:
    """A file's identity as (device, inode), each folded into SQLite's signed 64 bits.

    The catalog records it when a photo is indexed; the server serves a photo only from a
    file with the same key, so a file replaced (or a link swapped in) since is refused.
    """
    return _signed64(stat.st_dev), _signed64(stat.st_ino)


def _signed64(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value
