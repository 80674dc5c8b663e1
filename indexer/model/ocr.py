"""Reading text in photos: PP-OCR (detection, orientation, recognition) through RapidOCR.

The only module that imports ``rapidocr_onnxruntime``. That package ships its three ONNX
models (PP-OCRv4 detection and recognition, the mobile direction classifier) inside the
wheel and runs them on the ONNX Runtime clipdex already uses, so reading text needs no
network, ever. The recogniser reads Latin script and Chinese (its dictionary); accents
come back as the base letter more often than not.

Cost per photo is bounded whatever the photo holds: the image is scaled to at most
:data:`MAX_SIDE` pixels on its long side (a photo whose short side would then be under
:data:`MIN_SIDE`, such as a 1 x 10,000 strip, has nothing readable and is skipped), the
detector keeps at most :data:`MAX_CANDIDATES` regions, at most :data:`MAX_BOXES` of them
(the largest) and at most :data:`MAX_UNITS` of line width (in line heights) are recognised,
and recognition stops at a time budget (:data:`SECONDS`) between batches.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from indexer.errors import ConfigError

MAX_SIDE = 1280  # long side the detector sees
MIN_SIDE = 16  # a short side below this after scaling: nothing readable
MAX_CANDIDATES = 300  # detector regions considered (RapidOCR's default is 1000)
MAX_BOXES = 48  # regions recognised, largest first
REC_BATCH = 8  # regions recognised per model call, at most (the time is checked between)
# Recognition costs in proportion to a line's width over its height ("units", ~ characters):
MAX_UNITS = 1200  # per photo: a page of ~40 full lines; lines beyond are not read
BATCH_UNITS = 160  # per model call
MIN_CONFIDENCE = 0.5  # recognised lines below this are dropped
SECONDS = 8.0  # recognition stops starting new batches after this (detection included)
GLUED_LETTERS = 10  # a recognised token this long may be words whose spaces were lost
MAX_PIECES = 12  # word pieces a line is cut into, at most


class OcrUnavailable(ConfigError):
    """The OCR models cannot be loaded in this installation."""


@dataclass(frozen=True)
class TextLine:
    """One recognised line and the recogniser's confidence (0..1)."""

    text: str
    confidence: float


class OcrEngine:
    """RapidOCR's models, loaded once on first use (~0.5 s), thread-safe by a lock."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self._ocr = None
        self._lock = threading.Lock()

    def _engine(self):
        if self._ocr is None:
            try:
                from rapidocr_onnxruntime import RapidOCR

                ocr = RapidOCR(
                    intra_op_num_threads=self.threads,
                    inter_op_num_threads=1,
                    print_verbose=False,
                )
            except Exception as exc:  # e.g. OpenCV without its libGL.so.1: a broken install
                raise OcrUnavailable(
                    f"text in photos cannot be read here ({type(exc).__name__}: {exc}): "
                    "reinstall rapidocr-onnxruntime and OpenCV's system libraries (libGL), "
                    "or index with --ocr never",
                    setting="ocr",
                ) from exc
            ocr.text_det.postprocess_op.max_candidates = MAX_CANDIDATES
            self._ocr = ocr
        return self._ocr

    def read(self, rgb: np.ndarray, seconds: float = SECONDS) -> list[TextLine]:
        """The text lines in an RGB uint8 image (H, W, 3), in reading order; [] if none."""
        image = _bounded(rgb)
        if image is None:
            return []
        with self._lock:
            return self._read(self._engine(), image, time.monotonic() + seconds)

    @staticmethod
    def _read(ocr, image: np.ndarray, deadline: float) -> list[TextLine]:
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        boxes, _elapsed = ocr.text_det(bgr)
        if boxes is None or len(boxes) == 0:
            return []
        boxes = _largest(list(boxes), MAX_BOXES)
        boxes = list(ocr.sorted_boxes(np.asarray(boxes)))  # reading order
        crops = ocr.get_crop_img_list(bgr, boxes)
        lines: list[TextLine] = []
        for crops_batch in _batches(crops):
            if time.monotonic() > deadline:
                break
            batch, _cls, _elapsed = ocr.text_cls(crops_batch)
            results, _elapsed = ocr.text_rec(batch)
            for crop, (text, score) in zip(batch, (r[:2] for r in results)):
                text = " ".join(str(text).split())
                if text and float(score) >= MIN_CONFIDENCE:
                    if time.monotonic() <= deadline:
                        text = _respace(ocr, crop, text)
                    lines.append(TextLine(text, float(score)))
        return lines


@functools.lru_cache(maxsize=1)
def shared_engine() -> OcrEngine:
    """One engine per process (its models load once, on first use), shared by index runs."""
    return OcrEngine()


def _units(crop: np.ndarray) -> float:
    return crop.shape[1] / max(1, crop.shape[0])


def _batches(crops: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Crops in model calls of at most REC_BATCH crops / BATCH_UNITS units, in order, up to
    MAX_UNITS in all (the rest are not read)."""
    batches: list[list[np.ndarray]] = []
    current: list[np.ndarray] = []
    batch_units = total = 0.0
    for crop in crops:
        units = _units(crop)
        total += units
        if total > MAX_UNITS:
            break
        if current and (len(current) >= REC_BATCH or batch_units + units > BATCH_UNITS):
            batches.append(current)
            current, batch_units = [], 0.0
        current.append(crop)
        batch_units += units
    if current:
        batches.append(current)
    return batches


