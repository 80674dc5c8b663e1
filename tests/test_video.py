"""Videos searched by moment: sampling by scene change, storage as frames, one result per
video at its best frame, incremental rules, crash safety and bad input.

Every video here is written by the test itself (tests/videogen.py) from corpus photos: a
scene per photo with known cut times, in the containers and codecs this PyAV wheel writes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from indexer.errors import DecodeError
from indexer.ingest.decode import to_model_input
from indexer.ingest.pipeline import IndexOptions, index_paths
from indexer.ingest.video import Sampling, frame_at, sample_video
from indexer.store.library import Library
from retrieval import Collection, SearchOptions
from tests.conftest import REPO, FakeEncoder
from tests.videogen import (
    FORMATS,
    scene_image,
    truncate,
    write_audio_only,
    write_video,
)

SCENE_SECONDS = 1.5
PHOTO_NAMES = ("Blinds.jpg", "Dune.jpg", "GreenMeadow.jpg", "LadyBird.jpg", "Storm.jpg", "Wood.jpg")


@pytest.fixture(scope="module")
def scenes() -> list[Path]:
    from tests.conftest import corpus_dir

    corpus = corpus_dir()
    if corpus is None:
        pytest.skip("image corpus absent: set CLIPDEX_CORPUS to shared/imgcorpus to run this")
    folder = corpus / "photos" / "debian-mate"
    return [folder / name for name in PHOTO_NAMES]


def _scene_at(starts: list[float], seconds: float) -> int:
    """Which scene (index) a time falls in."""
    return max(i for i, start in enumerate(starts) if start <= seconds + 1e-6)


def _options(**kwargs) -> IndexOptions:
    return IndexOptions(workers=1, batch_size=4, **kwargs)


# -- sampling -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(FORMATS))
def test_one_frame_per_scene_in_each_container_and_codec(tmp_path, scenes, kind):
    suffix, _ = FORMATS[kind]
    path = tmp_path / f"clip{suffix}"
    starts = write_video(path, scenes[:4], SCENE_SECONDS, kind=kind)
    video = sample_video(path)
    assert [_scene_at(starts, t) for t in video.times] == [0, 1, 2, 3], video.times
    assert video.pixels.shape == (4, 3, 256, 256)
    assert (video.info.width, video.info.height) == (192, 128)
    assert video.info.duration == pytest.approx(4 * SCENE_SECONDS, abs=0.2)


def test_a_long_video_is_probed_by_seeking_keyframes(tmp_path, scenes):
    path = tmp_path / "film.mp4"
    starts = write_video(path, scenes[:4], 3.0, gop=5)
    video = sample_video(path, Sampling(sequential_pixels=0, probes=24))
    assert video.probes <= 24
    assert sorted({_scene_at(starts, t) for t in video.times}) == [0, 1, 2, 3]


def test_spacing_and_cap_bound_the_frames(tmp_path, scenes):
    path = tmp_path / "cuts.mp4"
    starts = write_video(path, scenes[:6], 0.5)
    spaced = sample_video(path, Sampling(min_spacing=1.2))
    assert np.all(np.diff(spaced.times) >= 1.2 - 1e-6), spaced.times
    capped = sample_video(path, Sampling(max_frames=3))
    assert len(capped.times) == 3 and capped.times[0] == 0.0
    still = tmp_path / "still.mp4"
    write_video(still, scenes[:1], 5.0)
    assert len(sample_video(still, Sampling(max_spacing=2.0)).times) == 3  # 0, 2, 4 s
    assert len(starts) == 6


def test_rotation_metadata_is_honoured(tmp_path, scenes):
    path = tmp_path / "portrait.mp4"
    write_video(path, scenes[:1], 1.0, rotation=90, size=(192, 128))
    video = sample_video(path)
    assert (video.info.width, video.info.height) == (192, 128)  # as displayed
    upright = to_model_input(scene_image(scenes[0], (192, 128)))
    sideways = to_model_input(scene_image(scenes[0], (192, 128)).rotate(-90, expand=True))
    error = np.abs(video.pixels[0] - upright).mean()
    assert error < np.abs(video.pixels[0] - sideways).mean() / 3, error
    assert frame_at(path, 0.5).size == (192, 128)


def test_a_file_that_decodes_too_long_fails_with_a_reason(tmp_path, scenes):
    path = tmp_path / "slow.mp4"
    write_video(path, scenes[:2], 1.0)
    with pytest.raises(DecodeError, match="time limit"):
        sample_video(path, Sampling(seconds=0.0))


# -- indexing -----------------------------------------------------------------------------------
def test_bad_videos_fail_with_reasons_and_cost_nothing_else(tmp_path, scenes, fake_encoder):
    folder = tmp_path / "media"
    folder.mkdir()
    write_video(folder / "good.mp4", scenes[:2], 1.0)
    write_video(folder / "cut.mkv", scenes[:4], 1.0, kind="mkv-h264")
    truncate(folder / "cut.mkv", 0.5)
    write_video(folder / "cut.mp4", scenes[:2], 1.0)
    truncate(folder / "cut.mp4", 0.5)
    (folder / "empty.mov").write_bytes(b"")
    (folder / "noise.avi").write_bytes(os.urandom(5000))
    write_audio_only(folder / "song.m4v")
    with Library.open(tmp_path / "lib", create=True) as library:
        report = index_paths(library, fake_encoder, [folder], _options())
        reasons = {Path(f["path"]).name: f["error"] for f in library.catalog.list_failures()}
        assert report.indexed == 1 and report.failed == 5, reasons
        assert sorted(library.index.ids()) == sorted(library.catalog.ids())
    assert "truncated" in reasons["cut.mkv"]
    assert "truncated" in reasons["cut.mp4"]
    assert "empty file" in reasons["empty.mov"]
    assert "not a readable video" in reasons["noise.avi"]
    assert "audio only" in reasons["song.m4v"]
    assert fake_encoder.images_encoded == 2  # the good video's two scenes, nothing else


def test_absurd_dimensions_fail_before_decoding(tmp_path, scenes, fake_encoder):
    write_video(tmp_path / "big.webm", scenes[:1], 1.0, kind="webm-vp9")
    with Library.open(tmp_path / "lib", create=True) as library:
        options = _options(max_megapixels=0.01)
        report = index_paths(library, fake_encoder, [tmp_path / "big.webm"], options)
        assert report.failed == 1 and "MP limit" in report.failures[0][1]
    assert fake_encoder.images_encoded == 0


def _video_rows(library: Library) -> dict[str, dict]:
    rows = library.catalog.get_images(library.catalog.ids_where("kind = 'video'"))
    return {Path(r["path"]).name: r for r in rows.values()}


def test_rename_reuses_change_replaces_delete_removes(tmp_path, scenes):
    folder = tmp_path / "media"
    folder.mkdir()
    write_video(folder / "trip.mp4", scenes[:4], 1.0)
    shutil.copy(scenes[4], folder / "photo.jpg")
    encoder = FakeEncoder()
    with Library.open(tmp_path / "lib", create=True) as library:
        first = index_paths(library, encoder, [folder], _options())
        assert (first.indexed, first.frames) == (2, 4)
        assert len(library.index) == 5  # a photo, and the video's four frames
        before = encoder.images_encoded

        (folder / "trip.mp4").rename(folder / "renamed.mp4")
        moved = index_paths(library, encoder, [folder], _options())
        assert (moved.indexed, moved.reused, moved.frames) == (0, 1, 0)
        assert encoder.images_encoded == before  # nothing encoded again
        row = _video_rows(library)["renamed.mp4"]
        assert row["duration"] == pytest.approx(4.0, abs=0.2) and row["codec"] == "H264"
        assert len(library.catalog.video_frames(row["id"])[0]) == 4
        assert len(library.index) == 5 and sorted(library.index.ids()) == sorted(
            library.catalog.ids()
        )

        write_video(folder / "renamed.mp4", scenes[:2], 1.0)  # the same name, new content
        changed = index_paths(library, encoder, [folder], _options())
        assert (changed.indexed, changed.frames) == (1, 2)
        assert len(library.index) == 3
        assert sorted(library.index.ids()) == sorted(library.catalog.ids())

        (folder / "renamed.mp4").unlink()
        gone = index_paths(library, encoder, [folder], _options())
        assert gone.removed == 1
        assert list(library.index.ids()) == list(library.catalog.ids()) and len(library.index) == 1
    with Library.open(tmp_path / "lib") as reopened:  # the frames table agrees on disk too
        assert len(reopened.catalog.frame_ids_of(reopened.catalog.ids())) == 0


def test_a_photo_finds_the_video_at_its_scene(tmp_path, scenes, spread_checkpoint):
    """The moment of a video nearest a query photo comes back inside that photo's scene, and
    the video once, at its best frame; `similar` from the video finds its own scenes."""
    from indexer.model.encoders import load_encoder

    folder = tmp_path / "media"
    folder.mkdir()
    starts = write_video(folder / "holiday.webm", scenes[:4], SCENE_SECONDS, kind="webm-vp9")
    shutil.copy(scenes[4], folder / "storm.jpg")
    shutil.copy(scenes[5], folder / "wood.jpg")
    encoder = load_encoder(spread_checkpoint, "cpu", "torch")
    with Collection.open(tmp_path / "lib", encoder=encoder) as media:
        media.index(folder, _options())
        for scene in (1, 3):
            page = media.search_image(scenes[scene], SearchOptions(k=3))
            top = page.results[0]
            assert Path(top.path).name == "holiday.webm", [r.path for r in page.results]
            assert _scene_at(starts, top.frame_time) == scene, top.frame_time
            assert [r.path for r in page.results].count(top.path) == 1
            document = top.as_dict()
            assert document["kind"] == "video" and document["frame_time"] == top.frame_time
        photos = media.search_image(scenes[4], SearchOptions(k=3)).results
        assert Path(photos[0].path).name == "storm.jpg" and "frame_time" not in photos[0].as_dict()
        video_id = media.library.catalog.id_for_path(str(folder / "holiday.webm"))
        assert media.similar(video_id, SearchOptions(k=1)).results[0].id == video_id


_KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, sys.argv[3])
from indexer.ingest.pipeline import IndexOptions, index_paths
from indexer.store.library import Library
from tests.conftest import FakeEncoder

class DiesMidVideo(FakeEncoder):
    def encode_images(self, batch):
        if self.images_encoded >= 2:  # the video's second chunk of frames
            os.kill(os.getpid(), signal.SIGKILL)
        return super().encode_images(batch)

with Library.open(sys.argv[1], create=True) as library:
    index_paths(library, DiesMidVideo(), [sys.argv[2]], IndexOptions(workers=1, batch_size=2))
"""


