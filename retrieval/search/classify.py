"""Zero-shot classification and library tagging with the model's text tower.

A label is turned into a vector by a *prompt ensemble*: every template (``"a photo of a
{}."``, ...) is filled with the label and encoded, the unit vectors are averaged and the
mean re-normalised (Radford et al., CLIP §3.1.4: ensembling templates beats one prompt).
An image's probabilities over a label set are ``softmax(logit_scale * cos(image, label))``
with the model's own learned logit scale (~100 for CLIP models), which is what the model was
trained to calibrate; they sum to 1 over the label set, so they only compare labels *of that
set* ("cat" vs "dog"), and do not say that a photo shows either.

``DEFAULT_TEMPLATES`` is one prompt on purpose (every template multiplies the text-tower
work by the number of labels; see the measurement beside it); ``ENSEMBLE_TEMPLATES`` is the
seven-prompt ensemble. Override with ``--template`` (repeatable, each with one ``{}``).

Label vectors cost one text-tower pass per (label, template); they are cached in the
library folder (``label_vectors/<digest>.npy``, keyed by labels, templates and model), so a
second ``classify``/``tag`` with the same label set encodes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from indexer.errors import ConfigError
from indexer.model.identity import Encoder, ModelIdentity, l2_normalise
from indexer.store.library import Library
from retrieval.search.errors import QueryError
from retrieval.search.text import check_text

#: The seven-prompt ensemble that was the default until issue 14 (five of the templates
#: CLIP's authors selected for ImageNet plus the neutral "a photo of a/the {}."); pass
#: them as ``templates`` (``--template``, repeatable) for the ensemble.
ENSEMBLE_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a close-up photo of a {}.",
)
#: One template: a first classify over the 335 shipped labels encodes 335 prompts, not
#: 2,345 (7x less text-tower work; bench/bench_classify.py times it). CLIP's own default
#: prompt; its paper reports that ensembling many prompts adds a few points of ImageNet
#: top-1. Measured with bench/classify_templates.py on the shared corpus's 38 photos with
#: the spread test weights (tests/spread.py): against the 7-template ensemble's labels,
#: this template's top-1 is the ensemble's top-1 for 61% of the photos and within its
#: top-5 for 84%, the top-5 lists share 55% (chance: 1.5%); the best pair ("a photo of a
#: {}." + "a bad photo of the {}.") reaches 82%, 100% and 85% at twice the cost. What that
#: cannot show: those weights are untrained; their text tower is dominated by the template
#: words (a label's seven prompts: cosine 0.48; two labels under one template: 0.64) and
#: their probabilities are nearly flat (top-1 ~0.01), so any change of prompt reorders
#: near-ties; with trained weights a label's prompts are near-synonyms and the ranking
#: moves less. Rerun the script with ``--weights`` (the real checkpoint) to measure that.
DEFAULT_TEMPLATES = ("a photo of a {}.",)
# Shipped inside the package (wheels, Docker); data/labels.txt in a checkout points here.
DEFAULT_LABELS_FILE = Path(__file__).with_name("labels.txt")
MAX_LABELS = 5000
# Prompts per model call while computing label vectors: the first call takes FIRST_BATCH,
# then each call is sized from the last one's time per prompt to take about BATCH_SECONDS
# (1 to MAX_BATCH prompts): progress moves at least every second or so even on a slow,
# busy CPU (a fixed 16-prompt call took up to 6 s on the 2-core VM under load), a fast
# machine still makes large calls, and a server's queries wait for one short call at most.
FIRST_BATCH, MAX_BATCH, BATCH_SECONDS = 4, 128, 0.5
LABEL_BATCH = 16  # the server's threshold unit (see retrieval/server/labels.py)
ProgressCallback = Callable[[int, int], None]  # (done, total) prompts


@dataclass(frozen=True)
class LabelSet:
    """The labels to choose among and the prompt templates that describe each."""

    labels: tuple[str, ...]
    templates: tuple[str, ...] = DEFAULT_TEMPLATES

    def digest(self, identity: ModelIdentity, *extra: object) -> str:
        """A stable key for this label set with this model (and any extra settings)."""
        payload = json.dumps([self.labels, self.templates, identity.to_json(), *extra])
        return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class Prediction:
    label: str
    probability: float

    def as_dict(self) -> dict:
        return {"label": self.label, "probability": round(self.probability, 6)}


# -- label sets ---------------------------------------------------------------------------
def make_labelset(
    labels: str | Sequence[str] | None = None,
    labels_file: str | os.PathLike | None = None,
    templates: Sequence[str] = (),
) -> LabelSet:
    """A label set from ``--labels "a,b"`` (or a list of labels) or ``--labels-file``
    (default: data/labels.txt)."""
    if labels is not None and labels_file is not None:
        raise QueryError("give --labels or --labels-file, not both")
    if labels is not None:
        names = parse_labels(labels) if isinstance(labels, str) else _checked_labels(labels)
    else:
        names = read_labels_file(labels_file or DEFAULT_LABELS_FILE)
    return LabelSet(names, check_templates(templates) if templates else DEFAULT_TEMPLATES)


def parse_labels(text: str) -> tuple[str, ...]:
    """``"cat, dog,car"`` → ``("cat", "dog", "car")``: trimmed, de-duplicated, at least 2."""
    return _checked_labels(part for part in text.split(","))


def read_labels_file(path: str | os.PathLike) -> tuple[str, ...]:
    """One label per line; blank lines and ``#`` comments are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot read the labels file {path}: {reason}") from exc
    return _checked_labels(line for line in lines if not line.lstrip().startswith("#"))


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """Templates must each hold exactly one ``{}`` where the label goes."""
    out = tuple(dict.fromkeys(t.strip() for t in templates if t.strip()))
    for template in out:
        check_text(template, "a template")
        if template.count("{}") != 1:
            raise QueryError(f"the template {template!r} needs exactly one {{}} for the label")
    if not out:
        raise QueryError("--template is empty: give a prompt such as 'a photo of a {}.'")
    return out


