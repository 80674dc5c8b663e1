"""Shared fixtures: isolated library dirs, a fake encoder, random-weights checkpoints.

The MobileCLIP-S2 checkpoints are the real architecture saved once per session and loaded
through the product's real ``--weights`` path (shared/DESIGN.md); ``spread_checkpoint``
(centred projection heads) is the one for tests that rank. A fake,
deterministic encoder stands in where the model is not what a test is about.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from indexer.model.identity import EMBED_DIM, ModelIdentity, l2_normalise

REPO = Path(__file__).resolve().parents[1]


def corpus_dir() -> Path | None:
    """The shared image corpus (CLIPDEX_CORPUS, or ../shared/imgcorpus beside the repo)."""
    candidates = [os.environ.get("CLIPDEX_CORPUS"), REPO.parent / "shared" / "imgcorpus"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "MANIFEST.tsv").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def corpus() -> Path:
    found = corpus_dir()
    if found is None:
        pytest.skip("image corpus absent: set CLIPDEX_CORPUS to shared/imgcorpus to run this")
    return found


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One ONNX export cache for the whole session (an export costs ~15 s)."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory, monkeypatch, model_cache):
    """No test ever touches the user's real library, settings or model cache."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("CLIPDEX_CACHE", str(model_cache))
    monkeypatch.setenv("CLIPDEX_LIBRARY", str(home / "library"))
    monkeypatch.delenv("CLIPDEX_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # `clipdex index` would then encode the default labels (a minute with real-size models);
    # the tests of that step turn it back on.
    monkeypatch.setenv("CLIPDEX_PREPARE_LABELS", "0")
    # Reading text (OCR) costs ~0.5 s a photo, and with test models the gate is noise: off
    # by default in tests (in-process runs and spawned CLIs/servers); the OCR tests ask for it.
    monkeypatch.setenv("CLIPDEX_OCR", "never")
    monkeypatch.setattr("indexer.ingest.ocr.DEFAULT_MODE", "never")
    monkeypatch.setenv("XDG_DATA_HOME", str(home / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))


class FakeEncoder:
    """Deterministic stand-in: images by a fixed projection of pooled pixels, texts by hash.

    It counts calls so tests can assert that the model was (not) run.
    """

    backend = "fake"

    def __init__(self, weights: str = "fake") -> None:
        self.identity = ModelIdentity(weights=weights)
        self.logit_scale = 100.0
        rng = np.random.default_rng(0)
        self.projection = rng.standard_normal((3 * 16 * 16, EMBED_DIM)).astype(np.float32)
        self.images_encoded = 0
        self.texts_encoded = 0

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        self.images_encoded += len(batch)
        pooled = batch.reshape(len(batch), 3, 16, 16, 16, 16).mean(axis=(3, 5))
        pooled = pooled.reshape(len(batch), -1) - 0.5
        return l2_normalise(pooled @ self.projection)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        self.texts_encoded += len(texts)
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            rows.append(np.random.default_rng(seed).standard_normal(EMBED_DIM))
        return l2_normalise(np.asarray(rows))


@pytest.fixture
def fake_encoder() -> FakeEncoder:
    return FakeEncoder()


@pytest.fixture
def fake_model(monkeypatch, fake_encoder) -> FakeEncoder:
    """``load_encoder`` (how the CLI and Collection load a model) hands out ``fake_encoder``."""
    monkeypatch.setattr("indexer.model.encoders.load_encoder", lambda *a, **k: fake_encoder)
    return fake_encoder


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory) -> Path:
    """The real MobileCLIP-S2 architecture with plain random weights, saved once per session.

    Every input maps to nearly one direction with these (cosine ~0.99998): use
    ``spread_checkpoint`` for anything that ranks or compares embeddings.
    """
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("MobileCLIP-S2", pretrained=None)
    path = tmp_path_factory.mktemp("weights") / "mobileclip_s2_random.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def spread_checkpoint(tmp_path_factory) -> Path:
    """The real MobileCLIP-S2 architecture, random trunk, projection heads centred so that
    embeddings depend on the input (tests/spread.py), saved once per session.

    Load it through the product's ``--weights`` path like any checkpoint. Unrelated photos
    score far apart and a resized copy stays near its original, so a ranking test is decided
    by the images, not by float noise (tests/test_spread.py measures it).
    """
    pytest.importorskip("torch")
    pytest.importorskip("open_clip")
    from tests.spread import write_spread_checkpoint

    return write_spread_checkpoint(tmp_path_factory.mktemp("weights") / "mobileclip_s2_spread.pt")


@pytest.fixture
def photo_folder(tmp_path) -> Path:
    """A folder of small generated photos (distinct colours and shapes)."""
    from PIL import Image, ImageDraw

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        image = Image.new(
            "RGB", (320 + 10 * i, 240), tuple(int(c) for c in rng.integers(0, 255, 3))
        )
        draw = ImageDraw.Draw(image)
        draw.ellipse(
            (20 * i, 30, 120 + 20 * i, 200), fill=tuple(int(c) for c in rng.integers(0, 255, 3))
        )
        image.save(folder / f"photo_{i}.jpg", quality=92)
    return folder


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target
