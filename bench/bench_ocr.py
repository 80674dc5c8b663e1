"""OCR at indexing time: seconds per 1,000 photos with and without the gate, its miss rate.

A library of ``--photos`` photos (default 60) of which ``--text-share`` (default 10%) carry
rendered text (tests/textphotos.py: signs, receipts, screenshots at several sizes, angles,
fonts and contrasts) and the rest none; backgrounds are the corpus's camera photos when it is
present (CLIPDEX_CORPUS or ../shared/imgcorpus), else synthetic ones. Measured in one run:

- *always*: every photo is read (decode for OCR + detection + recognition), as
  ``--ocr always`` does;
- *auto*: only the photos the gate selects are read, plus the gate's own cost (the prompt
  vectors once, one matrix product per photo). With ``CLIPDEX_WEIGHTS`` (the real
  MobileCLIP-S2) the gate decides from the photos' real vectors; without them the gate is
  noise, so its decision is SIMULATED from the known labels (a perfect gate: text photos
  read, the others not) and said so;
- the gate's miss rate on the rendered text photos and its read rate on the plain ones
  (real weights only: "needs real weights" otherwise);
- OCR's word recall on the rendered photos (share of drawn words found in the text read).

Figures are seconds per 1,000 photos, from the same run's measurements; the machine is
shared, so read the ratio. Usage: ``python bench/bench_ocr.py [--photos 60]
[--text-share 0.1] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_library(work: Path, photos: int, share: float) -> tuple[list, list[Path]]:
    """(text photos, plain photos) on disk (made untimed)."""
    from tests import textphotos as tp
    from tests.conftest import corpus_dir

    corpus = corpus_dir()
    backgrounds = sorted((corpus / "photos").rglob("*.jpg"))[:40] if corpus else []
    count = max(1, round(photos * share))
    made = tp.make_text_set(work / "text", count, backgrounds=backgrounds, seed=11)
    if backgrounds:  # real photos without text, resized like the text ones
        from PIL import Image

        plain = []
        (work / "plain").mkdir(parents=True, exist_ok=True)
        for i in range(photos - count):
            with Image.open(backgrounds[i % len(backgrounds)]) as image:
                path = work / "plain" / f"plain_{i:04d}.jpg"
                image.convert("RGB").resize((1024, 768)).save(path, quality=90)
            plain.append(path)
    else:
        plain = tp.make_plain_set(work / "plain", photos - count, seed=11)
    return made, plain


def read_all(stage, paths: list[Path]) -> tuple[float, list]:
    started = time.perf_counter()
    rows = [stage.read(str(p)) for p in paths]
    return time.perf_counter() - started, rows


def recall(made, rows) -> float:
    hits = total = 0
    for photo, row in zip(made, rows):
        words = {w.lower().strip(".,:;") for w in (row[1].split() if row else [])}
        hits += sum(w in words for w in photo.words)
        total += len(photo.words)
    return hits / total if total else 0.0


def real_encoder():
    weights = os.environ.get("CLIPDEX_WEIGHTS")
    if not weights:
        return None
    from indexer.model.encoders import load_encoder

    return load_encoder(Path(weights))


def gate_figures(encoder, made, plain, cache: Path) -> dict:
    """The real gate on the real vectors: (miss rate on text, read rate on plain, seconds)."""
    from indexer.ingest.decode import decode_for_model
    from indexer.ingest.ocr import DEFAULT_THRESHOLD, TextGate

    def vectors(paths):
        return encoder.encode_images(np.stack([decode_for_model(p.read_bytes())[0] for p in paths]))

    text, other = vectors([m.path for m in made]), vectors(plain)
    gate = TextGate(encoder, cache, DEFAULT_THRESHOLD)
    started = time.perf_counter()
    gate.prompt_vectors()
    wants_text, wants_plain = gate.wants(text), gate.wants(other)
    seconds = time.perf_counter() - started
    likely = gate.likelihood(np.vstack([text, other]))
    return {
        "miss": float(1 - wants_text.mean()),
        "plain_read": float(wants_plain.mean()),
        "gate_seconds": seconds,
        "wants_text": wants_text,
        "wants_plain": wants_plain,
        "likelihood_text": likely[: len(text)],
        "likelihood_plain": likely[len(text) :],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=60)
    parser.add_argument("--text-share", type=float, default=0.1)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    from indexer.ingest.ocr import OcrStage
    from indexer.model.ocr import shared_engine

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        made, plain = make_library(work, args.photos, args.text_share)
        n = len(made) + len(plain)
        stage = OcrStage("always", None)
        shared_engine().read(np.zeros((64, 64, 3), np.uint8))  # load the models (untimed)
        text_seconds, rows = read_all(stage, [m.path for m in made])
        plain_seconds, plain_rows = read_all(stage, plain)
        always = text_seconds + plain_seconds
        print(f"library: {n} photos, {len(made)} with rendered text ({len(made) / n:.0%})")
        print(
            f"OCR per photo: text {text_seconds / len(made):.2f} s, "
            f"plain {plain_seconds / max(1, len(plain)):.2f} s; "
            f"word recall on the text photos {recall(made, rows):.2f}; "
            f"plain photos with any text read: {sum(r is not None for r in plain_rows)}"
        )
        print(f"--ocr always: {1000 * always / n:8.1f} s per 1,000 photos")
        encoder = real_encoder()
        if encoder is None:
            auto = text_seconds  # a perfect gate: the text photos only (simulated)
            print(
                f"--ocr auto:   {1000 * auto / n:8.1f} s per 1,000 photos  (gate SIMULATED "
                "from the known labels: random weights, no real gate; set CLIPDEX_WEIGHTS)"
            )
            print(f"always / auto: {always / auto:.1f}x")
            print("gate miss rate on the rendered set: needs real weights (CLIPDEX_WEIGHTS)")
            return
        gate = gate_figures(encoder, made, plain, work / "cache")
        auto = gate["gate_seconds"]
        auto += text_seconds / len(made) * int(gate["wants_text"].sum())
        auto += plain_seconds / max(1, len(plain)) * int(gate["wants_plain"].sum())
        print(f"--ocr auto:   {1000 * auto / n:8.1f} s per 1,000 photos  (real gate)")
        print(f"always / auto: {always / auto:.1f}x")
        print(
            f"gate miss rate on the rendered set: {gate['miss']:.2f}; "
            f"plain photos read anyway: {gate['plain_read']:.2f}"
        )
        print(
            "text likelihood: text photos min/median "
            f"{gate['likelihood_text'].min():.2f}/{np.median(gate['likelihood_text']):.2f}, "
            f"plain photos median/max {np.median(gate['likelihood_plain']):.2f}/"
            f"{gate['likelihood_plain'].max():.2f}"
        )


if __name__ == "__main__":
    main()