def _respace(ocr, crop: np.ndarray, text: str) -> str:
    """``text`` with the spaces the recogniser dropped put back, where it can tell.

    PP-OCR's recogniser (trained mostly on Chinese, which has no spaces) often reads a line
    of small words as one token ("pharmacywinterstation"). When a token is that long, the
    line image is cut at its widest ink-free gaps (:func:`_word_cuts`), the pieces are read
    one by one, and their reading is taken when it spells the same letters; the glued token
    is kept beside it (a long real word that was cut stays findable).
    """
    glued = [t for t in text.split() if len(t) >= GLUED_LETTERS and t.isalpha()]
    if not glued:
        return text
    cuts = _word_cuts(crop)
    if not cuts:
        return text
    edges = [0, *cuts, crop.shape[1]]
    pieces = [crop[:, a:b] for a, b in itertools.pairwise(edges) if b - a > 2]
    results, _elapsed = ocr.text_rec(pieces)
    respaced = " ".join(" ".join(str(r[0]).split()) for r in results)
    if _letters(respaced) != _letters(text):
        return text
    return " ".join([respaced, *glued])


def _letters(text: str) -> str:
    return "".join(ch for ch in text.casefold() if ch.isalnum())


def _word_cuts(crop: np.ndarray) -> list[int]:
    """Columns at the middle of the gaps between words of a one-line crop (BGR).

    Ink by Otsu's threshold (the minority class is the ink, so light-on-dark signs work);
    a gap is a word gap when it is at least a fifth of the line's height and 1.6 times the
    median gap between letters. At most :data:`MAX_PIECES` - 1 cuts, the widest.
    """
    import cv2  # RapidOCR's own dependency (opencv-python)

    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    _threshold, binary = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    ink = binary > 0
    if ink.mean() > 0.5:
        ink = ~ink
    columns = ink.any(axis=0)
    gaps, start = [], None
    for x, has_ink in enumerate(columns):
        if not has_ink and start is None:
            start = x
        elif has_ink and start is not None:
            if start > 0:  # not the margin before the first letter
                gaps.append((start, x))
            start = None
    if len(gaps) < 2:
        return []
    widths = np.asarray([b - a for a, b in gaps])
    bar = max(0.2 * crop.shape[0], 1.6 * float(np.median(widths)))
    wide = [gaps[i] for i in np.argsort(-widths)[: MAX_PIECES - 1] if widths[i] >= bar]
    return sorted((a + b) // 2 for a, b in wide)


def _bounded(rgb: np.ndarray) -> np.ndarray | None:
    """The image scaled to at most MAX_SIDE on its long side; None when too thin to read."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.size == 0:
        return None
    height, width = rgb.shape[:2]
    scale = min(1.0, MAX_SIDE / max(height, width))
    if min(height, width) * scale < MIN_SIDE:
        return None
    if scale < 1.0:
        import cv2  # RapidOCR's own dependency (opencv-python)

        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def _largest(boxes: list[np.ndarray], count: int) -> list[np.ndarray]:
    """The ``count`` boxes of largest area (4-point polygons)."""
    if len(boxes) <= count:
        return boxes
    areas = [_area(b) for b in boxes]
    keep = sorted(range(len(boxes)), key=lambda i: -areas[i])[:count]
    return [boxes[i] for i in sorted(keep)]


def _area(box: np.ndarray) -> float:
    x, y = np.asarray(box, dtype=np.float64)[:, 0], np.asarray(box, dtype=np.float64)[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
