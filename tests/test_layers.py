"""The import graph keeps the layers: each layer imports only the layers below it.

Layers, lowest first (folders, see each package's ``__init__`` docstring)::

    base    indexer/errors.py, indexer/paths.py, indexer/fsutil.py (and indexer/__init__)
    model   indexer/model/     identity, tokenizer, encoders (torch, ONNX), export
    store   indexer/store/     library folder, catalog, vector stores, salvage
    ingest  indexer/ingest/    discover, decode, workers, pipeline, repair
    search  retrieval/search/  engine, query grammar, filters, cut-off, classify, duplicates
    front   retrieval/*.py     the Python front door (any module directly in retrieval/)
    cli     retrieval/cli/     } interfaces: same rank, and neither imports the other
    server  retrieval/server/  }

A module may import modules of its own layer and of lower ones. The check is static: every
module is parsed with :mod:`ast` and every import counts, wherever it is written (inside a
function, under ``if TYPE_CHECKING``), as does ``import_module("literal.name")``; an import
by a computed name is not seen. A new module directly in ``indexer/`` has no layer until it
is added to ``BASE`` below (or moved into a layer folder), and the test says so.

Heavy or edge-specific third-party packages have one home each (``THIRD_PARTY``): torch,
open_clip and timm only in the torch encoder and the ONNX exporter; onnx/onnxruntime only
in the model layer; SQLAlchemy, sqlite3 and faiss only in the store layer; FastAPI,
Starlette and uvicorn only in the server; typer and rich only in the CLI; watchfiles only in
the sync's event source (indexer/ingest/watch.py); rawpy (LibRaw) only in ingest/raw.py and
pillow_jxl only in ingest/jxl.py; PyAV (``av``) only in the video decoder (ingest/video.py);
Ray and pyarrow only in the cluster path (ingest/cluster.py), and only once ``--cluster`` is
given (a test imports the CLI, the server and that module and finds neither loaded);
pyarrow's file systems also in ingest/objectstore.py, only once an s3:// or gs:// URI is
indexed or served.
RapidOCR (and OpenCV, which it brings) only in the OCR engine (model/ocr.py).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("indexer", "retrieval")
BASE = {"indexer", "indexer.errors", "indexer.paths", "indexer.fsutil"}
RANK = {
    "base": 0,
    "model": 1,
    "store": 2,
    "ingest": 3,
    "search": 4,
    "front": 5,
    "cli": 6,
    "server": 6,
}
SUBLAYERS = {"indexer": ("model", "store", "ingest"), "retrieval": ("search", "cli", "server")}
# Layers of the same rank that must not import each other.
SEPARATE = {frozenset({"cli", "server"})}
# The one intended exception: `clipdex serve` is the server's command-line launcher, so the
# CLI may import the server's launch surface (its settings, the app factory, the uvicorn
# runner) and nothing else of it; the server never imports the CLI. Hiding this behind a
# computed import name or a second entry point would keep the dependency, only unseen.
CLI_MAY_LAUNCH = {"retrieval.server", "retrieval.server.serving", "retrieval.server.settings"}

# package -> where it may be imported: a file, or a folder ending in "/".
TORCH_HOMES = ("indexer/model/torch_encoder.py", "indexer/model/onnx_export.py")
THIRD_PARTY = {
    "torch": TORCH_HOMES,
    "open_clip": TORCH_HOMES,
    "timm": TORCH_HOMES,
    "onnx": ("indexer/model/",),
    "onnxruntime": ("indexer/model/",),
    "sqlalchemy": ("indexer/store/",),
    "sqlite3": ("indexer/store/",),  # the catalog and its readers; salvage reads raw pages
    "faiss": ("indexer/store/",),
    "fastapi": ("retrieval/server/",),
    "starlette": ("retrieval/server/",),
    "uvicorn": ("retrieval/server/",),
    "typer": ("retrieval/cli/",),
    "rich": ("retrieval/cli/",),
    "watchfiles": ("indexer/ingest/watch.py",),  # file-system events for `clipdex watch`
    "rawpy": ("indexer/ingest/raw.py",),  # camera RAW (LibRaw)
    "pillow_jxl": ("indexer/ingest/jxl.py",),  # JPEG XL (libjxl) Pillow plugin
    "av": ("indexer/ingest/video.py",),  # PyAV (FFmpeg): video frames
    "ray": ("indexer/ingest/cluster.py",),  # Ray Data: `clipdex index --cluster`
    # The cluster's shards, and object storage (s3://, gs://) through pyarrow.fs.
    "pyarrow": ("indexer/ingest/cluster.py", "indexer/ingest/objectstore.py"),
    "rapidocr_onnxruntime": ("indexer/model/ocr.py",),  # OCR (PP-OCR models in the wheel)
    "cv2": ("indexer/model/ocr.py",),  # OpenCV: RapidOCR's dependency, used for its resize
}


@dataclass(frozen=True)
class Import:
    """One import statement's target, as a dotted module name, and where it was written."""

    source: str  # the importing module
    path: str  # its file, relative to the repository root
    line: int
    target: str


