"""The one place where a request's text meets a filesystem path.

Serving never needs one: photos are addressed by catalog id and their paths come from the
catalog. Indexing does (``POST /api/index``), and is confined to the ``--index-root``
folders: a path is accepted only if it stays inside a root both as written (no ``..``
escape) and once symlinks are resolved; the job's folder walk then follows no symlink out
of the roots either (``IndexOptions.within``). Paths go back to clients losslessly through
:mod:`.responses`. Tested in tests/test_server_paths.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from retrieval.search.errors import QueryError
from retrieval.search.text import check_path
from retrieval.server.errors import Forbidden


def confine(requested: str, roots: tuple[Path, ...]) -> str:
    """The real path of ``requested`` if it is inside one of ``roots``; raise otherwise.

    A relative path is taken relative to the first root. Raises :class:`Forbidden` when
    indexing is not enabled or the path leaves every root, :class:`QueryError` when it is
    malformed or does not exist.
    """
    if not roots:
        raise Forbidden(
            "this server indexes nothing over HTTP: start it with --index-root DIR "
            "(or CLIPDEX_INDEX_ROOTS) to allow folders under DIR"
        )
    if not isinstance(requested, str) or not requested:
        raise QueryError("each path must be a non-empty string")
    check_path(requested, "paths")  # NUL, or a surrogate that maps to no byte: no file
    written = Path(os.path.normpath(os.path.join(roots[0], requested)))
    if not any(_inside(written, root) for root in roots):
        raise Forbidden(f"{requested} is outside the folders this server may index")
    real = Path(os.path.realpath(written))
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    if not any(_inside(real, root) for root in real_roots):
        raise Forbidden(f"{requested} leads outside the folders this server may index")
    if not os.path.exists(real):
        raise QueryError(f"{requested} does not exist on the server")
    return str(real)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents
