"""MobileCLIP-S2 through ONNX Runtime: the CPU backend, and the torch-free query path.

Both towers are exported once from the re-parameterised open_clip model (by
:mod:`indexer.model.onnx_export`, run as a child process: this module and the process that uses
it never import torch), verified against torch, and cached under
``<cache>/onnx/<architecture>--<weights>--v<N>/``:

    image.onnx   (N, 3, 256, 256) float32 in [0, 1] -> (N, 512) raw image features
    text.onnx    (N, 77) int64 token ids             -> (N, 512) raw text features
    *.onnx.data  their weights (ONNX external data: loads faster than one big protobuf)
    meta.json    identity, logit scale, the verification results, file sizes

``meta.json`` is written last and the folder is renamed into place whole, so a folder that
exists is a complete, verified export. The weights' identity (checkpoint sha256) is memoised
on disk by (path, size, mtime, inode), so a cold query neither hashes a 250 MB checkpoint
nor imports torch to find its export.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from indexer.errors import WeightsUnavailable
from indexer.fsutil import child_pythonpath, write_atomic
from indexer.model.identity import DEFAULT_PRETRAINED, ModelIdentity, l2_normalise
from indexer.model.torch_encoder import (
    weights_help,  # torch_encoder imports torch only when it runs
)

EXPORT_VERSION = 3  # bump when the exported graphs change: old cache folders are then ignored
IMAGE_FILE, TEXT_FILE, META_FILE = "image.onnx", "text.onnx", "meta.json"
HASHES_FILE = "checkpoints.json"
log = logging.getLogger("clipdex")


def data_file(model_file: str) -> str:
    """The name of the weights file beside an exported graph."""
    return f"{model_file}.data"


def default_cache_dir() -> Path:
    """Where exported models live when the caller names no folder: the user's cache dir
    for clipdex. (``CLIPDEX_CACHE`` is read at the edges, the CLI and the server, and
    arrives here as ``cache_dir``.)"""
    import platformdirs

    return Path(platformdirs.user_cache_dir("clipdex"))


# -- weights identity without torch -----------------------------------------------------------
def weights_identity(weights: Path | None, cache_dir: Path) -> ModelIdentity:
    """The identity of ``weights`` (None: the hub tag), same as the torch backend computes.

    A checkpoint's sha256 is remembered in ``<cache>/checkpoints.json`` under its resolved
    path, keyed by size, mtime and inode, so it is hashed once, not once per process.
    """
    if weights is None:
        return ModelIdentity(weights=DEFAULT_PRETRAINED)
    return ModelIdentity(weights=f"sha256:{_cached_sha256(Path(weights), cache_dir)}")


def _cached_sha256(path: Path, cache_dir: Path) -> str:
    stat = path.stat()
    key = str(path.resolve())
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    memo_file = cache_dir / HASHES_FILE
    memo = _read_json(memo_file)
    entry = memo.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and entry.get("sha256"):
        return str(entry["sha256"])
    digest = _sha256_file(path)
    memo[key] = {"stamp": stamp, "sha256": digest}
    with contextlib.suppress(OSError):  # a read-only cache only costs a re-hash next time
        write_atomic(memo_file, json.dumps(memo, indent=1).encode())
    return digest


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


# -- the cached export ------------------------------------------------------------------------
def export_dir(identity: ModelIdentity, cache_dir: Path) -> Path:
    """The cache folder of one model's export, found by weights tag or checkpoint hash."""
    weights = identity.weights.replace(":", "-")
    return cache_dir / "onnx" / f"{identity.architecture}--{weights}--v{EXPORT_VERSION}"


def read_export(folder: Path, identity: ModelIdentity) -> dict | None:
    """The export's metadata if ``folder`` holds a complete, verified export of ``identity``."""
    meta = _read_json(folder / META_FILE)
    if not meta or meta.get("identity") != json.loads(identity.to_json()):
        return None
    for name, size in meta.get("files", {}).items():
        try:
            if (folder / name).stat().st_size != size:
                return None
        except OSError:
            return None
    expected = {IMAGE_FILE, TEXT_FILE, data_file(IMAGE_FILE), data_file(TEXT_FILE)}
    return meta if expected <= set(meta.get("files", {})) else None


