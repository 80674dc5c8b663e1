"""Near-duplicate groups: generated copies of corpus photos are recovered completely, with the
largest image as keeper; single linkage; folder restriction; the CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from indexer.ingest.pipeline import index_paths
from indexer.model.identity import ModelIdentity, l2_normalise
from indexer.store.catalog import ImageRecord
from indexer.store.library import Library
from retrieval.cli import app
from retrieval.search.duplicates import find_duplicates
from retrieval.search.errors import QueryError
from retrieval.search.filters import ImageFilter
from tests.imagefakes import ThumbnailEncoder, build_variant_library

REAL_WEIGHTS = os.environ.get("CLIPDEX_WEIGHTS")  # read before the autouse fixture clears it
runner = CliRunner()


@pytest.fixture(scope="module")
def variant_library(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("dups")
    library, groups = build_variant_library(corpus, root)
    yield library, groups, root
    library.close()


def _as_sets(groups) -> list[set[str]]:
    return [{m.path for m in g.members} for g in groups]


def test_generated_copies_are_recovered_completely(variant_library):
    library, expected, _ = variant_library
    found = find_duplicates(library, threshold=0.9)
    sets = _as_sets(found)
    for original, group in expected.items():
        assert group in sets, (original, [s for s in sets if original in s])
    assert len(found) == len(expected)  # and no group of unrelated photos
    for group in found:
        original = next(p for p in expected if p in {m.path for m in group.members})
        assert group.keeper.path == original  # largest resolution, then the oldest
        scores = [m.score for m in group.members]
        assert scores[0] == pytest.approx(1.0, abs=1e-5) and scores == sorted(scores, reverse=True)
        assert min(scores) >= 0.9


def test_keeper_is_the_largest_image(variant_library):
    library, _, _ = variant_library
    for group in find_duplicates(library, threshold=0.9):
        pixels = [m.width * m.height for m in group.members]
        assert pixels[0] == max(pixels)


def test_folder_restriction_groups_only_inside_it(variant_library):
    library, expected, root = variant_library
    copies = str(root / "photos" / "copies")
    found = find_duplicates(library, 0.9, ImageFilter(folders=(copies,)))
    assert len(found) == len(expected)
    for group in found:
        assert len(group.members) == 3 and all(m.path.startswith(copies) for m in group.members)


def test_cli_duplicates_json(variant_library):
    library, expected, _ = variant_library
    result = runner.invoke(
        app, ["duplicates", "--threshold", "0.9", "--library", str(library.root), "--json"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["threshold"] == 0.9
    assert {frozenset(m["path"] for m in g["members"]) for g in document["groups"]} == {
        frozenset(group) for group in expected.values()
    }
    assert all(g["keeper"] == g["members"][0]["id"] for g in document["groups"])
    human = runner.invoke(app, ["duplicates", "--library", str(library.root)])
    assert human.exit_code == 0 and "keep" in human.output
    assert runner.invoke(app, ["duplicates", "--threshold", "2"]).exit_code == 2


def test_exact_copies_group_and_nothing_else(tmp_path, photo_folder):
    shutil.copy(photo_folder / "photo_2.jpg", photo_folder / "copy_of_2.jpg")
    with Library.open(tmp_path / "lib", create=True) as library:
        index_paths(library, ThumbnailEncoder(), [photo_folder])
        groups = find_duplicates(library, 0.99)
        assert _as_sets(groups) == [
            {str(photo_folder / "photo_2.jpg"), str(photo_folder / "copy_of_2.jpg")}
        ]
        assert groups[0].members[1].score == pytest.approx(1.0, abs=1e-6)
        assert groups[0].keeper.path.endswith("photo_2.jpg")  # same size: the older file


def test_single_linkage_chains_a_burst(tmp_path):
    rng = np.random.default_rng(0)
    start, end = l2_normalise(rng.standard_normal((2, 512)))
    # A burst drifting from one frame to another: neighbours close, ends far apart.
    frames = l2_normalise(np.stack([start + t * (end - start) for t in np.linspace(0, 1, 12)]))
    others = l2_normalise(rng.standard_normal((5, 512)))
    vectors = np.vstack([frames, others])
    assert frames[0] @ frames[-1] < 0.5 < min(frames[i] @ frames[i + 1] for i in range(11))
    records = [
        ImageRecord(f"/p/{i}.jpg", 1, 1, f"{i:064x}", vectors[i], 10 + i, 10)
        for i in range(len(vectors))
    ]
    with Library.open(tmp_path / "lib", create=True) as library:
        library.bind_model(ModelIdentity(weights="fake"))
        ids = library.catalog.commit_batch(records)
        library.index.add(np.asarray(ids), vectors)
        library.checkpoint()
        threshold = float(min(frames[i] @ frames[i + 1] for i in range(11))) - 1e-4
        groups = find_duplicates(library, threshold)
        assert [sorted(m.id for m in g.members) for g in groups] == [ids[:12]]
        assert groups[0].keeper.id == ids[11]  # the largest frame (22x10)
        with pytest.raises(QueryError, match="threshold"):
            find_duplicates(library, 0.0)


def test_empty_and_tiny_libraries(tmp_path):
    with Library.open(tmp_path / "lib", create=True) as library:
        assert find_duplicates(library) == []


@pytest.mark.real_weights
@pytest.mark.skipif(not REAL_WEIGHTS, reason="needs CLIPDEX_WEIGHTS (real MobileCLIP-S2)")
def test_real_model_recovers_generated_copies(corpus, tmp_path):
    from indexer.model.encoders import load_encoder

    encoder = load_encoder(Path(REAL_WEIGHTS))
    library, expected = build_variant_library(corpus, tmp_path, encoder)
    with library:
        sets = _as_sets(find_duplicates(library, threshold=0.9))
    for group in expected.values():
        holder = [s for s in sets if group & s]
        assert len(holder) == 1 and group <= holder[0], (group, holder)
