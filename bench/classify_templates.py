"""How much do fewer prompt templates change the top labels? (the evidence for the default)

Encodes every (default label, template) prompt of the *old* seven-template ensemble once,
embeds the photos of the shared corpus, and compares, per photo, the top-k labels of the
full seven-template ensemble with those of every subset of one to three templates:
top-1 agreement, mean top-k overlap, and mean |p - p7| of the seven-template top label.

The weights are the spread test checkpoint (tests/spread.py: the real MobileCLIP-S2
architecture, a random trunk, centred projection heads) unless ``--weights`` names the real
ones. What that can show: how much the choice of template words perturbs the label
ranking *of this architecture* — whether dropping templates moves the top labels a little
or a lot. What it cannot show: whether a template helps or hurts *accuracy*; untrained
weights have no notion of "cat", so a meaning-level comparison needs the real weights.

Usage: ``python bench/classify_templates.py [--weights FILE] [--corpus DIR] [--top 5]
[--workdir DIR]`` (the prompt vectors are cached in the work folder: a rerun is quick).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from retrieval.search.classify import ENSEMBLE_TEMPLATES as OLD_TEMPLATES  # noqa: E402 - the old default

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif"}


def spread_weights(workdir: Path) -> Path:
    """The tests' spread checkpoint, written once into the work folder."""
    from tests.spread import write_spread_checkpoint

    path = workdir / "mobileclip_s2_spread.pt"
    return path if path.exists() else write_spread_checkpoint(path)


def prompt_vectors(encoder, labels, workdir: Path, tag: str) -> np.ndarray:
    """(templates, labels, dim) unit vectors of every prompt, cached in the work folder."""
    from indexer.model.identity import l2_normalise

    cache = workdir / f"prompts-{tag}.npy"
    if cache.exists():
        return np.load(cache)
    prompts = [t.replace("{}", label) for t in OLD_TEMPLATES for label in labels]
    started, parts = time.monotonic(), []
    for i in range(0, len(prompts), 128):
        parts.append(encoder.encode_texts(prompts[i : i + 128]))
        print(f"  encoded {i + len(parts[-1])}/{len(prompts)} prompts", file=sys.stderr)
    print(f"  {len(prompts)} prompts in {time.monotonic() - started:.0f}s", file=sys.stderr)
    out = l2_normalise(np.vstack(parts)).reshape(len(OLD_TEMPLATES), len(labels), -1)
    np.save(cache, out)
    return out


def corpus_vectors(encoder, corpus: Path) -> np.ndarray:
    """Unit vectors of the corpus photos the decoder accepts."""
    from retrieval.search.engine import embed_image

    vectors = []
    for path in sorted(p for p in corpus.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            vectors.append(embed_image(encoder, path))
        except Exception as exc:  # a measurement: skip what does not decode, say so
            print(f"  skipped {path.name}: {exc}", file=sys.stderr)
    return np.stack(vectors)


def label_matrix(per_template: np.ndarray, subset: tuple[int, ...]) -> np.ndarray:
    """The re-normalised mean over the chosen templates (as classify.label_vectors)."""
    mean = per_template[list(subset)].mean(axis=0)
    return mean / np.linalg.norm(mean, axis=1, keepdims=True)


def compare(images, per_template, subset, reference, scale: float, top: int) -> dict:
    """Agreement of ``subset``'s top labels with the reference ensemble's, per photo."""
    from retrieval.search.classify import probabilities

    probs = probabilities(images, label_matrix(per_template, subset), scale)
    ref_top = np.argsort(-reference, axis=1)[:, :top]
    sub_top = np.argsort(-probs, axis=1)[:, :top]
    rows = np.arange(len(images))
    return {
        "top1": float(np.mean(ref_top[:, 0] == sub_top[:, 0])),
        "overlap": float(np.mean([len(set(a) & set(b)) / top for a, b in zip(ref_top, sub_top)])),
        "top1_in_top": float(np.mean([s[0] in r for s, r in zip(sub_top, ref_top)])),
        "dp": float(np.mean(np.abs(probs[rows, ref_top[:, 0]] - reference[rows, ref_top[:, 0]]))),
    }


def main() -> None:
    from indexer.model.encoders import load_encoder
    from retrieval.search.classify import DEFAULT_LABELS_FILE, probabilities, read_labels_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path, help="a checkpoint (default: the spread one)")
    ap.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "imgcorpus" / "photos")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/clipdex-classify-templates"))
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    weights = args.weights or spread_weights(args.workdir)
    encoder = load_encoder(weights, "cpu", args.backend, cache_dir=args.workdir / "cache")
    labels = read_labels_file(DEFAULT_LABELS_FILE)
    per_template = prompt_vectors(encoder, labels, args.workdir, weights.stem)
    images = corpus_vectors(encoder, args.corpus)
    scale = encoder.logit_scale
    full = tuple(range(len(OLD_TEMPLATES)))
    reference = probabilities(images, label_matrix(per_template, full), scale)
    spread = reference.max(axis=1)
    print(f"weights {weights.name}; {len(images)} photos, {len(labels)} labels, top-{args.top}")
    print(
        f"7-template top-1 probability: median {np.median(spread):.3f} (1/labels = "
        f"{1 / len(labels):.4f}); cos between a label's templates: "
        f"{_within(per_template):.3f}, between labels: {_between(per_template):.3f}"
    )
    print(f"chance level of the top-{args.top} overlap: {args.top / len(labels):.3f}")
    print(f"{'templates':56s} top1  top1-in-top{args.top}  top{args.top}-overlap  mean|dp|")
    for size in (1, 2, 3):
        scored = [
            (s, compare(images, per_template, s, reference, scale, args.top))
            for s in itertools.combinations(full, size)
        ]
        scored.sort(key=lambda item: (-item[1]["overlap"], -item[1]["top1"]))
        shown = scored[:3] + ([scored[-1]] if len(scored) > 3 else [])
        shown += [item for item in scored if item[0] in ((0,), (0, 1)) and item not in shown]
        for subset, m in shown:
            name = " | ".join(OLD_TEMPLATES[i] for i in subset)
            print(
                f"{name[:56]:56s} {m['top1']:.2f}  {m['top1_in_top']:.2f}          "
                f"{m['overlap']:.2f}          {m['dp']:.4f}"
            )
        mean_overlap = np.mean([m["overlap"] for _, m in scored])
        print(
            f"{'  (mean over all ' + str(len(scored)) + ' subsets of ' + str(size) + ')':60s}"
            f"       {mean_overlap:.2f}"
        )


def _within(per_template: np.ndarray) -> float:
    """Mean cosine between two templates' vectors of the same label."""
    t = per_template.shape[0]
    return float(
        np.mean(
            [
                np.sum(per_template[i] * per_template[j], axis=1).mean()
                for i in range(t)
                for j in range(i + 1, t)
            ]
        )
    )


def _between(per_template: np.ndarray) -> float:
    """Mean cosine between different labels under the first template."""
    first = per_template[0]
    gram = first @ first.T
    n = len(first)
    return float((gram.sum() - np.trace(gram)) / (n * (n - 1)))


if __name__ == "__main__":
    main()
