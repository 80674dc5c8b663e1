"""A cold text query does only what it needs (structure, not speed: bench/bench_cold.py times it).

- The text tower's optimised graph is saved once beside the export and loaded with ONNX
  Runtime's optimisations off: the same outputs as the exported graph optimised on load; a
  damaged or foreign copy is made again; a read-only cache still answers.
- The tokenizer imports ftfy only for a text ftfy could change.
- ``python -m retrieval.cli search`` imports neither SQLAlchemy nor torch/open_clip, ftfy or Pillow.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from indexer.model import onnx_encoder
from indexer.model.onnx_encoder import (
    OPTIMISED_STAMP,
    TEXT_FILE,
    OnnxEncoder,
    data_file,
    optimised_dir,
    read_optimised,
)
from indexer.model.tokenizer import Tokenizer, clean, is_plain

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["a dog", "a photo of a dog on the beach", "", "Sunset über dem Meer 🌅", "x " * 100]


# -- the optimised text graph -----------------------------------------------------------------
@pytest.fixture(scope="module")
def export_folder(random_checkpoint, model_cache) -> Path:
    """The session's ONNX export of the random checkpoint (made once, ~15 s)."""
    encoder = OnnxEncoder(random_checkpoint, cache_dir=model_cache)
    _ = encoder.meta
    return encoder.folder


def _reference(folder: Path) -> np.ndarray:
    """The exported text graph, optimised on load as before (ORT_ENABLE_ALL)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / TEXT_FILE), providers=["CPUExecutionProvider"])
    return session.run(None, {"tokens": Tokenizer.load().encode(TEXTS)})[0]


def _features(folder: Path, single_query: bool = False) -> np.ndarray:
    session = onnx_encoder.text_session(folder, threads=None, single_query=single_query)
    return session.run(None, {"tokens": Tokenizer.load().encode(TEXTS)})[0]


def _target(folder: Path) -> Path:
    import onnxruntime as ort

    return optimised_dir(folder, ort.__version__)


@pytest.mark.parametrize("single_query", [False, True])
def test_optimised_graph_is_saved_once_and_answers_the_same(export_folder, single_query):
    expected = _reference(export_folder)
    first = _features(export_folder, single_query)  # saves it (or finds it saved)
    target = _target(export_folder)
    stamp = json.loads((target / OPTIMISED_STAMP).read_text())
    assert set(stamp["files"]) == {TEXT_FILE, data_file(TEXT_FILE)}
    made = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    again = _features(export_folder, single_query)  # loads the saved graph, optimisations off
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == made
    for features in (first, again):
        np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)
    assert not [p for p in export_folder.iterdir() if p.name.startswith(".")]  # no litter


def _truncate_weights(target: Path) -> None:
    with open(target / data_file(TEXT_FILE), "r+b") as handle:
        handle.truncate(1000)


def _garble_graph(target: Path) -> None:
    graph = target / TEXT_FILE
    graph.write_bytes(
        b"\x00garbage" * (graph.stat().st_size // 8) + b"\x00" * (graph.stat().st_size % 8)
    )


def test_graphs_of_other_onnxruntime_versions_are_dropped(export_folder):
    _features(export_folder)
    old = optimised_dir(export_folder, "0.0.1")
    shutil.copytree(_target(export_folder), old)
    shutil.rmtree(_target(export_folder))
    _features(export_folder)  # made again for this version; the other one goes
    assert _target(export_folder).is_dir() and not old.exists()


def _foreign_stamp(target: Path) -> None:
    stamp = json.loads((target / OPTIMISED_STAMP).read_text())
    (target / OPTIMISED_STAMP).write_text(json.dumps({**stamp, "onnxruntime": "0.0.1"}))


@pytest.mark.parametrize("damage", [_truncate_weights, _garble_graph, _foreign_stamp])
def test_damaged_or_foreign_optimised_graph_is_made_again(export_folder, damage):
    import onnxruntime as ort

    expected = _reference(export_folder)
    _features(export_folder)
    target = _target(export_folder)
    damage(target)
    np.testing.assert_allclose(_features(export_folder), expected, rtol=1e-4, atol=1e-5)
    assert read_optimised(target, ort.__version__)
    np.testing.assert_allclose(_features(export_folder), expected, rtol=1e-4, atol=1e-5)


def test_read_only_cache_still_answers(export_folder, monkeypatch):
    expected = _reference(export_folder)
    shutil.rmtree(_target(export_folder))

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(onnx_encoder.tempfile, "mkdtemp", refuse)
    np.testing.assert_allclose(_features(export_folder), expected, rtol=1e-4, atol=1e-5)
    assert not _target(export_folder).exists()


def test_an_encoder_uses_the_optimised_graph(export_folder, random_checkpoint, model_cache):
    encoder = OnnxEncoder(random_checkpoint, cache_dir=model_cache, single_query=True)
    vector = encoder.encode_texts(["a dog"])[0]
    assert float(vector @ vector) == pytest.approx(1.0, abs=1e-5)
    assert read_optimised(_target(export_folder), __import__("onnxruntime").__version__)


# -- the tokenizer's ftfy -------------------------------------------------------------------
def _reference_clean(text: str) -> str:
    """open_clip's clean, ftfy always."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


