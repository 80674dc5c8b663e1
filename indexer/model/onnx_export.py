"""Export MobileCLIP-S2's two towers to ONNX, verify them against torch, cache them atomically.

Runs once per weights, as ``python -m indexer.model.onnx_export`` started by
:mod:`indexer.model.onnx_encoder`, so the process that answers queries never imports torch; with
:mod:`indexer.model.torch_encoder` this is the only module that imports it. The model is the one
the torch backend runs: open_clip's MobileCLIP-S2, re-parameterised, eval. Each exported
file is checked on a probe batch (cosine >= :data:`MIN_COSINE` per row and a small error
relative to the probe spread, at a batch size other than the traced one, which also proves
the dynamic batch axis) before the folder is renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from indexer.errors import ClipdexError, WeightsUnavailable
from indexer.model.identity import CONTEXT_LENGTH
from indexer.model.onnx_encoder import IMAGE_FILE, META_FILE, TEXT_FILE, data_file, read_export
from indexer.model.tokenizer import Tokenizer

MIN_COSINE = 0.9999
MAX_RELATIVE_ERROR = 0.01
OPSET = 17
PROBE_TEXTS = ["a photo of a dog", "", "Sunset über dem Meer 🌅", "x " * 120]


def export_locked(weights: Path | None, identity, folder: Path) -> None:
    """Export unless another process finished it while we waited for the lock."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if read_export(folder, identity) is None:
            export(weights, identity, folder)


def export(weights: Path | None, identity, folder: Path) -> Path:
    """Build the torch model, export both towers, verify, then rename ``folder`` into place."""
    model = _load_model(weights)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=folder.parent))
    try:
        image_check = _export_tower(model, "image", staging / IMAGE_FILE)
        text_check = _export_tower(model, "text", staging / TEXT_FILE)
        meta = _meta(model, identity, staging, image_check, text_check)
        _write_synced(staging / META_FILE, json.dumps(meta, indent=1).encode())
        shutil.rmtree(folder, ignore_errors=True)  # a stale or incomplete earlier attempt
        os.rename(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _drop_other_versions(folder)
    return folder


def _drop_other_versions(folder: Path) -> None:
    """Delete this model's exports made by other export versions (400 MB each)."""
    prefix = folder.name.rsplit("--v", 1)[0] + "--v"
    for other in folder.parent.glob(prefix + "*"):
        if other.is_dir() and other != folder:
            shutil.rmtree(other, ignore_errors=True)


def _load_model(weights: Path | None):
    try:
        from indexer.model.torch_encoder import build_model
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise WeightsUnavailable(
            "exporting the ONNX model needs torch and open_clip once: "
            "pip install 'clipdex[torch]'"
        ) from exc
    return build_model(weights)


class Tower(torch.nn.Module):
    """One tower of the open_clip model as a module of its own, for ``torch.onnx.export``."""

    def __init__(self, model, which: str) -> None:
        super().__init__()
        self.model = model
        self.which = which

    def forward(self, x):
        if self.which == "image":
            return self.model.encode_image(x)
        return self.model.encode_text(x)


def _probe(which: str, batch: int):
    """Deterministic probe inputs: noise, gradients and flat images; varied texts."""
    if which == "text":
        texts = (PROBE_TEXTS * batch)[:batch]
        return torch.from_numpy(Tokenizer.load().encode(texts, CONTEXT_LENGTH))
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, 256, 256, generator=generator)
    ramp = torch.linspace(0, 1, 256)
    images[0] = ramp[None, None, :] * ramp[None, :, None]
    if batch > 2:
        images[2] = 0.5
    return images


def _export_tower(model, which: str, path: Path) -> dict:
    """Export one tower (traced at batch 2), then verify it against torch at batch 3."""
    tower = Tower(model, which).eval()
    name = "pixels" if which == "image" else "tokens"
    traced = path.with_suffix(".traced.onnx")
    # Not under no_grad: that switches nn.MultiheadAttention to its fused fast path, which
    # has no ONNX symbolic (aten::_native_multi_head_attention).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            tower,
            (_probe(which, 2),),
            str(traced),
            input_names=[name],
            output_names=["features"],
            dynamic_axes={name: {0: "batch"}, "features": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    _split_weights(traced, path)
    return _verify(tower, which, name, path)


def _split_weights(traced: Path, path: Path) -> None:
    """Re-save with the weights in ``<name>.data`` beside the graph: a session loads it ~2x
    faster than one 250 MB protobuf, which is most of a cold text query's time."""
    import onnx

    graph = onnx.load(str(traced))
    onnx.save_model(graph, str(path), save_as_external_data=True, location=data_file(path.name))
    traced.unlink()
    for written in (path, path.with_name(data_file(path.name))):
        _fsync(written)


def _verify(tower, which: str, name: str, path: Path) -> dict:
    """Compare the exported file with torch on a probe batch; raise unless they agree.

    Two checks: cosine >= MIN_COSINE per row, and the error is under MAX_RELATIVE_ERROR of
    how far the probe embeddings are from each other. The second keeps the check meaningful
    for weights whose embeddings are nearly collinear (random weights: cosine ~0.99998
    between unrelated images), where a cosine threshold alone would pass a wrong graph.
    """
    import onnxruntime as ort

    probe = _probe(which, 3)
    with torch.inference_mode():
        expected = _unit(tower(probe).numpy())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = _unit(session.run(None, {name: probe.numpy()})[0])
    cosine = float((expected * actual).sum(1).min())
    spread = float(np.linalg.norm(expected - expected.mean(0), axis=1).mean())
    relative = float(np.linalg.norm(actual - expected, axis=1).max() / max(spread, 1e-12))
    if not (cosine >= MIN_COSINE and relative <= MAX_RELATIVE_ERROR):
        raise WeightsUnavailable(
            f"the ONNX export of the {which} tower does not match torch (cosine {cosine:.6f}, "
            f"error {relative:.1%} of the probe spread): choose the torch backend",
            setting="backend",
        )
    return {"cosine": cosine, "relative_error": relative}


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _meta(model, identity, staging: Path, image_check: dict, text_check: dict) -> dict:
    import open_clip

    return {
        "identity": json.loads(identity.to_json()),
        "logit_scale": float(model.logit_scale.exp().item()),
        "verified": {
            "thresholds": {"cosine": MIN_COSINE, "relative_error": MAX_RELATIVE_ERROR},
            "image": image_check,
            "text": text_check,
        },
        "files": {path.name: path.stat().st_size for path in sorted(staging.iterdir())},
        "exported_with": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        "opset": OPSET,
    }


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError), open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def main(argv: list[str]) -> int:
    """``python -m indexer.model.onnx_export FOLDER IDENTITY_JSON [WEIGHTS]``: exit 0 when exported.

    A clipdex error is printed as one JSON line on stdout, for the parent to re-raise.
    """
    from indexer.model.identity import ModelIdentity

    folder, identity = Path(argv[0]), ModelIdentity.from_json(argv[1])
    weights = Path(argv[2]) if len(argv) > 2 else None
    try:
        export_locked(weights, identity, folder)
    except ClipdexError as exc:
        reported = {"error": type(exc).__name__, "message": str(exc), "setting": exc.setting}
        print(json.dumps(reported))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