def ensure_export(weights: Path | None, identity: ModelIdentity, cache_dir: Path) -> dict:
    """Metadata of the verified export of ``weights``, exporting it first if needed.

    The export runs in a child process (it needs torch and open_clip, which this process
    never imports); its typed errors (e.g. WeightsUnavailable) are raised here.
    """
    folder = export_dir(identity, cache_dir)
    meta = read_export(folder, identity)
    if meta is not None:
        return meta
    log.warning("exporting %s to ONNX once (~20 s); later runs reuse %s", identity.name, folder)
    _export_in_child(weights, identity, folder)
    meta = read_export(folder, identity)
    if meta is None:
        raise WeightsUnavailable(f"the ONNX export in {folder} is incomplete: delete it and retry")
    return meta


def _export_in_child(weights: Path | None, identity: ModelIdentity, folder: Path) -> None:
    """Run ``python -m indexer.model.onnx_export`` and turn its failure back into a typed error."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "indexer.model.onnx_export", str(folder), identity.to_json()]
    if weights is not None:
        command.append(str(weights))
    env = {**os.environ, "PYTHONPATH": child_pythonpath()}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode == 0:
        return
    lines = done.stdout.strip().splitlines()
    reported = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    message = reported.get("message")
    if not message:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        message = (
            f"the ONNX export of {identity.name} failed ({tail[0][:200]}): "
            "retry, or choose the torch backend"
        )
    raise WeightsUnavailable(message, setting=reported.get("setting") or "backend")


# -- the encoder ------------------------------------------------------------------------------
class OnnxEncoder:
    """Both towers in ONNX Runtime on the CPU; sessions are created on first use."""

    backend = "onnx"

    def __init__(
        self,
        weights: Path | None = None,
        *,
        cache_dir: Path | None = None,
        threads: int | None = None,
        single_query: bool = False,
    ) -> None:
        self.weights = Path(weights) if weights else None
        if self.weights is not None and not self.weights.is_file():
            raise WeightsUnavailable(
                f"weights file {weights} does not exist: {weights_help()}", setting="weights"
            )
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.threads = threads
        self.single_query = single_query
        self.identity = weights_identity(self.weights, self.cache_dir)
        self._meta: dict | None = None
        self._sessions: dict[str, object] = {}

    @property
    def meta(self) -> dict:
        """The verified export's metadata (exports on first use)."""
        if self._meta is None:
            self._meta = ensure_export(self.weights, self.identity, self.cache_dir)
        return self._meta

    @property
    def folder(self) -> Path:
        return export_dir(self.identity, self.cache_dir)

    @property
    def logit_scale(self) -> float:
        return float(self.meta["logit_scale"])

    def prepare(self) -> None:
        """Export if needed and load the image tower, before a run needs its first batch."""
        self.session(IMAGE_FILE)

    def session(self, name: str):
        """The ONNX Runtime session of one tower file, created once.

        The image session's threads do not spin-wait between batches: while indexing, the
        decode workers need those cycles. The text session loads the optimised copy of
        its graph (:func:`text_session`).
        """
        if name not in self._sessions:
            _ = self.meta
            if name == TEXT_FILE:
                session = text_session(self.folder, self.threads, self.single_query)
            else:
                session = _make_session(self.folder / name, self.threads, spin=False)
            self._sessions[name] = session
        return self._sessions[name]

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        """(N,3,256,256) float32 in [0,1] -> (N,512) unit vectors."""
        pixels = np.ascontiguousarray(batch, dtype=np.float32)
        return l2_normalise(self.session(IMAGE_FILE).run(None, {"pixels": pixels})[0])

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """N strings -> (N,512) unit vectors (torch-free tokenizer, same ids as open_clip)."""
        from indexer.model.tokenizer import Tokenizer

        tokens = Tokenizer.load().encode(list(texts))
        return l2_normalise(self.session(TEXT_FILE).run(None, {"tokens": tokens})[0])


def _make_session(path: Path, threads: int | None, spin: bool = True, options=None):
    import onnxruntime as ort

    if options is None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own untyped failures
        raise WeightsUnavailable(
            f"cannot load the ONNX model {path} ({str(exc).splitlines()[0][:160]}): "
            f"delete {path.parent} to export it again"
        ) from exc