def _checked_labels(parts: Iterable[str]) -> tuple[str, ...]:
    labels = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    for label in labels:
        check_text(label, "a label")
    if len(labels) < 2:
        raise QueryError("give at least two labels: probabilities compare labels with each other")
    if len(labels) > MAX_LABELS:
        raise QueryError(f"at most {MAX_LABELS} labels, got {len(labels)}")
    return labels


# -- vectors and probabilities ------------------------------------------------------------
def label_cache_file(identity: ModelIdentity, labelset: LabelSet, cache_dir: Path) -> Path:
    """Where the label vectors of ``labelset`` under model ``identity`` are cached."""
    return Path(cache_dir) / f"{labelset.digest(identity)}.npy"


def cached_label_vectors(
    identity: ModelIdentity, labelset: LabelSet, cache_dir: Path | None
) -> np.ndarray | None:
    """The cached (labels, dim) vectors, or None when they still need computing."""
    if cache_dir is None:
        return None
    try:
        vectors = np.load(label_cache_file(identity, labelset, cache_dir))
    except (OSError, ValueError):
        return None  # absent, or damaged: rebuilt by label_vectors
    if vectors.ndim != 2 or len(vectors) != len(labelset.labels):
        return None
    return vectors


def prompt_count(labelset: LabelSet) -> int:
    """How many prompts (text-tower passes) computing ``labelset``'s vectors costs."""
    return len(labelset.labels) * len(labelset.templates)


def label_vectors(
    encoder: Encoder,
    labelset: LabelSet,
    cache_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    batch: int | None = None,
) -> np.ndarray:
    """(labels, dim) unit vectors: the re-normalised mean of each label's prompt vectors.

    Cached in ``cache_dir`` when given. When they must be computed, the prompts are encoded
    ``batch`` at a time (None: sized to take about BATCH_SECONDS a call) and
    ``progress(done, total)`` (in prompts) is called with 0 before the first batch and after
    each one; an exception it raises stops the work there. When the vectors come from the
    cache, ``progress`` is never called.
    """
    cached = cached_label_vectors(encoder.identity, labelset, cache_dir)
    if cached is not None:
        return cached
    # replace, not str.format: other braces in a template stay literal instead of failing.
    prompts = [t.replace("{}", label) for label in labelset.labels for t in labelset.templates]
    parts: list[np.ndarray] = []
    if progress is not None:
        progress(0, len(prompts))
    size, done = max(1, batch or FIRST_BATCH), 0
    while done < len(prompts):
        chunk = prompts[done : done + size]
        started = time.monotonic()
        parts.append(encoder.encode_texts(chunk))
        done += len(chunk)
        if progress is not None:
            progress(done, len(prompts))
        if batch is None:
            per_prompt = max((time.monotonic() - started) / len(chunk), 1e-6)
            size = int(min(MAX_BATCH, max(1, BATCH_SECONDS / per_prompt)))
    per_label = np.vstack(parts).reshape(len(labelset.labels), len(labelset.templates), -1)
    vectors = l2_normalise(l2_normalise(per_label).mean(axis=1))
    if cache_dir is not None:
        _save_atomic(label_cache_file(encoder.identity, labelset, cache_dir), vectors)
    return vectors


def probabilities(
    image_vectors: np.ndarray, label_matrix: np.ndarray, logit_scale: float
) -> np.ndarray:
    """(images, labels) softmax of ``logit_scale * cosine``; each row sums to 1."""
    logits = float(logit_scale) * (np.atleast_2d(image_vectors) @ label_matrix.T)
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits.astype(np.float64))
    return weights / weights.sum(axis=1, keepdims=True)


