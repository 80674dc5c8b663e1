"""Text in photos at indexing time: a CLIP gate decides which photos to read, then OCR.

Reading text costs ~0.3-1 s a photo on a CPU, far more than encoding it, and most photos
of most libraries hold no text. So ``--ocr auto`` (the default) reads only the photos whose
image vector, just computed, says text is likely: the vector is compared with a few prompts
describing text (:data:`TEXT_PROMPTS`: documents, screenshots, signs, receipts...) and a few
describing photos without text (:data:`OTHER_PROMPTS`); the softmax mass on the text prompts
(CLIP's logit scale) is the text likelihood, and a photo at or above the threshold
(:data:`DEFAULT_THRESHOLD`) is read. The prompt vectors are computed once per model and
cached in the library's label cache, like the classify labels. ``always`` reads every photo,
``never`` none. A landscape library thus pays one (512 x 14) matrix product per batch.

The threshold is chosen for recall: with equally many text and non-text prompts a photo
the model cannot place sits near 0.5, a photo of a landscape near 0 and a document near 1;
0.2 reads anything the model gives a fair chance of holding text. It was not calibrated
against real MobileCLIP-S2 weights here (none can be downloaded on the build machines):
``bench/bench_ocr.py`` prints the gate's miss rate and read fraction when run with
``CLIPDEX_WEIGHTS`` set, which is how to check or tune it (``--ocr-threshold``).

The recognised lines are stored as one ``ocr`` text per photo with their mean confidence
(see :mod:`indexer.store.textindex`); a renamed or copied photo reuses them by content hash
and is not read again. Videos are not read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.errors import ClipdexError, ConfigError
from indexer.ingest import objectstore
from indexer.ingest.decode import DEFAULT_MAX_MEGAPIXELS, open_rgb
from indexer.model.identity import Encoder
from indexer.model.ocr import OcrEngine, OcrUnavailable, TextLine, shared_engine
from indexer.store.textindex import OCR

MODES = ("auto", "always", "never")
DEFAULT_MODE = "auto"
DEFAULT_THRESHOLD = 0.2
TEXT_PROMPTS = (
    "a photo of a document",
    "a screenshot",
    "a sign with text",
    "a receipt",
    "a page of printed text",
    "a poster with words",
    "a presentation slide",
)
OTHER_PROMPTS = (
    "a photo of a landscape",
    "a photo of a person",
    "a photo of an animal",
    "a photo of food",
    "a photo of a building",
    "a photo of a plant",
    "a photo of an object",
)
_LETTER_DIGIT = re.compile(r"(?<=[^\W\d_])(?=\d)|(?<=\d)(?=[^\W\d_])")


def check_mode(mode: str | None) -> str:
    """``mode`` if it is one of :data:`MODES` (None: the default), else a ConfigError."""
    if mode is None:
        return DEFAULT_MODE
    if mode not in MODES:
        raise ConfigError(f"--ocr must be one of {', '.join(MODES)}, not {mode!r}", setting="ocr")
    return mode


def check_threshold(threshold: float) -> float:
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(
            f"--ocr-threshold must be between 0 and 1, not {threshold}", setting="ocr_threshold"
        )
    return float(threshold)


class TextGate:
    """The text likelihood of image vectors: softmax mass on :data:`TEXT_PROMPTS`."""

    def __init__(self, encoder: Encoder, cache_dir: Path | None, threshold: float) -> None:
        self.encoder = encoder
        self.cache_dir = cache_dir
        self.threshold = threshold
        self._prompts: np.ndarray | None = None

    def prompt_vectors(self) -> np.ndarray:
        """(text + other prompts, dim) vectors: from the cache, else encoded once and cached."""
        if self._prompts is None:
            cached = self._cache_file()
            if cached is not None and cached.is_file():
                try:
                    self._prompts = np.load(cached)
                except (OSError, ValueError):
                    self._prompts = None
            if self._prompts is None:
                prompts = list(TEXT_PROMPTS + OTHER_PROMPTS)
                self._prompts = np.asarray(self.encoder.encode_texts(prompts), dtype=np.float32)
                _save_atomic(cached, self._prompts)
        return self._prompts

    def _cache_file(self) -> Path | None:
        if self.cache_dir is None:
            return None
        identity = getattr(self.encoder, "identity", None)
        key = json.dumps(
            [TEXT_PROMPTS, OTHER_PROMPTS, identity.to_json() if identity is not None else ""]
        )
        return Path(self.cache_dir) / f"ocr-gate-{hashlib.sha256(key.encode()).hexdigest()}.npy"

    def likelihood(self, vectors: np.ndarray) -> np.ndarray:
        """Per image vector, the probability mass on the text prompts (0..1)."""
        prompts = self.prompt_vectors()
        scale = float(getattr(self.encoder, "logit_scale", 100.0))
        logits = scale * (np.asarray(vectors, dtype=np.float32) @ prompts.T)
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return weights[:, : len(TEXT_PROMPTS)].sum(axis=1) / weights.sum(axis=1)

    def wants(self, vectors: np.ndarray) -> np.ndarray:
        """Which images to read: likelihood >= threshold."""
        return self.likelihood(vectors) >= self.threshold


@dataclass
class OcrStats:
    """What the OCR stage did in one run (for the index report and the bench)."""

    considered: int = 0  # photos the gate looked at (or all, with ``always``)
    read: int = 0  # photos OCR ran on
    with_text: int = 0  # photos where it found text
    seconds: float = 0.0  # time spent reading (decode for OCR + OCR)
    unavailable: str | None = None  # why OCR could not run at all in this installation
    failures: list[tuple[str, str]] = field(default_factory=list)


class OcrStage:
    """Reads the text of the photos the mode and the gate select, into their fields."""

    def __init__(
        self,
        mode: str,
        gate: TextGate | None,
        engine: OcrEngine | None = None,
        max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    ) -> None:
        self.mode = check_mode(mode)
        self.gate = gate
        self.engine = engine or shared_engine()
        self.max_megapixels = max_megapixels
        self.stats = OcrStats()

    def select(self, vectors: np.ndarray) -> np.ndarray:
        """Which of these image vectors' photos to read."""
        if self.mode == "never" or len(vectors) == 0:
            return np.zeros(len(vectors), dtype=bool)
        if self.mode == "always" or self.gate is None:
            return np.ones(len(vectors), dtype=bool)
        return self.gate.wants(vectors)

    def add_texts(self, paths: Sequence[str], fields: Sequence[dict], vectors: np.ndarray) -> None:
        """For each selected photo, read its text and add an ``ocr`` row to its fields."""
        if self.mode == "never":
            return
        chosen = self.select(vectors)
        self.stats.considered += len(paths)
        for path, item_fields, wanted in zip(paths, fields, chosen):
            if wanted and self.mode != "never":  # "never" also once OCR proved unavailable
                row = self.read(path)
                if row is not None:
                    item_fields["texts"] = [*item_fields.get("texts", ()), row]

    def read(self, path: str) -> tuple[str, str, float] | None:
        """The (``ocr``, text, mean confidence) row of one photo file, or None (no text).

        A photo that cannot be read for OCR loses only its OCR text (noted in the stats):
        it was decoded once already, so this is rare (a file changed meanwhile).
        """
        started = time.monotonic()
        self.stats.read += 1
        try:
            # A photo in object storage (s3://) is fetched again: its bytes are not kept.
            source = objectstore.read_bytes(path) if objectstore.is_uri(path) else path
            image, _info = open_rgb(
                source, max_megapixels=self.max_megapixels, draft=False, name=path
            )
            lines = self.engine.read(np.asarray(image))
        except OcrUnavailable as exc:  # said once; the rest of the run reads no text
            self.mode = "never"
            self.stats.unavailable = str(exc)
            return None
        except ClipdexError as exc:
            self.stats.failures.append((path, str(exc)))
            return None
        except Exception as exc:  # OCR must never fail indexing
            self.stats.failures.append((path, f"{type(exc).__name__}: {exc}"))
            return None
        finally:
            self.stats.seconds += time.monotonic() - started
        row = ocr_row(lines)
        if row is not None:
            self.stats.with_text += 1
        return row


def ocr_row(lines: Sequence[TextLine]) -> tuple[str, str, float] | None:
    """Recognised lines as one stored text (letters and digits that OCR glued together,
    as in "TOTAL12.50", split apart) with their mean confidence; None without lines."""
    texts = [_LETTER_DIGIT.sub(" ", line.text) for line in lines if line.text.strip()]
    if not texts:
        return None
    confidence = float(np.mean([line.confidence for line in lines]))
    return OCR, "\n".join(texts), round(confidence, 4)


def make_stage(
    mode: str,
    encoder: Encoder,
    cache_dir: Path | None,
    threshold: float = DEFAULT_THRESHOLD,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
) -> OcrStage:
    """The OCR stage for an index run (``never``: one that does nothing, loads nothing)."""
    gate = TextGate(encoder, cache_dir, check_threshold(threshold)) if mode == "auto" else None
    return OcrStage(mode, gate, max_megapixels=max_megapixels)


def _save_atomic(path: Path | None, array: np.ndarray) -> None:
    """Write a cache file whole or not at all; failures are ignored (it is only a cache)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    except OSError:
        return