def test_sigkill_during_a_video_leaves_no_partial_video(tmp_path, scenes):
    folder = tmp_path / "media"
    folder.mkdir()
    write_video(folder / "long.mov", scenes[:4], 1.0, kind="mov-hevc")
    library_dir = tmp_path / "lib"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", _KILL_SCRIPT, str(library_dir), str(folder), str(REPO)]
    killed = subprocess.run(args, env=env, capture_output=True, timeout=120)
    assert killed.returncode == -9, killed.stderr.decode()
    with Library.open(library_dir) as library:
        assert library.catalog.count() == 0 and len(library.catalog.ids()) == 0
        assert len(library.index) == 0
        report = index_paths(library, FakeEncoder(), [folder], _options())
        assert (report.indexed, report.frames) == (1, 4)
        assert sorted(library.index.ids()) == sorted(library.catalog.ids())


def test_a_schema_5_catalog_gains_the_video_columns_and_frames(tmp_path):
    import sqlite3

    from indexer.store.catalog import SCHEMA_VERSION, Catalog
    from indexer.store.catalog_reader import CatalogReader

    path = tmp_path / "catalog.sqlite"
    Catalog(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE frames")
        conn.execute("DROP INDEX ix_images_video")  # schema 9's, on the kind column
        for column in ("kind", "duration", "codec", "frame_time"):
            conn.execute(f"ALTER TABLE images DROP COLUMN {column}")
        conn.execute(
            "INSERT INTO images (path, size, mtime_ns, sha256, width, height, "
            "indexed_at, vector) VALUES ('/p.jpg', 1, 2, 'ab', 3, 4, '2020-01-01', x'00')"
        )
        conn.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
    conn.close()
    reader = CatalogReader(path)  # an old catalog read as it is: no frames, no error
    try:
        assert list(reader.ids()) == [1] and reader.frame_owners([1]) == {}
    finally:
        reader.close()
    catalog = Catalog(path)
    try:
        assert catalog.get_meta("schema_version") == str(SCHEMA_VERSION)
        row = catalog.get_images([1])[1]
        assert row["kind"] == "photo" and row["duration"] is None
        assert list(catalog.frame_ids_of([1])) == []
    finally:
        catalog.close()


def test_filters_date_sort_paging_cutoff_and_duplicates_for_videos(tmp_path, photo_folder):
    import datetime as dt

    from retrieval.search.errors import QueryError

    folder = photo_folder
    scenes = sorted(folder.glob("photo_*.jpg"))
    write_video(folder / "new.mp4", scenes[:3], 1.0, creation_time=dt.datetime(2030, 1, 2))
    old = dt.datetime(2001, 5, 6)
    write_video(folder / "old.webm", scenes[3:], 1.0, kind="webm-vp9", creation_time=old)
    shutil.copy(folder / "new.mp4", folder / "copy of new.mp4")
    encoder = FakeEncoder()
    with Collection.open(tmp_path / "lib", encoder=encoder) as media:
        media.index(folder, _options())

        def names(**options) -> list[str]:
            page = media.search("anything", options=SearchOptions(**{"k": 20, **options}))
            return [Path(r.path).name for r in page.results]

        assert sorted(names(kind="video")) == ["copy of new.mp4", "new.mp4", "old.webm"]
        assert len(names(kind="photos")) == 6
        assert not any(".mp4" in n for n in names(kind="photo"))
        with pytest.raises(QueryError, match="photo or video"):
            SearchOptions(kind="films")
        assert sorted(names(formats=("mp4",))) == ["copy of new.mp4", "new.mp4"]
        assert sorted(names(after="2029")) == ["copy of new.mp4", "new.mp4"]
        assert names(sort="date-asc", min_score=-1.0)[0] == "old.webm"  # its creation_time
        assert names(sort="date", min_score=-1.0)[-1] == "old.webm"

        everything = media.search("anything", options=SearchOptions(k=20, min_score=-1.0))
        assert everything.total == 9 == len({r.id for r in everything.results})  # each once
        pages = [names(k=4, offset=offset) for offset in (0, 4, 8)]
        flat = [n for page in pages for n in page]
        assert len(flat) == 9 and len(set(flat)) == 9

        groups = media.duplicates(0.99)
        by_name = [sorted(Path(m.path).name for m in g.members) for g in groups]
        assert ["copy of new.mp4", "new.mp4"] in by_name
        assert all(len(set(g)) == len(g) >= 2 for g in by_name)
        assert media.info().images == 9  # a video counts once, not per frame

        media.tag(labels="red,green,blue,sky", top=1, min_probability=0.0)
        [video] = media.search(
            "x", options=SearchOptions(k=1, kind="video", formats=("webm",))
        ).results
        [label] = [t["label"] for t in video.tags]
        assert "old.webm" in names(tags=(label,))


def test_a_new_photo_never_takes_a_frame_id(tmp_path, scenes):
    """A salvaged catalog's id sequence is rebuilt from the images table alone: the next
    row must still get an id above every frame's."""
    import sqlite3

    folder = tmp_path / "media"
    folder.mkdir()
    write_video(folder / "clip.mp4", scenes[:3], 1.0)
    encoder = FakeEncoder()
    with Library.open(tmp_path / "lib", create=True) as library:
        index_paths(library, encoder, [folder], _options())
        frames = set(library.catalog.frame_ids_of(library.catalog.ids()).tolist())
        assert len(frames) == 2
    with sqlite3.connect(tmp_path / "lib" / "catalog.sqlite") as conn:
        conn.execute("UPDATE sqlite_sequence SET seq = 1 WHERE name = 'images'")
    conn.close()
    shutil.copy(scenes[4], folder / "new.jpg")
    with Library.open(tmp_path / "lib") as library:
        index_paths(library, encoder, [folder], _options())
        new = library.catalog.id_for_path(str(folder / "new.jpg"))
        assert new not in frames
        ids = library.catalog.ids()
        assert len(set(ids.tolist())) == len(ids) == 4 == len(library.index)


def test_info_counts_photos_videos_and_their_frames(tmp_path, fake_encoder):
    """`clipdex info`, its --json and /api/info tell photos from videos and count the
    videos' searchable frames; the videos are counted through their partial index."""
    import json

    from typer.testing import CliRunner

    from indexer.model.identity import l2_normalise
    from indexer.store.catalog import ImageRecord
    from retrieval.cli import app
    from tests.live_server import served

    rng = np.random.default_rng(4)
    unit = l2_normalise(rng.standard_normal((7, 512)).astype(np.float32))
    records = [ImageRecord(f"/p/{i}.jpg", 1, 1, f"{i:064x}", unit[i], 8, 8) for i in range(3)]
    for n, frames in ((3, 4), (4, 1)):  # a video of four kept frames, one of one
        video = ImageRecord(f"/v/{n}.mp4", 1, 1, f"{n:064x}", unit[n], 8, 8, "MP4")
        video.kind, video.frame_time = "video", 0.0
        video.frame_times, video.frame_vectors = list(range(frames)), unit[:frames]
        records.append(video)
    root = tmp_path / "lib"
    with Library.open(root, create=True) as library:
        library.bind_model(fake_encoder.identity)
        library.catalog.commit_batch(records)
        with library.catalog.engine.connect() as conn:
            plan = conn.exec_driver_sql(
                "EXPLAIN QUERY PLAN SELECT count(*) FROM images WHERE kind = 'video'"
            ).all()
        assert "ix_images_video" in str(plan)
    expected = {"images": 5, "photos": 3, "videos": 2, "video_frames": 5}
    shown = CliRunner().invoke(app, ["info", "--library", str(root), "--json"])
    assert shown.exit_code == 0, shown.output
    facts = json.loads(shown.output)
    assert {key: facts[key] for key in expected} == expected
    table = CliRunner().invoke(app, ["info", "--library", str(root)])
    assert "3 photos, 2 videos with 5 searchable frames" in " ".join(table.output.split())
    with served(root, fake_encoder) as (_, http):
        document = http.get("/api/info").json()
    assert {key: document[key] for key in expected} == expected


def test_ids_follow_discovery_order_with_a_video_and_a_known_copy(tmp_path, scenes):
    """A video and a copy of an already catalogued photo take their ids in discovery order,
    not ahead of the photos waiting to be encoded (a cluster run gives the same ids)."""
    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(scenes[0], first / "known.jpg")
    folder = tmp_path / "media"
    folder.mkdir()
    shutil.copy(scenes[1], folder / "p0.jpg")
    shutil.copy(scenes[0], folder / "p1_copy_of_known.jpg")
    write_video(folder / "p2_clip.mp4", scenes[2:4], 1.0)
    shutil.copy(scenes[4], folder / "p3.jpg")
    shutil.copy(scenes[5], folder / "p4.jpg")
    with Library.open(tmp_path / "lib", create=True) as library:
        index_paths(library, FakeEncoder(), [first], _options())
        report = index_paths(library, FakeEncoder(), [folder], _options())
        assert report.indexed == 4 and report.reused == 1
        paths = sorted(str(p) for p in folder.iterdir())
        ids = [library.catalog.id_for_path(path) for path in paths]
    assert None not in ids
    assert ids == sorted(ids), dict(zip(paths, ids))
