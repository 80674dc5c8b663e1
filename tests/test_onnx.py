"""The ONNX Runtime backend: export + verification, fidelity to torch, the cache, no torch.

The towers are exported from the real MobileCLIP-S2 architecture (the spread random-weights
checkpoint, tests/spread.py) through the product's own path, once for this module, into a
cache of its own: the first test to use it pays the export (in a child process) and the
rest reuse it.

With plain random weights every image embeds to nearly the same direction (cosine ~0.99998
between unrelated photos), so a plain cosine threshold would prove little; the spread
checkpoint puts unrelated photos far apart, so a cosine of 0.9999 between backends means
what it says. Fidelity tests also measure the error against how far apart different inputs
embed, or compare *centred* embeddings (the set's mean removed); both say the same thing
with real weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from indexer.errors import ConfigError
from indexer.ingest.decode import decode_for_model
from indexer.model.encoders import load_encoder, resolve_backend
from indexer.model.onnx_encoder import (
    META_FILE,
    OnnxEncoder,
    data_file,
    export_dir,
    read_export,
    weights_identity,
)
from indexer.store.catalog import ImageRecord
from indexer.store.library import Library

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "open_clip", "timm", "torchvision")
TEXTS = ["a dog on the beach", "Sunset über dem Meer 🌅", "", "x" * 500, "東京の夜景 #night"]


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def first_export(spread_checkpoint, onnx_cache) -> dict:
    """Export in a fresh process through OnnxEncoder; report what that process imported."""
    report = run_python(
        f"""
        from pathlib import Path
        from indexer.model.onnx_encoder import OnnxEncoder
        encoder = OnnxEncoder(Path({str(spread_checkpoint)!r}), cache_dir=Path({str(onnx_cache)!r}))
        vector = encoder.encode_texts(["a dog"])[0]
        result = {{"norm": float((vector ** 2).sum())}}
        """,
        onnx_cache,
    )
    return report


@pytest.fixture(scope="module")
def onnx_encoder(first_export, spread_checkpoint, onnx_cache) -> OnnxEncoder:
    return OnnxEncoder(spread_checkpoint, cache_dir=onnx_cache)


@pytest.fixture(scope="module")
def torch_encoder(spread_checkpoint):
    pytest.importorskip("open_clip")
    return load_encoder(spread_checkpoint, device="cpu", backend="torch")


def run_python(body: str, cache: Path) -> dict:
    """Run ``body`` in a fresh interpreter; it sets ``result``; returns it with heavy imports."""
    script = textwrap.dedent(body) + textwrap.dedent(
        f"""
        import json, sys
        result["heavy"] = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        print("RESULT " + json.dumps(result))
        """
    )
    env = {**os.environ, "CLIPDEX_CACHE": str(cache), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def centred(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets minus their common mean: what is left is what tells images apart."""
    mean = np.concatenate([a, b]).astype(np.float64).mean(0)
    return a - mean, b - mean


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Largest row error over the median distance between different rows of the reference."""
    theirs = theirs.astype(np.float64)
    apart = np.linalg.norm(theirs[:, None] - theirs[None], axis=-1)[np.triu_indices(len(theirs), 1)]
    return float(np.linalg.norm(ours - theirs, axis=1).max() / np.median(apart))


def distinct_pairs(a: np.ndarray) -> np.ndarray:
    """Centred cosines between different rows (how similar *different* inputs look)."""
    rows = a - a.astype(np.float64).mean(0)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return (rows @ rows.T)[np.triu_indices(len(rows), 1)]


# -- export, verification, cache ------------------------------------------------------------
def test_first_export_never_imports_torch_in_the_caller(first_export):
    assert first_export["heavy"] == []
    assert first_export["norm"] == pytest.approx(1.0, abs=1e-5)


def test_export_is_verified_and_complete(onnx_encoder, onnx_cache):
    folder = export_dir(onnx_encoder.identity, onnx_cache)
    assert onnx_encoder.identity.weights.split(":")[1] in folder.name
    verified = json.loads((folder / META_FILE).read_text())["verified"]
    for tower in ("image", "text"):
        assert verified[tower]["cosine"] >= 0.9999
        assert verified[tower]["relative_error"] <= 0.01
    meta = json.loads((folder / META_FILE).read_text())
    for name in ("image.onnx", "text.onnx"):
        assert (folder / name).stat().st_size == meta["files"][name]
        assert (folder / data_file(name)).stat().st_size > 50e6  # the weights
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".export-")]
    assert onnx_encoder.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)


def test_cached_export_is_reused_without_torch(first_export, spread_checkpoint, onnx_cache):
    identity = weights_identity(spread_checkpoint, onnx_cache)
    meta_file = export_dir(identity, onnx_cache) / META_FILE
    before = meta_file.stat()
    report = run_python(
        f"""
        from pathlib import Path
        import numpy as np
        from indexer.model.encoders import load_encoder
        encoder = load_encoder(
            Path({str(spread_checkpoint)!r}), backend="onnx", cache_dir=Path({str(onnx_cache)!r})
        )
        images = encoder.encode_images(np.full((2, 3, 256, 256), 0.5, np.float32))
        texts = encoder.encode_texts(["a cat", "two dogs"])
        result = {{"shapes": [list(images.shape), list(texts.shape)]}}
        """,
        onnx_cache,
    )
    assert report["heavy"] == []
    assert report["shapes"] == [[2, 512], [2, 512]]
    after = meta_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_incomplete_export_folder_is_not_trusted(onnx_encoder, onnx_cache, tmp_path):
    source = export_dir(onnx_encoder.identity, onnx_cache)
    fake = tmp_path / source.name
    fake.mkdir()
    (fake / META_FILE).write_text((source / META_FILE).read_text())
    for name in ("image.onnx", "text.onnx", "image.onnx.data"):
        (fake / name).write_bytes(b"short")
    assert read_export(fake, onnx_encoder.identity) is None
    assert read_export(source, onnx_encoder.identity) is not None


def test_checkpoint_hash_is_remembered_across_processes(spread_checkpoint, tmp_path, monkeypatch):
    import indexer.model.onnx_encoder as module

    first = weights_identity(spread_checkpoint, tmp_path)
    monkeypatch.setattr(module, "_sha256_file", lambda path: pytest.fail("hashed twice"))
    assert weights_identity(spread_checkpoint, tmp_path) == first
    copy = tmp_path / "copy.pt"
    copy.write_bytes(spread_checkpoint.read_bytes())
    monkeypatch.setattr(module, "_sha256_file", lambda path: "0" * 64)
    assert weights_identity(copy, tmp_path).weights == "sha256:" + "0" * 64  # new file: hashed


# -- fidelity -----------------------------------------------------------------------------------
def test_identity_is_the_same_for_both_backends(onnx_encoder, torch_encoder, tmp_path):
    assert onnx_encoder.identity == torch_encoder.identity
    with Library.open(tmp_path / "lib", create=True) as library:
        library.bind_model(onnx_encoder.identity)
        library.check_model(torch_encoder.identity)  # searchable with the other backend


def test_onnx_matches_torch_on_photos_and_texts(onnx_encoder, torch_encoder, photo_folder):
    pixels = np.stack([decode_for_model(str(p))[0] for p in sorted(photo_folder.iterdir())])
    for ours, theirs in [
        (onnx_encoder.encode_images(pixels), torch_encoder.encode_images(pixels)),
        (onnx_encoder.encode_texts(TEXTS), torch_encoder.encode_texts(TEXTS)),
    ]:
        assert cosines(ours, theirs).min() >= 0.9999
        assert relative_error(ours, theirs) <= 0.01
    assert onnx_encoder.logit_scale == pytest.approx(torch_encoder.logit_scale, rel=1e-6)


def test_draft_jpeg_decode_keeps_the_embedding(onnx_encoder, corpus):
    """DCT-domain downscale (Image.draft) vs full decode: cosine >= 0.99 on every photo."""
    photos = sorted(p for p in (corpus / "photos").rglob("*") if p.suffix.lower() in (".jpg",))
    assert len(photos) >= 20
    drafted = np.stack([decode_for_model(str(p), draft=True)[0] for p in photos])
    full = np.stack([decode_for_model(str(p), draft=False)[0] for p in photos])
    changed = np.abs(drafted - full).reshape(len(photos), -1).max(1) > 0
    assert changed.sum() >= 10  # draft did take effect on the large photos
    ours, reference = onnx_encoder.encode_images(drafted), onnx_encoder.encode_images(full)
    for cos in (cosines(ours, reference), cosines(*centred(ours, reference))):
        worst = {photos[i].name: round(float(cos[i]), 5) for i in np.argsort(cos)[:3]}
        assert cos.min() >= 0.99, worst
    assert np.median(distinct_pairs(reference)) < 0.5  # the centred check discriminates


# -- backend choice and the cold query path ----------------------------------------------------
def test_backend_choice(monkeypatch):
    import indexer.model.encoders as encoders

    assert resolve_backend("auto", "cpu") == "onnx"
    assert resolve_backend("auto", "cuda") == "torch"
    assert resolve_backend("torch", "cpu") == "torch"
    monkeypatch.setattr(encoders, "cuda_available", lambda: False)
    assert resolve_backend("auto", "auto") == "onnx"
    monkeypatch.setattr(encoders, "cuda_available", lambda: True)
    assert resolve_backend("auto", "auto") == "torch"
    with pytest.raises(ConfigError, match="runs on the CPU"):
        resolve_backend("onnx", "cuda")
    with pytest.raises(ConfigError, match="unknown backend"):
        resolve_backend("tensorrt", "cpu")


def build_library(root: Path, identity, count: int) -> Path:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((count, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with Library.open(root, create=True) as library:
        library.bind_model(identity)
        records = [
            ImageRecord(f"/photos/img_{i:05d}.jpg", 1000, 1, f"{i:064x}", vectors[i], 64, 48)
            for i in range(count)
        ]
        ids = library.catalog.commit_batch(records)
        library.index.add(np.asarray(ids, np.int64), vectors)
        library.checkpoint()
    return root


def test_cold_cli_search_on_10k_images_never_imports_torch(onnx_encoder, onnx_cache, tmp_path):
    library = build_library(tmp_path / "lib", onnx_encoder.identity, 10_000)
    weights = onnx_encoder.weights
    report = run_python(
        f"""
        import io, json, sys, contextlib
        from retrieval.cli import main
        sys.argv = ["clipdex", "search", "a dog on the beach", "--library", {str(library)!r},
                    "--weights", {str(weights)!r}, "-k", "5", "--json"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                main()
            except SystemExit as exc:
                assert not exc.code, exc.code
        result = {{"found": json.loads(out.getvalue())["results"]}}
        """,
        onnx_cache,
    )
    assert report["heavy"] == []
    assert len(report["found"]) == 5
    scores = [r["score"] for r in report["found"]]
    assert scores == sorted(scores, reverse=True)
