"""Indexing pipeline with the fake encoder: incremental runs, reuse, removal, failures."""

from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image

from indexer.errors import ConfigError
from indexer.ingest.pipeline import IndexOptions, index_paths
from indexer.store.library import Library
from retrieval import Collection, SearchOptions


@pytest.fixture
def library(tmp_path):
    with Library.open(tmp_path / "lib", create=True) as lib:
        yield lib


def test_first_run_indexes_every_photo(library, photo_folder, fake_encoder):
    report = index_paths(library, fake_encoder, [photo_folder])
    assert (report.indexed, report.failed, report.unchanged) == (6, 0, 0)
    assert library.catalog.count() == 6 == len(library.index)
    assert fake_encoder.images_encoded == 6


def test_second_run_encodes_nothing(library, photo_folder, fake_encoder):
    index_paths(library, fake_encoder, [photo_folder])
    fake_encoder.images_encoded = 0
    report = index_paths(library, fake_encoder, [photo_folder])
    assert report.unchanged == 6 and report.indexed == 0
    assert fake_encoder.images_encoded == 0


def test_renamed_file_reuses_vector_without_the_model(library, photo_folder, fake_encoder):
    index_paths(library, fake_encoder, [photo_folder])
    old_id = library.catalog.id_for_path(str(photo_folder / "photo_1.jpg"))
    old_vector = library.index.reconstruct(old_id)
    os.rename(photo_folder / "photo_1.jpg", photo_folder / "renamed.jpg")
    fake_encoder.images_encoded = 0
    report = index_paths(library, fake_encoder, [photo_folder])
    assert fake_encoder.images_encoded == 0
    assert (report.reused, report.removed, report.indexed) == (1, 1, 0)
    new_id = library.catalog.id_for_path(str(photo_folder / "renamed.jpg"))
    assert library.catalog.id_for_path(str(photo_folder / "photo_1.jpg")) is None
    assert (library.index.reconstruct(new_id) == old_vector).all()
    assert library.catalog.count() == 6 == len(library.index)


def test_deleted_file_disappears_from_results(library, photo_folder, fake_encoder):
    index_paths(library, fake_encoder, [photo_folder])
    photos = Collection(library.root, fake_encoder, library=library)
    target = photo_folder / "photo_3.jpg"
    assert photos.similar(target, SearchOptions(k=1)).results[0].path == str(target)
    os.remove(target)
    report = index_paths(library, fake_encoder, [photo_folder])
    assert report.removed == 1
    paths = [r.path for r in photos.search("anything", options=SearchOptions(k=10)).results]
    assert str(target) not in paths and len(paths) == 5


def test_changed_file_is_encoded_again_under_a_new_id(library, photo_folder, fake_encoder):
    index_paths(library, fake_encoder, [photo_folder])
    target = photo_folder / "photo_2.jpg"
    old_id = library.catalog.id_for_path(str(target))
    Image.new("RGB", (300, 200), (1, 2, 3)).save(target)
    report = index_paths(library, fake_encoder, [photo_folder])
    assert report.indexed == 1
    new_id = library.catalog.id_for_path(str(target))
    assert new_id != old_id and old_id not in set(library.index.ids())


def test_broken_file_is_recorded_and_run_goes_on(library, photo_folder, fake_encoder):
    (photo_folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photo_folder / "empty.png").write_bytes(b"")
    report = index_paths(library, fake_encoder, [photo_folder])
    assert report.indexed == 6 and report.failed == 2
    failed = {row["path"]: row["error"] for row in library.catalog.list_failures()}
    assert set(failed) == {str(photo_folder / "broken.jpg"), str(photo_folder / "empty.png")}
    assert all(reason for reason in failed.values())


def test_excludes_and_hidden_folders_are_skipped(library, photo_folder, fake_encoder):
    hidden = photo_folder / ".thumbnails"
    hidden.mkdir()
    shutil.copy(photo_folder / "photo_0.jpg", hidden / "t.jpg")
    raw = photo_folder / "raw"
    raw.mkdir()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(raw / "skip.png")
    report = index_paths(library, fake_encoder, [photo_folder], IndexOptions(excludes=["raw/*"]))
    assert report.indexed == 6


def test_missing_root_is_a_clear_error_and_removes_nothing(library, photo_folder, fake_encoder):
    index_paths(library, fake_encoder, [photo_folder])
    with pytest.raises(ConfigError, match="does not exist"):
        index_paths(library, fake_encoder, [photo_folder / "unmounted"])
    assert library.catalog.count() == 6


def test_copies_in_one_run_share_a_single_encoding(library, photo_folder, fake_encoder):
    for i in range(3):
        shutil.copy(photo_folder / "photo_0.jpg", photo_folder / f"copy_{i}.jpg")
    options = IndexOptions(batch_size=2, workers=1)
    report = index_paths(library, fake_encoder, [photo_folder], options)
    assert report.indexed + report.reused == 9
    assert library.catalog.count() == 9 == len(library.index)