PLAIN_ALPHABET = "".join(map(chr, range(0x20, 0x7F))).replace("&", "") + "\t\n\r"


@given(st.text(alphabet=PLAIN_ALPHABET, max_size=200))
@example("A  Dog\r\n on the\tBEACH!")
@example("<b>a dog</b> #1 'quoted' \"double\" ;lt")
def test_plain_text_cleans_the_same_without_ftfy(text):
    assert is_plain(text)
    assert clean(text) == _reference_clean(text)


@pytest.mark.parametrize(
    "text", ["&amp;amp;amp;", "caf\u00e9", "\x1b[31mred", "a\x00dog", "ﬁsh", "“quoted”", "\x7f"]
)
def test_text_ftfy_could_change_goes_through_ftfy(text):
    assert not is_plain(text)
    assert clean(text) == _reference_clean(text)


def test_an_ascii_query_does_not_import_ftfy():
    code = (
        "import sys; from indexer.model.tokenizer import Tokenizer; "
        "Tokenizer.load().encode(['a dog on the beach']); print('ftfy' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == "False", done.stderr


# -- what a cold `clipdex search` imports -----------------------------------------------------
NEVER_IMPORTED = (
    *("sqlalchemy", "torch", "open_clip", "timm", "torchvision", "ftfy", "PIL"),
    *("ray", "pyarrow"),  # the cluster path's (indexer/ingest/cluster.py), only with --cluster
)


def imported_modules(stderr: str) -> set[str]:
    """Top-level module names from ``python -X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            names.add(name.split(".")[0])
    return names


def test_cold_cli_search_imports_only_what_it_needs(
    export_folder, random_checkpoint, model_cache, tmp_path
):
    from indexer.model.onnx_encoder import weights_identity
    from indexer.store.catalog import ImageRecord
    from indexer.store.library import Library

    rng = np.random.default_rng(0)
    with Library.open(tmp_path / "library", create=True) as library:
        library.bind_model(weights_identity(random_checkpoint, model_cache))
        vectors = rng.standard_normal((12, 512)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        records = [
            ImageRecord(f"/photos/{i}.jpg", 1, 1, f"{i:064x}", vectors[i], 64, 48, "JPEG")
            for i in range(12)
        ]
        library.index.add(np.asarray(library.catalog.commit_batch(records)), vectors)
        library.checkpoint()
    command = [sys.executable, "-X", "importtime", "-m", "retrieval.cli", "search", "a dog",
               "--library", str(tmp_path / "library"), "--weights", str(random_checkpoint),
               "-k", "3"]  # fmt: skip
    env = {**os.environ, "CLIPDEX_CACHE": str(model_cache)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "/photos/" in done.stdout
    imported = imported_modules(done.stderr)
    assert "onnxruntime" in imported and "indexer" in imported  # the output is what we think
    assert imported.isdisjoint(NEVER_IMPORTED), sorted(imported & set(NEVER_IMPORTED))
