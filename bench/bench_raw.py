"""Camera RAW: the embedded-preview path against demosaicing, side by side in one run.

What clipdex does with a RAW (indexer/ingest/raw.py): decode the embedded JPEG preview when
it is large enough for the model, else demosaic at half size. This measures, on the same
files and in the same run:

- ``preview``: ``decode_for_model`` on a DNG carrying a 1620-pixel JPEG preview (what most
  cameras embed), i.e. the fast path;
- ``half demosaic``: ``decode_for_model`` on the same sensor data without a preview, i.e.
  the fallback (LibRaw ``half_size``);
- ``full demosaic``: LibRaw's full-resolution demosaic (AHD) plus the same preprocessing,
  for reference: what a RAW converter would do;

and the embedding cosine between the preview path and the half-size demosaic of each file
(plus, for scale, the cosine between unrelated photos). The DNGs are written here from the
corpus photos (``--corpus``, default ../shared/imgcorpus, else data/samples), upscaled to
``--megapixels`` (default 24, a common sensor), by tests/rawfakes.py.

The model is the random-trunk "spread" MobileCLIP-S2 (tests/spread.py) unless ``--weights``
names the real checkpoint. With random weights the cosine is only indicative: it shows
that both paths give nearly the same model input as seen by *a* MobileCLIP-S2, not that
the real model ranks them the same way. Timings are same-run ratios (the machine is shared).

Usage: ``python bench/bench_raw.py [--photos 4] [--megapixels 24] [--rounds 2]
[--weights FILE] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.ingest.decode import decode_for_model, to_model_input  # noqa: E402

PREVIEW_SIDE = 1620  # long side of a typical camera's embedded preview


def source_photos(corpus: Path | None, count: int) -> list[Path]:
    """Landscape photos from the corpus (else the shipped samples), the largest first."""
    from PIL import Image

    folders = [corpus / "photos"] if corpus and (corpus / "photos").is_dir() else []
    folders.append(REPO / "data" / "samples")
    found = [p for f in folders for p in sorted(f.rglob("*")) if p.suffix.lower() == ".jpg"]
    sized = []
    for path in found:
        with Image.open(path) as image:
            sized.append((image.width * image.height, path))
    return [path for _, path in sorted(sized, key=lambda s: -s[0])[:count]]


def make_dngs(photos: list[Path], folder: Path, megapixels: float) -> list[tuple[Path, Path]]:
    """(with preview, without preview) DNG pairs of the same sensor data, per photo."""
    from PIL import Image

    from tests.rawfakes import jpeg_bytes, write_dng

    pairs = []
    for index, path in enumerate(photos):
        with Image.open(path) as image:
            photo = image.convert("RGB")
        scale = (megapixels * 1e6 / (photo.width * photo.height)) ** 0.5
        sensor = photo.resize((round(photo.width * scale), round(photo.height * scale)))
        preview = jpeg_bytes(sensor, PREVIEW_SIDE)
        fast = write_dng(folder / f"shot{index}_preview.dng", sensor, preview=preview)
        slow = write_dng(folder / f"shot{index}_nopreview.dng", sensor)
        pairs.append((fast, slow))
    return pairs


def full_demosaic(path: Path) -> np.ndarray:
    """LibRaw's full-size demosaic, then the model's preprocessing."""
    import rawpy
    from PIL import Image

    with rawpy.imread(str(path)) as raw:
        rgb = raw.postprocess(use_camera_wb=True, output_bps=8)
    return to_model_input(Image.fromarray(rgb))


def timed(decode, files: list[Path], rounds: int) -> tuple[float, list[np.ndarray]]:
    """Median seconds per file over ``rounds`` passes, and the last pass's outputs."""
    per_round, outputs = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        outputs = [decode(path) for path in files]
        per_round.append((time.perf_counter() - start) / len(files))
    return statistics.median(per_round), outputs


def encoder_for(weights: Path | None, work: Path):
    from indexer.model.encoders import load_encoder

    if weights is None:
        from tests.spread import write_spread_checkpoint

        weights = write_spread_checkpoint(work / "spread.pt")
    return load_encoder(weights, device="cpu", backend="torch")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--megapixels", type=float, default=24.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "imgcorpus")
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-raw-") as tmp:
        work = Path(tmp)
        photos = source_photos(args.corpus, args.photos)
        print(f"writing {len(photos)} DNGs of {args.megapixels:g} MP (with / without preview)")
        pairs = make_dngs(photos, work, args.megapixels)
        fast_files, slow_files = [p for p, _ in pairs], [p for _, p in pairs]

        def model_input(path: Path) -> np.ndarray:
            return decode_for_model(str(path))[0]

        preview_s, preview_in = timed(model_input, fast_files, args.rounds)
        half_s, half_in = timed(model_input, slow_files, args.rounds)
        full_s, full_in = timed(full_demosaic, slow_files, 1)

        encoder = encoder_for(args.weights, work)
        fast_vec = encoder.encode_images(np.stack(preview_in))
        half_vec = encoder.encode_images(np.stack(half_in))
        full_vec = encoder.encode_images(np.stack(full_in))
    same_half = np.sum(fast_vec * half_vec, axis=1)
    same_full = np.sum(fast_vec * full_vec, axis=1)
    cross = fast_vec @ fast_vec.T
    unrelated = cross[~np.eye(len(cross), dtype=bool)]
    report = {
        "files": len(pairs),
        "megapixels": args.megapixels,
        "seconds_per_file": {
            "preview": preview_s,
            "half_demosaic": half_s,
            "full_demosaic": full_s,
        },
        "files_per_second": {
            "preview": 1 / preview_s,
            "half_demosaic": 1 / half_s,
            "full_demosaic": 1 / full_s,
        },
        "cosine_preview_vs_half": [float(c) for c in same_half],
        "cosine_preview_vs_full": [float(c) for c in same_full],
        "cosine_unrelated_max": float(unrelated.max()) if len(unrelated) else None,
        "weights": str(args.weights) if args.weights else "spread random (indicative only)",
    }
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def print_report(report: dict) -> None:
    rate = report["files_per_second"]
    print(f"\n{report['files']} RAWs of {report['megapixels']:g} MP, decode to model input:")
    for name in ("preview", "half_demosaic", "full_demosaic"):
        seconds = report["seconds_per_file"][name]
        print(f"  {name:14s} {rate[name]:7.2f} files/s  ({seconds * 1000:7.0f} ms per file)")
    print(
        f"  preview path is {rate['preview'] / rate['half_demosaic']:.1f}x the half-size "
        f"demosaic and {rate['preview'] / rate['full_demosaic']:.1f}x the full demosaic"
    )
    half, full = report["cosine_preview_vs_half"], report["cosine_preview_vs_full"]
    print(
        f"embedding cosine, preview vs half demosaic: min {min(half):.4f}, mean "
        f"{statistics.mean(half):.4f}; vs full demosaic: min {min(full):.4f}"
    )
    if report["cosine_unrelated_max"] is not None:
        print(f"  (for scale: unrelated photos at most {report['cosine_unrelated_max']:.4f})")
    print(f"  model: {report['weights']}")


if __name__ == "__main__":
    raise SystemExit(main())