def top_predictions(
    row: np.ndarray, labels: Sequence[str], top: int, min_probability: float = 0.0
) -> list[Prediction]:
    """The ``top`` most probable labels of one row, those at or above ``min_probability``."""
    order = np.argsort(-row, kind="stable")[:top]
    return [Prediction(labels[i], float(row[i])) for i in order if row[i] >= min_probability]


def classify_vector(
    vector: np.ndarray,
    encoder: Encoder,
    labelset: LabelSet,
    top: int = 5,
    cache_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    matrix: np.ndarray | None = None,
) -> list[Prediction]:
    """The ``top`` labels of one image vector with their probabilities, best first.
    ``matrix``: the label set's vectors when already at hand (else cached or computed)."""
    if top < 1:
        raise QueryError(f"--top must be at least 1, got {top}")
    if matrix is None:
        matrix = label_vectors(encoder, labelset, cache_dir, progress)
    row = probabilities(vector, matrix, encoder.logit_scale)[0]
    return top_predictions(row, labelset.labels, top)


# -- tagging the library ------------------------------------------------------------------
@dataclass
class TagReport:
    """What a `clipdex tag` run did."""

    tagged: int = 0
    already: int = 0
    labels: int = 0
    seconds: float = 0.0
    top_labels: list[tuple[str, int]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "tagged": self.tagged,
            "already_tagged": self.already,
            "labels": self.labels,
            "seconds": round(self.seconds, 3),
            "top_labels": [{"label": lab, "images": n} for lab, n in self.top_labels],
        }


def tag_library(
    library: Library,
    encoder: Encoder,
    labelset: LabelSet,
    top: int = 3,
    min_probability: float = 0.1,
    force: bool = False,
    batch: int = 2000,
    progress: ProgressCallback | None = None,
) -> TagReport:
    """Store the top labels of every image not yet tagged with this label set.

    Incremental and resumable: each batch is committed with the label set's digest, so a
    second run (or a run after a kill) only visits new images; a changed label set,
    template, model, ``top`` or ``min_probability`` re-tags everything. ``force`` too.
    The label vectors are computed (``progress`` as for :func:`label_vectors`) before the
    writer lock is taken: another writer is not kept waiting while the text tower runs.
    """
    if top < 1 or not 0.0 <= min_probability <= 1.0:
        raise QueryError("--top must be at least 1 and --min-probability between 0 and 1")
    started = time.monotonic()
    report = TagReport(labels=len(labelset.labels))
    library.check_model(encoder.identity)
    matrix = label_vectors(encoder, labelset, library.label_cache_dir, progress)
    with library.writing():
        library.check_model(encoder.identity)
        catalog = library.catalog
        digest = labelset.digest(encoder.identity, top, min_probability)
        if force:
            catalog.forget_tagged()
        total = catalog.count()
        if catalog.untagged(digest, limit=1):
            report.tagged = _tag_pending(
                catalog, digest, matrix, encoder.logit_scale, labelset, top, min_probability, batch
            )
        report.already = total - report.tagged
        report.top_labels = catalog.tag_counts()[:10]
    report.seconds = time.monotonic() - started
    return report


def _tag_pending(catalog, digest, matrix, logit_scale, labelset, top, min_prob, batch) -> int:
    """Tag every image not yet tagged with ``digest``, one committed batch at a time."""
    done, last = 0, 0
    while ids := catalog.untagged(digest, last, batch):
        found, vectors = catalog.vectors(ids)
        probs = probabilities(vectors, matrix, logit_scale)
        _best_over_frames(catalog, found, probs, matrix, logit_scale)
        assignments = {}
        for image_id, row in zip(found, probs):
            picked = top_predictions(row, labelset.labels, top, min_prob)
            assignments[int(image_id)] = [(p.label, p.probability) for p in picked]
        catalog.store_tags(digest, assignments)
        done += len(assignments)
        last = ids[-1]
    return done


def _best_over_frames(catalog, found, probs: np.ndarray, matrix, logit_scale) -> None:
    """A video's label probabilities are each label's best over all its frames (a clip
    with a beach scene is tagged "beach"); photos' rows are left as they are."""
    frames = catalog.frame_ids_of(found.tolist())
    if not len(frames):
        return
    owners = catalog.frame_owners(frames.tolist())
    frame_ids, frame_vectors = catalog.vectors(frames)
    row_of = {int(i): k for k, i in enumerate(found)}
    for frame_id, row in zip(frame_ids, probabilities(frame_vectors, matrix, logit_scale)):
        k = row_of[owners[int(frame_id)][0]]
        probs[k] = np.maximum(probs[k], row)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Write a cache file whole or not at all; failures are ignored (it is only a cache)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    except OSError:
        return  # a read-only library still classifies, without the cache
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
