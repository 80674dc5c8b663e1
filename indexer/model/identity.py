"""What a model is, independent of the library that runs it (no torch import here).

An :class:`Encoder` turns preprocessed image tensors and texts into L2-normalised 512-d
vectors. :class:`ModelIdentity` says which model made a library's vectors, so a library
is never searched or extended with another one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

ARCHITECTURE = "MobileCLIP-S2"
DEFAULT_PRETRAINED = "datacompdr"
HF_REPO = "apple/MobileCLIP-S2-OpenCLIP"
HF_FILE = "open_clip_pytorch_model.bin"
EMBED_DIM = 512
CONTEXT_LENGTH = 77
# MobileCLIP's own preprocessing: not OpenAI's mean/std (see shared/DESIGN.md).
PREPROCESS = {
    "resize": "shortest",
    "size": 256,
    "interpolation": "bilinear",
    "crop": "center",
    "mean": [0.0, 0.0, 0.0],
    "std": [1.0, 1.0, 1.0],
}


@dataclass(frozen=True)
class ModelIdentity:
    """The facts that make two sets of vectors comparable."""

    architecture: str = ARCHITECTURE
    weights: str = DEFAULT_PRETRAINED  # a pretrained tag, or "sha256:<hex>" of a checkpoint
    dim: int = EMBED_DIM
    preprocess: dict = field(default_factory=lambda: dict(PREPROCESS))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelIdentity:
        return cls(**json.loads(text))

    @property
    def name(self) -> str:
        """Short display name, e.g. ``MobileCLIP-S2/datacompdr``."""
        weights = self.weights
        if weights.startswith("sha256:"):
            weights = weights[:19]
        return f"{self.architecture}/{weights}"


@runtime_checkable
class Encoder(Protocol):
    """Turns images and texts into L2-normalised vectors of the same space."""

    identity: ModelIdentity
    logit_scale: float

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, 256, 256) float32 in [0, 1] -> (N, dim) float32, unit norm."""
        ...

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """N strings -> (N, dim) float32, unit norm."""
        ...


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Row-wise unit vectors (zero rows stay zero) as contiguous float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def checkpoint_identity(path: str | os.PathLike) -> ModelIdentity:
    """Identity of a local checkpoint: its sha256 (memoised per path, size and mtime)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        _HASH_CACHE[key] = digest.hexdigest()
    return ModelIdentity(weights=f"sha256:{_HASH_CACHE[key]}")
