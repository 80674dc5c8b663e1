"""Video sampling: frames encoded and seconds spent per video minute, scene change against
"one frame per second" and "one frame per video", on the same clips in one run.

Clips are written here with PyAV from the corpus photos (tests/videogen.py), one scene per
photo with known cut times and a slow pan within each scene: a 3 s clip (one scene), a 20 s
phone clip (4 scenes) and a 2-minute video (12 scenes of 4-16 s, long enough to be probed
by keyframe seeking). For each clip and each way of choosing frames the script measures,
in the same run:

- frames encoded, per video minute;
- seconds to choose and decode the frames (PyAV) and to encode them (the model), per
  video minute: what indexing the clip costs beyond reading and hashing it;
- moments found: for every scene, the scene's photo is the query (embedded once, untimed)
  and counts as found when the clip's best-scoring frame lies inside that scene.

The model is MobileCLIP-S2 (torch, CPU) with random "spread" weights (tests/spread.py):
the real architecture and cost, with embeddings that depend on the picture (or the real
weights with --weights). The machine is shared: read the same-run ratios.

Usage: ``python bench/bench_video.py [--long 120] [--weights FILE] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from indexer.ingest.decode import to_model_input  # noqa: E402
from indexer.ingest.video import Sampling, frame_at, sample_video  # noqa: E402
from tests.conftest import corpus_dir  # noqa: E402
from tests.videogen import scene_image, write_video  # noqa: E402

SIZE = (640, 360)


@dataclass
class Clip:
    name: str
    path: Path
    photos: list[Path]
    starts: list[float]
    duration: float


STRATEGIES = {
    "scene change (default)": Sampling(),
    "one frame per second": Sampling(
        min_spacing=1.0,
        max_spacing=1.0,
        threshold=2.0,  # never a "change": one frame each second, as a fixed-rate sampler
        max_frames=1_000_000,
        probes=1_000_000,
        sequential_pixels=1e18,
        seconds=3600,
    ),
    "one frame per video": None,  # the first frame, as a single-thumbnail indexer does
}


def make_clips(work: Path, long_seconds: float) -> list[Clip]:
    corpus = corpus_dir()
    if corpus is None:
        raise SystemExit("the image corpus is absent: set CLIPDEX_CORPUS to shared/imgcorpus")
    photos = sorted((corpus / "photos" / "debian-plasma").glob("*.jpg"))
    photos += sorted((corpus / "photos" / "debian-mate").glob("*.jpg"))
    rng = np.random.default_rng(0)
    lengths = rng.uniform(5, 25, 12)
    lengths *= long_seconds / lengths.sum()
    plans = [
        ("short (3 s)", photos[:1], [3.0], 30, 30),
        ("phone (20 s)", photos[1:5], [5.0] * 4, 30, 30),
        (f"long ({long_seconds:.0f} s)", photos[5:17], list(lengths), 25, 50),
    ]
    clips = []
    for i, (name, scenes, seconds, fps, gop) in enumerate(plans):
        path = work / f"clip{i}.mp4"
        starts = write_video(path, scenes, seconds, size=SIZE, fps=fps, gop=gop, noise=0, pan=1)
        clips.append(Clip(name, path, scenes, starts, float(sum(seconds))))
    return clips


def first_frame(path: Path) -> tuple[np.ndarray, list[float]]:
    return to_model_input(frame_at(path, 0.0))[None], [0.0]


def run(clip: Clip, strategy: Sampling | None, encoder, queries: np.ndarray) -> dict:
    started = time.perf_counter()
    if strategy is None:
        pixels, times = first_frame(clip.path)
    else:
        video = sample_video(clip.path, strategy)
        pixels, times = video.pixels, video.times
    chosen = time.perf_counter()
    vectors = np.vstack(
        [encoder.encode_images(pixels[i : i + 16]) for i in range(0, len(pixels), 16)]
    )
    encoded = time.perf_counter()
    found = 0
    for scene, query in enumerate(queries):
        best = times[int(np.argmax(vectors @ query))]
        end = clip.starts[scene + 1] if scene + 1 < len(clip.starts) else clip.duration
        found += clip.starts[scene] - 1e-6 <= best < end
    return {
        "frames": len(times),
        "decode_s": chosen - started,
        "encode_s": encoded - chosen,
        "found": found,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", type=float, default=120.0, help="Seconds of the long clip.")
    parser.add_argument("--weights", type=Path, help="A MobileCLIP-S2 checkpoint.")
    parser.add_argument("--workdir", type=Path, help="Where clips are written (default: tmp).")
    args = parser.parse_args()
    from indexer.model.encoders import load_encoder
    from tests.spread import write_spread_checkpoint

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        weights = args.weights or write_spread_checkpoint(work / "spread.pt")
        encoder = load_encoder(weights, "cpu", "torch")
        made = time.perf_counter()
        clips = make_clips(work, args.long)
        print(f"clips written in {time.perf_counter() - made:.1f} s (untimed below)", flush=True)
        rows = []
        print(
            f"\n{'clip':<16} {'frames chosen by':<24} {'frames':>6} {'fr/min':>7} "
            f"{'decode s/min':>12} {'encode s/min':>12} {'total s/min':>11} {'moments':>8}"
        )
        for clip in clips:
            photos = np.stack([to_model_input(scene_image(p, SIZE)) for p in clip.photos])
            queries = encoder.encode_images(photos)
            for name, strategy in STRATEGIES.items():
                result = run(clip, strategy, encoder, queries)
                rows.append((clip, name, result))
                print_row(clip, name, result)
        report(rows)


def print_row(clip: Clip, name: str, r: dict) -> None:
    minutes = clip.duration / 60
    total = r["decode_s"] + r["encode_s"]
    print(
        f"{clip.name:<16} {name:<24} {r['frames']:>6} {r['frames'] / minutes:>7.1f} "
        f"{r['decode_s'] / minutes:>12.2f} {r['encode_s'] / minutes:>12.2f} "
        f"{total / minutes:>11.2f} {r['found']:>4}/{len(clip.starts):<3}",
        flush=True,
    )


def report(rows) -> None:
    totals: dict[str, list[float]] = {}
    for clip, name, r in rows:
        total = r["decode_s"] + r["encode_s"]
        sums = totals.setdefault(name, [0.0, 0.0, 0.0, 0.0, 0.0])
        for i, value in enumerate(
            (r["frames"], total, clip.duration, r["found"], len(clip.starts))
        ):
            sums[i] += value
    print("\nall clips together:")
    base = totals["scene change (default)"]
    for name, (frames, seconds, duration, found, scenes) in totals.items():
        minutes = duration / 60
        print(
            f"  {name:<24} {frames / minutes:6.1f} frames/min  {seconds / minutes:6.2f} s/min "
            f"(x{seconds / base[1]:.2f} the scene sampler's time)  moments found "
            f"{found:.0f}/{scenes:.0f}"
        )


if __name__ == "__main__":
    main()