# -- the optimised text graph -----------------------------------------------------------------
# ONNX Runtime spends most of a cold query's session set-up optimising the text graph (fusing
# attention, GELU, layer norm) and pre-packing its weights. The optimised graph is saved once
# beside the export and later loaded with optimisations off: same kernels, same outputs.
# It is saved at the EXTENDED level, which holds no layout transforms specific to this CPU
# (the ALL level adds only NCHWc conv layouts, and the text tower has no convolutions).
OPTIMISED_STAMP = "stamp.json"


def optimised_dir(folder: Path, version: str) -> Path:
    """Where the optimised text graph for ONNX Runtime ``version`` lives in an export folder.

    The version is in the name: a graph optimised by one release may use fused operators
    another does not know, so each release makes (and finds) its own.
    """
    return folder / f"{Path(TEXT_FILE).stem}.optimised-ort{version}"


def text_session(folder: Path, threads: int | None, single_query: bool = False):
    """The text tower's session, from the optimised graph (made here on first use).

    ``single_query``: the process embeds one text and exits (the CLI); its weights are then
    not pre-packed, which costs a cold query more than it saves on one run. A damaged or
    unreadable optimised graph is made again; if the cache is read-only, the session is
    built from the exported graph as before.
    """
    import onnxruntime as ort

    target = optimised_dir(folder, ort.__version__)
    if read_optimised(target, ort.__version__):
        options = _text_options(ort.GraphOptimizationLevel.ORT_DISABLE_ALL, single_query)
        try:
            return _make_session(target / TEXT_FILE, threads, options=options)
        except WeightsUnavailable as exc:
            log.warning("the optimised text graph in %s is unusable (%s): rebuilding", target, exc)
    return _optimise_text(folder, target, threads, single_query)


def _text_options(level, single_query: bool):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if single_query:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def read_optimised(target: Path, version: str) -> bool:
    """Whether ``target`` holds a complete optimised graph made by ONNX Runtime ``version``."""
    stamp = _read_json(target / OPTIMISED_STAMP)
    files = stamp.get("files")
    if stamp.get("onnxruntime") != version or not isinstance(files, dict):
        return False
    if set(files) != {TEXT_FILE, data_file(TEXT_FILE)}:
        return False
    try:
        return all((target / name).stat().st_size == size for name, size in files.items())
    except OSError:
        return False


def _optimise_text(folder: Path, target: Path, threads: int | None, single_query: bool):
    """Build the text session from the export, saving its optimised graph into ``target``.

    The graph is written into a temporary folder beside ``target``, stamped last and
    renamed into place whole, so a reader never sees part of one.
    """
    import onnxruntime as ort

    level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options = _text_options(level, single_query)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=folder))
    except OSError as exc:  # a read-only cache: optimise in memory, every time
        log.debug("cannot save the optimised text graph in %s: %s", folder, exc)
        return _make_session(folder / TEXT_FILE, threads, options=options)
    try:
        options.optimized_model_filepath = str(staging / TEXT_FILE)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", data_file(TEXT_FILE)
        )
        session = _make_session(folder / TEXT_FILE, threads, options=options)
        _stamp_and_place(staging, target, ort.__version__)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return session


def _stamp_and_place(staging: Path, target: Path, version: str) -> None:
    """Stamp the saved graph and rename its folder to ``target`` (replacing a bad one)."""
    try:
        names = (TEXT_FILE, data_file(TEXT_FILE))
        files = {name: (staging / name).stat().st_size for name in names}
        for name in files:
            _fsync_file(staging / name)
        stamp = {"onnxruntime": version, "files": files}
        write_atomic(staging / OPTIMISED_STAMP, json.dumps(stamp).encode())
        if target.exists():  # stale or damaged: move it aside, then drop it
            doomed = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            os.rename(target, doomed / "graph")
            shutil.rmtree(doomed, ignore_errors=True)
        os.rename(staging, target)
    except OSError as exc:  # e.g. another process placed it first: theirs is as good
        log.debug("optimised text graph not saved to %s: %s", target, exc)
        return
    _drop_other_optimised(target)


def _drop_other_optimised(target: Path) -> None:
    """Delete the optimised graphs other ONNX Runtime versions left (~250 MB each)."""
    prefix = target.name.rsplit("-ort", 1)[0] + "-ort"
    for other in target.parent.glob(prefix + "*"):
        if other.is_dir() and other != target:
            shutil.rmtree(other, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
