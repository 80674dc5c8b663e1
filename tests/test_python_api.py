"""The Python front door: README's example runs as written; Collection and SearchOptions
behave as documented (lazy model, one options object, validation at construction)."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import indexer.model.encoders
from indexer.errors import ConfigError
from retrieval import Collection, SearchOptions
from retrieval.cli import app
from retrieval.search.errors import QueryError
from tests.conftest import REPO, FakeEncoder


def readme_example() -> str:
    """The first ```python block of README's "Python API" section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Python API section has no python code block"
    return match.group(1)


@pytest.fixture
def fake_model(monkeypatch, fake_encoder):
    """Every model load gets the fake encoder; the loads are recorded."""
    loads = []

    def load(*args, **kwargs):
        loads.append((args, kwargs))
        return fake_encoder

    monkeypatch.setattr(indexer.model.encoders, "load_encoder", load)
    return loads


def test_readme_example_runs_as_written(fake_model, photo_folder, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(photo_folder, work / "photos")
    monkeypatch.chdir(work)
    exec(compile(readme_example(), "README.md", "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "indexing 6/6" in out and "indexed 6, failed 0" in out
    assert out.count("like it:") == 3
    assert "'images': 6" in out
    assert (work / "my-library").is_dir()
    assert len(fake_model) == 1  # one model, loaded once


@pytest.fixture
def indexed(tmp_path, photo_folder, fake_encoder) -> Path:
    root = tmp_path / "library"
    with Collection.open(root, encoder=fake_encoder) as photos:
        photos.index(photo_folder)
    return root


def test_a_query_by_photo_id_never_loads_the_model(indexed, photo_folder):
    def no_model():
        raise AssertionError("the model was loaded")

    with Collection.open(indexed, encoder=no_model, read_only=True) as photos:
        target = photos.library.catalog.id_for_path(str(photo_folder / "photo_2.jpg"))
        page = photos.similar(target, SearchOptions(k=2))
        assert page.results[0].id == target
        assert photos.info().images == 6
        assert photos.failures() == []
        assert photos.duplicates(0.999) == []


def test_a_read_only_collection_refuses_writes_by_name(indexed, photo_folder, fake_encoder):
    with Collection.open(indexed, encoder=fake_encoder, read_only=True) as photos:
        for write in (lambda: photos.index(photo_folder), lambda: photos.tag("cat,dog")):
            with pytest.raises(ConfigError, match="opened read-only"):
                write()
        assert photos.info().images == 6  # and the library is untouched


def test_index_reports_progress_to_a_plain_callable(tmp_path, photo_folder, fake_encoder):
    calls = []
    with Collection.open(tmp_path / "lib", encoder=fake_encoder) as photos:
        report = photos.index([photo_folder], progress=lambda done, total: calls.append(done))
        assert report.indexed == 6
        assert not photos.library.locked  # the writer lock is not kept after index()
    assert calls[0] == 0 and calls[-1] == 6 and calls == sorted(calls)


def test_search_page_carries_the_parsed_terms(indexed):
    with Collection.open(indexed, encoder=FakeEncoder()) as photos:
        page = photos.search("2:dog - cat", options=SearchOptions(k=3))
    assert [(t.text, t.weight) for t in page.terms] == [("dog", 2.0), ("cat", -1.0)]
    assert page.as_dict()["terms"][0]["text"] == "dog"


def test_classify_a_plain_file_needs_no_library(tmp_path, photo_folder, fake_encoder):
    root = tmp_path / "none"
    with Collection.open(root, encoder=fake_encoder) as photos:
        predictions = photos.classify(photo_folder / "photo_0.jpg", "cat,dog,car", top=2)
    assert len(predictions) == 2 and not root.exists()
    assert sum(p.probability for p in predictions) <= 1.0


def test_search_options_take_plain_typed_values():
    options = SearchOptions(
        after=dt.date(2021, 6, 1), folders="photos", min_size=(1920, 1080), formats=["jpg"]
    )
    spec = options.filter
    assert spec.after == dt.datetime(2021, 6, 1)
    assert spec.folders == (str(Path.cwd() / "photos"),)
    assert (spec.min_long, spec.min_short) == (1920, 1080)
    assert "JPEG" in spec.formats
    assert SearchOptions(camera="leica") == SearchOptions(camera="leica")


@pytest.mark.parametrize(
    "bad",
    [
        {"k": 0},
        {"k": 10_001},
        {"offset": -1},
        {"sort": "name"},
        {"cutoff": "sometimes"},
        {"min_score": 2.0},
        {"after": "yesterday"},
        {"min_size": "big"},
        {"formats": ["nope"]},
        {"after": "2022", "before": "2021"},
    ],
)
def test_search_options_refuse_bad_values_when_made(bad):
    with pytest.raises(QueryError):
        SearchOptions(**bad)


def test_embeddings_need_no_library(tmp_path, photo_folder, fake_encoder):
    with Collection.open(tmp_path / "none", encoder=fake_encoder) as photos:
        text = photos.embed_text("a cat")
        image = photos.embed_image((photo_folder / "photo_1.jpg").read_bytes())
    assert text.shape == image.shape == (512,)
    assert np.linalg.norm(image) == pytest.approx(1.0, abs=1e-5)
    assert not (tmp_path / "none").exists()


def test_cli_passes_cache_dir_inward_and_quiet_silences_stderr(
    fake_model, photo_folder, tmp_path, monkeypatch
):
    monkeypatch.setenv("CLIPDEX_CACHE", str(tmp_path / "cache"))
    shutil.copy(photo_folder / "photo_0.jpg", photo_folder / "broken.jpg")
    (photo_folder / "broken.jpg").write_bytes(b"not a jpeg")
    runner = CliRunner()
    loud = runner.invoke(app, ["index", str(photo_folder)])
    assert loud.exit_code == 0 and "failed:" in loud.stderr
    assert fake_model[-1][1]["cache_dir"] == tmp_path / "cache"
    (photo_folder / "broken.jpg").write_bytes(b"still not a jpeg")
    quiet = runner.invoke(app, ["index", "-q", str(photo_folder)])
    assert quiet.exit_code == 0 and quiet.stderr == ""
    assert "indexed" in quiet.stdout
    searched = runner.invoke(app, ["search", "a ball", "--cutoff", "auto", "--quiet"])
    assert searched.exit_code == 0 and searched.stderr == ""