def layer_of(module: str) -> str | None:
    """The layer of one of our modules; None for third-party ones, "?" for unplaced ones."""
    parts = module.split(".")
    if parts[0] not in PACKAGES:
        return None
    if len(parts) > 1 and parts[1] in SUBLAYERS[parts[0]]:
        return parts[1]
    if parts[0] == "retrieval":
        return "front"
    return "base" if module in BASE else "?"


def module_name(path: Path) -> str:
    """``indexer/store/catalog.py`` -> ``indexer.store.catalog``; a package is its folder."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def our_modules() -> dict[str, Path]:
    """Every module of the two packages, by dotted name."""
    files = (p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py")))
    return {module_name(p): p for p in files}


def imports_in(source: str, module: str, path: str, is_package: bool, known: set[str]):
    """Every import target written in ``source`` (the text of ``module``)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, package)
            for alias in node.names:
                # `from pkg import sub` names the submodule when there is one.
                candidate = f"{base}.{alias.name}"
                yield Import(module, path, node.lineno, candidate if candidate in known else base)
        elif _is_literal_import_module(node):
            yield Import(module, path, node.lineno, node.args[0].value)


def _resolve_from(node: ast.ImportFrom, package: str) -> str:
    """The absolute module of ``from X import ...``, relative forms included."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    anchor = parts[: len(parts) - (node.level - 1)]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def _is_literal_import_module(node: ast.AST) -> bool:
    if not isinstance(node, ast.Call) or len(node.args) != 1:
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    arg = node.args[0]
    return (
        name in ("import_module", "__import__")
        and isinstance(arg, ast.Constant)
        and (isinstance(arg.value, str))
    )


def all_imports() -> list[Import]:
    """The whole import graph of the two packages."""
    modules = our_modules()
    known = set(modules)
    found: list[Import] = []
    for name, path in modules.items():
        rel = path.relative_to(ROOT).as_posix()
        is_package = path.name == "__init__.py"
        found.extend(imports_in(path.read_text(), name, rel, is_package, known))
    return found


def layer_violation(imp: Import) -> str | None:
    """Why ``imp`` breaks the layering, or None when it is allowed."""
    source, target = layer_of(imp.source), layer_of(imp.target)
    if target is None:
        return None
    if "?" in (source, target):
        unplaced = imp.source if source == "?" else imp.target
        return f"{unplaced} lies directly in indexer/ but is no base module: give it a layer"
    if RANK[target] > RANK[source]:
        return f"the {source} layer imports the higher {target} layer"
    if source != target and frozenset({source, target}) in SEPARATE:
        if source == "cli" and imp.target in CLI_MAY_LAUNCH:
            return None
        return f"{source} and {target} never import each other"
    return None


def third_party_violation(imp: Import) -> str | None:
    """Why ``imp`` imports a restricted package outside its home, or None."""
    homes = THIRD_PARTY.get(imp.target.split(".")[0])
    if homes is None:
        return None
    if any(
        imp.path == home or (home.endswith("/") and imp.path.startswith(home)) for home in homes
    ):
        return None
    return f"{imp.target.split('.')[0]} may only be imported in {', '.join(homes)}"


def _report(problems: list[tuple[Import, str]]) -> str:
    return "\n".join(
        f"{imp.path}:{imp.line}: {imp.source} imports {imp.target}: {why}" for imp, why in problems
    )


# -- the rules on the real tree --------------------------------------------------------------
def test_each_layer_imports_only_layers_below_it():
    problems = [(imp, why) for imp in all_imports() if (why := layer_violation(imp))]
    assert not problems, "layering broken:\n" + _report(problems)


def test_heavy_and_edge_packages_are_imported_only_in_their_home():
    problems = [(imp, why) for imp in all_imports() if (why := third_party_violation(imp))]
    assert not problems, "a package outside its home:\n" + _report(problems)


def test_every_layer_exists_and_the_graph_is_not_vacuous():
    layers = {layer_of(name) for name in our_modules()}
    assert set(RANK) <= layers, f"missing layers: {set(RANK) - layers}"
    edges = {(imp.source, imp.target) for imp in all_imports()}
    # A few edges that must be seen, or the parser is blind.
    assert ("indexer.store.library", "indexer.store.catalog") in edges
    assert ("retrieval.search.engine", "indexer.store.library") in edges


def test_every_layer_package_says_what_it_owns_and_may_import():
    for package in ("indexer", "retrieval"):
        for sub in ("", *SUBLAYERS[package]):
            init = ROOT / package / sub / "__init__.py"
            doc = ast.get_docstring(ast.parse(init.read_text())) or ""
            assert "import" in doc and len(doc.split()) >= 15, f"{init}: say what it may import"


# -- the checker itself -----------------------------------------------------------------------
def _check(module: str, source: str, is_package: bool = False) -> list[str]:
    known = set(our_modules())
    path = module.replace(".", "/") + ("/__init__.py" if is_package else ".py")
    found = imports_in(source, module, path, is_package, known)
    return [why for imp in found if (why := layer_violation(imp) or third_party_violation(imp))]


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("indexer.store.catalog", "from retrieval.search import filters"),
        ("indexer.store.catalog", "def f():\n    import indexer.ingest.pipeline\n"),
        ("indexer.model.identity", "from ..store import catalog"),
        ("retrieval.search.engine", "from retrieval import collection"),
        ("retrieval.cli.app", "from retrieval.server.api import router"),
        ("retrieval.server.serving", "from retrieval.cli import app"),
        ("retrieval.server.api", "import importlib\nimportlib.import_module('retrieval.cli.app')"),
        ("indexer.errors", "from indexer.model.identity import EMBED_DIM"),
        ("indexer.newthing", "from indexer.errors import ClipdexError"),
        ("indexer.store.catalog", "def f():\n    import torch\n"),
        ("retrieval.search.engine", "import sqlalchemy"),
        ("indexer.store.catalog", "from fastapi import FastAPI"),
    ],
)
def test_checker_finds_a_violation(module, source):
    assert _check(module, source)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("indexer.store.catalog", "from indexer.model.identity import EMBED_DIM"),
        ("indexer.store.catalog", "from . import vectors"),
        ("retrieval.cli.app", "from retrieval import collection\nimport typer"),
        ("retrieval.cli.app", "def serve():\n    from retrieval.server.serving import run\n"),
        ("retrieval.server.api", "from retrieval.search.engine import SearchEngine"),
        ("indexer.model.torch_encoder", "import torch, open_clip"),
        ("indexer.store.vectors", "import faiss"),
    ],
)
def test_checker_allows_downward_imports(module, source):
    assert not _check(module, source)


def test_child_processes_import_this_copy_of_the_packages():
    """Decode workers and the ONNX export child get the folder holding ``indexer`` first."""
    from indexer.fsutil import child_pythonpath

    first = Path(child_pythonpath().split(os.pathsep)[0])
    assert first == ROOT and (first / "indexer" / "__init__.py").is_file()


def test_ray_is_imported_only_when_a_cluster_is_asked_for():
    """The CLI, the server, the pipeline and even the cluster and object-storage modules
    load without Ray or pyarrow: only connecting to a cluster or reading a URI imports them
    (cold start, install size)."""
    code = (
        "import sys, retrieval.cli.app, retrieval.server.state, indexer.ingest.pipeline, "
        "indexer.ingest.cluster, indexer.ingest.objectstore, retrieval.server.api\n"
        "from indexer.ingest.discover import resolve_root\n"
        "resolve_root('.')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'pyarrow'}))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
