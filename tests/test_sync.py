"""Keeping a library in sync: changed-path batches, the watch loop, polling, vanishing folders.

The fake encoder stands in for the model (nothing here ranks). Every wait is a generous
"within N seconds" poll on the sync's own counters; batch counts come from those counters.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.errors import ConfigError, WatchUnavailable
from indexer.ingest import watch
from indexer.ingest.pipeline import IndexOptions, index_changes, index_paths
from indexer.ingest.sync import Syncer, SyncOptions
from indexer.store.library import Library, take_lock
from retrieval import Collection

# Short timers so a test takes seconds; the defaults are seconds to a minute.
FAST = dict(quiet_seconds=0.3, settle_seconds=0.3, tick_seconds=0.05, retry_seconds=0.2)
INDEX = IndexOptions(workers=1)


def write_photo(path: Path, seed: int, size: int = 64) -> Path:
    """A small JPEG whose colours depend on ``seed`` (so each has its own content)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    """Poll ``condition`` until it holds; fail after a generous ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {seconds} s")
        time.sleep(0.05)


@contextmanager
def syncing(syncer: Syncer) -> Iterator[Syncer]:
    """Run ``syncer`` in a thread for the block, then stop it and surface its errors."""
    stop, errors = threading.Event(), []

    def run() -> None:
        try:
            syncer.run(stop)
        except BaseException as exc:  # shown by the test, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: syncer.status()["batches"] >= 1 or errors)  # the catch-up batch
        yield syncer
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive(), "the sync did not stop"
    assert not errors, errors
    assert syncer.status()["state"] == "stopped"


def totals(syncer: Syncer, name: str) -> int:
    return syncer.status()[name]


def catalog_paths(root: Path) -> set[str]:
    with Library.open(root, read_only=True) as library:
        return {row["path"] for row in library.catalog.get_images(library.catalog.ids()).values()}


@pytest.fixture
def photos(tmp_path, fake_encoder) -> Iterator[Collection]:
    with Collection(tmp_path / "lib", fake_encoder) as collection:
        yield collection


# -- one batch of changed paths (the pipeline) -------------------------------------------
def test_changed_paths_batch_adds_moves_and_removes(tmp_path, photo_folder, fake_encoder):
    with Library.open(tmp_path / "lib", create=True) as library:
        index_paths(library, fake_encoder, [photo_folder])
        old_id = library.catalog.id_for_path(str(photo_folder / "photo_1.jpg"))
        old_vector = library.index.reconstruct(old_id)
        fake_encoder.images_encoded = 0
        os.rename(photo_folder / "photo_1.jpg", photo_folder / "moved.jpg")
        os.remove(photo_folder / "photo_2.jpg")
        new = write_photo(photo_folder / "new.jpg", 7)
        changed = [
            photo_folder / "photo_1.jpg",
            photo_folder / "moved.jpg",
            photo_folder / "photo_2.jpg",
            new,
            photo_folder / "photo_3.jpg",
        ]
        report = index_changes(library, fake_encoder, changed, INDEX)
        assert (report.indexed, report.reused, report.removed) == (1, 1, 2)
        assert report.unchanged == 1 and fake_encoder.images_encoded == 1
        moved_id = library.catalog.id_for_path(str(photo_folder / "moved.jpg"))
        assert (library.index.reconstruct(moved_id) == old_vector).all()
        assert library.catalog.id_for_path(str(photo_folder / "photo_2.jpg")) is None
        assert library.catalog.count() == 6 == len(library.index)


def test_changed_paths_batch_removes_a_deleted_folder_and_its_failures(
    tmp_path, photo_folder, fake_encoder
):
    album = photo_folder / "album"
    album.mkdir()
    write_photo(album / "a.jpg", 1)
    (album / "broken.jpg").write_bytes(b"not a jpeg")
    with Library.open(tmp_path / "lib", create=True) as library:
        index_paths(library, fake_encoder, [photo_folder], INDEX)
        assert library.catalog.failure_count() == 1 and library.catalog.count() == 7
        shutil.rmtree(album)
        report = index_changes(library, fake_encoder, [album], INDEX)
        assert report.removed == 1
        assert library.catalog.count() == 6 == len(library.index)
        assert library.catalog.failure_count() == 0


# -- the watch loop over real file-system events ------------------------------------------
def test_watch_picks_up_a_new_file_and_a_deleted_one_leaves(photos, photo_folder):
    syncer = photos.syncer([photo_folder], INDEX, SyncOptions(**FAST))
    with syncing(syncer):
        assert syncer.status()["mode"] == "events"
        assert totals(syncer, "indexed") == 6  # the catch-up of what was already there
        write_photo(photo_folder / "new.jpg", 11)
        wait_for(lambda: totals(syncer, "indexed") == 7, 20)
        os.remove(photo_folder / "photo_0.jpg")
        wait_for(lambda: totals(syncer, "removed") == 1, 20)
        os.rename(photo_folder / "photo_1.jpg", photo_folder / "renamed.jpg")
        wait_for(lambda: totals(syncer, "reused") == 1, 20)  # its vector, not the model
    paths = catalog_paths(photos.root)
    assert str(photo_folder / "new.jpg") in paths and str(photo_folder / "renamed.jpg") in paths
    assert str(photo_folder / "photo_0.jpg") not in paths
    assert str(photo_folder / "photo_1.jpg") not in paths
    assert len(paths) == 6 and totals(syncer, "indexed") == 7
    # The watched folder is the root its photos' folder words start at, as with `index`.
    assert str(photo_folder) in json.loads(photos.library.catalog.get_meta("text_roots"))


def test_a_moved_photo_keeps_its_vector_however_long_the_settle_time(photos, photo_folder):
    # A long settle time must not split a move into a removal now and an encode later.
    options = SyncOptions(**{**FAST, "quiet_seconds": 0.1, "settle_seconds": 60.0})
    an_hour_ago = time.time() - 3600
    os.utime(photo_folder / "photo_3.jpg", (an_hour_ago, an_hour_ago))  # a photo, not a copy
    syncer = photos.syncer([photo_folder], INDEX, options)
    with syncing(syncer):
        os.rename(photo_folder / "photo_3.jpg", photo_folder / "renamed.jpg")
        wait_for(lambda: totals(syncer, "removed") == 1 and totals(syncer, "reused") == 1, 20)
    assert totals(syncer, "indexed") == 6  # the catch-up only: no model call for the move


def test_a_burst_of_500_files_is_indexed_in_few_batches(photos, tmp_path):
    folder = tmp_path / "import"
    folder.mkdir()
    options = SyncOptions(**{**FAST, "quiet_seconds": 2.0})  # a loaded machine may stall
    syncer = photos.syncer([folder], INDEX, options)
    with syncing(syncer):
        before = totals(syncer, "batches")
        for i in range(500):
            write_photo(folder / f"IMG_{i:04d}.jpg", 1000 + i, size=16)
        wait_for(lambda: totals(syncer, "indexed") + totals(syncer, "reused") == 500, 90)
        batches = totals(syncer, "batches") - before
    assert 1 <= batches <= 3, f"500 files took {batches} batches"
    assert totals(syncer, "failed") == 0
    assert len(catalog_paths(photos.root)) == 500


def test_an_import_that_never_pauses_is_indexed_while_it_goes_on(photos, tmp_path):
    folder = tmp_path / "import"
    folder.mkdir()
    # Files arrive 5x faster than the quiet period: only the maximum wait starts a batch.
    options = SyncOptions(**{**FAST, "quiet_seconds": 1.0, "max_wait_seconds": 1.0})
    syncer = photos.syncer([folder], INDEX, options)
    with syncing(syncer):
        deadline = time.monotonic() + 30
        written = 0
        while totals(syncer, "indexed") == 0 and time.monotonic() < deadline:
            write_photo(folder / f"IMG_{written:04d}.jpg", 2000 + written, size=16)
            written += 1
            time.sleep(0.2)
        assert totals(syncer, "indexed") > 0, "nothing indexed while the import went on"
        wait_for(lambda: totals(syncer, "indexed") == written, 20)


def test_a_file_written_slowly_is_indexed_once_complete(photos, tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    source = write_photo(tmp_path / "source.jpg", 5, size=256)
    data = source.read_bytes()
    # Pauses longer than the quiet period, far shorter than the settle time (a loaded
    # machine may stretch a pause).
    options = SyncOptions(**{**FAST, "quiet_seconds": 0.1, "settle_seconds": 3.0})
    syncer = photos.syncer([folder], INDEX, options)
    target = folder / "slow.jpg"
    with syncing(syncer):
        with open(target, "wb") as out:
            for start in range(0, len(data), len(data) // 4 + 1):
                out.write(data[start : start + len(data) // 4 + 1])
                out.flush()
                time.sleep(0.3)
        wait_for(lambda: totals(syncer, "indexed") == 1, 20)
        time.sleep(0.5)  # room for a second (wrong) batch to show up
    assert totals(syncer, "failed") == 0 and totals(syncer, "indexed") == 1
    assert photos.failures() == []
    with Library.open(photos.root, read_only=True) as library:
        row = library.catalog.get_images([library.catalog.id_for_path(str(target))])
        assert next(iter(row.values()))["size"] == len(data)


def test_the_folder_vanishing_and_coming_back(photos, photo_folder, tmp_path):
    syncer = photos.syncer([photo_folder], INDEX, SyncOptions(**FAST))
    away = tmp_path / "unmounted"
    with syncing(syncer):
        os.rename(photo_folder, away)
        wait_for(lambda: syncer.status()["missing"] == [str(photo_folder)], 20)
        write_photo(away / "while_away.jpg", 21)
        photo_folder.mkdir()  # an unmounted disk leaves its empty mount point
        time.sleep(0.5)
        assert syncer.status()["missing"] == [str(photo_folder)]
        photo_folder.rmdir()
        os.rename(away, photo_folder)  # mounted again
        wait_for(lambda: totals(syncer, "indexed") == 7, 20)
        assert syncer.status()["missing"] == []
        write_photo(photo_folder / "after.jpg", 22)  # events follow the folder again
        wait_for(lambda: totals(syncer, "indexed") == 8, 20)
    assert totals(syncer, "removed") == 0  # photos of a vanished folder are kept
    assert len(catalog_paths(photos.root)) == 8


def test_a_folder_replaced_by_another_is_checked_and_followed(photos, photo_folder, tmp_path):
    syncer = photos.syncer([photo_folder], INDEX, SyncOptions(**FAST))
    with syncing(syncer):
        os.rename(photo_folder, tmp_path / "old")
        replacement = tmp_path / "replacement"
        replacement.mkdir()
        write_photo(replacement / "other.jpg", 23)
        os.rename(replacement, photo_folder)
        wait_for(lambda: totals(syncer, "removed") == 6, 20)  # the folder holds other photos
        write_photo(photo_folder / "later.jpg", 24)  # and it is the one followed now
        wait_for(lambda: totals(syncer, "indexed") == 8, 20)
    assert catalog_paths(photos.root) == {
        str(photo_folder / "other.jpg"),
        str(photo_folder / "later.jpg"),
    }


def test_polling_rescans_where_events_are_not_used(photos, photo_folder):
    options = SyncOptions(**{**FAST, "poll_seconds": 0.3})
    syncer = photos.syncer([photo_folder], INDEX, options)
    with syncing(syncer):
        assert syncer.status()["mode"] == "poll"
        assert syncer.status()["poll_seconds"] == 0.3
        write_photo(photo_folder / "new.jpg", 31)
        os.remove(photo_folder / "photo_4.jpg")
        wait_for(lambda: totals(syncer, "indexed") == 7 and totals(syncer, "removed") == 1, 20)
    assert len(catalog_paths(photos.root)) == 6


def test_a_watcher_that_cannot_start_falls_back_to_polling(photos, photo_folder, monkeypatch):
    def refuse(*args, **kwargs):
        raise WatchUnavailable("file-system events are unavailable: inotify watch limit")

    monkeypatch.setattr(watch, "WatchfilesEvents", refuse)
    options = SyncOptions(**{**FAST, "fallback_poll_seconds": 0.3})
    syncer = photos.syncer([photo_folder], INDEX, options)
    with syncing(syncer):
        status = syncer.status()
        assert status["mode"] == "poll" and "inotify watch limit" in status["reason"]
        write_photo(photo_folder / "new.jpg", 41)
        wait_for(lambda: totals(syncer, "indexed") == 7, 20)


def test_a_batch_waits_for_another_writer_and_then_runs(photos, photo_folder):
    syncer = photos.syncer([photo_folder], INDEX, SyncOptions(**FAST))
    with syncing(syncer):
        other_writer = take_lock(photos.root)  # as `clipdex index` would hold it
        try:
            write_photo(photo_folder / "new.jpg", 51)
            wait_for(lambda: syncer.status()["state"] == "waiting", 20)
            assert totals(syncer, "indexed") == 6
        finally:
            other_writer.close()
        wait_for(lambda: totals(syncer, "indexed") == 7, 20)


def test_a_batch_holds_the_writer_lock_while_it_runs_and_only_then(photos, photo_folder):
    from indexer.errors import LibraryLocked
    from indexer.ingest.pipeline import Progress

    seen: list[str] = []

    class SecondWriter(Progress):  # tries to become a writer from inside each batch
        def advance(self, count: int = 1) -> None:
            try:
                take_lock(photos.root).close()
                seen.append("got the lock")
            except LibraryLocked:
                seen.append("refused")

    syncer = photos.syncer([photo_folder], INDEX, SyncOptions(**FAST), progress=SecondWriter())
    with syncing(syncer):
        take_lock(photos.root).close()  # between batches: another writer may run
    assert seen and set(seen) == {"refused"}


def test_watch_refuses_what_is_not_a_folder(photos, photo_folder):
    with pytest.raises(ConfigError, match="does not exist"):
        photos.syncer([photo_folder / "nope"], INDEX)
    with pytest.raises(ConfigError, match="is a file"):
        photos.syncer([photo_folder / "photo_0.jpg"], INDEX)
    with pytest.raises(ConfigError, match="--poll"):
        SyncOptions(poll_seconds=0)


def test_filesystem_type_reads_the_mount_table(tmp_path):
    if not os.path.exists("/proc/self/mounts"):
        pytest.skip("no /proc/self/mounts here")
    assert watch.filesystem_type(tmp_path) not in (None, "")
    assert watch._unescape_mount("/mnt/my\\040photos") == "/mnt/my photos"


# -- `clipdex watch` ----------------------------------------------------------------------
def test_cli_watch_indexes_changes_until_ctrl_c(photo_folder, tmp_path, monkeypatch):
    import _thread

    from typer.testing import CliRunner

    import indexer.model.encoders
    from retrieval.cli import app
    from tests.conftest import FakeEncoder

    monkeypatch.setattr(indexer.model.encoders, "load_encoder", lambda *a, **k: FakeEncoder())
    library = tmp_path / "lib"
    Library.open(library, create=True).close()  # so this test's reads never race its creation
    failures: list[BaseException] = []

    def count() -> int:
        with Library.open(library, read_only=True) as lib:
            return lib.catalog.count()

    def user() -> None:  # adds a photo, deletes one, then presses Ctrl-C
        try:
            wait_for(lambda: count() == 6)
            write_photo(photo_folder / "new.jpg", 61)
            wait_for(lambda: count() == 7)
            os.remove(photo_folder / "photo_5.jpg")
            wait_for(lambda: count() == 6)
        except BaseException as exc:
            failures.append(exc)
        finally:
            _thread.interrupt_main()

    threading.Thread(target=user, daemon=True).start()
    args = ["watch", str(photo_folder), "--library", str(library), "--json", "--workers", "1"]
    args += ["--debounce", "0.2", "--settle", "0.2"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert not failures, failures
    assert result.exit_code == 0, result.output
    batches = [json.loads(line) for line in result.stdout.splitlines()]
    # Every batch before the last printed its line (the last may be cut by the Ctrl-C).
    assert sum(b["indexed"] for b in batches) == 7 and batches[0]["number"] == 1
    assert "stopping after the current step" in result.stderr  # Ctrl-C set the stop flag
    assert "stopped after" in result.stderr
    assert count() == 6  # the deleted photo left


# -- `clipdex serve --watch` --------------------------------------------------------------
def test_serve_watch_shows_the_sync_in_api_info(photo_folder, tmp_path, fake_encoder):
    from tests.live_server import served

    library = tmp_path / "lib"
    timers = dict(watch_debounce=0.2, watch_settle=0.2)
    with served(library, fake_encoder, watch_paths=(photo_folder,), **timers) as (_, http):

        def sync() -> dict:
            return http.get("/api/info").json()["sync"]

        wait_for(lambda: sync()["batches"] >= 1)  # the catch-up of the six photos
        info = http.get("/api/info").json()
        assert info["sync"]["paths"] == [str(photo_folder)]
        assert info["sync"]["state"] == "watching" and info["sync"]["mode"] == "events"
        assert info["sync"]["indexed"] == 6 and info["images"] == 6
        write_photo(photo_folder / "new.jpg", 71)
        wait_for(lambda: sync()["indexed"] == 7)
        last = sync()["last_batch"]
        assert last["indexed"] == 1 and last["finished_at"] > 0 and sync()["pending"] == 0
        hits = http.get("/api/search", params={"q": "anything", "k": 100}).json()["results"]
        assert str(photo_folder / "new.jpg") in {hit["path"] for hit in hits}
        os.remove(photo_folder / "photo_2.jpg")
        wait_for(lambda: sync()["removed"] == 1)
        wait_for(lambda: http.get("/api/info").json()["images"] == 6)


def test_serve_without_watch_has_no_sync(tmp_path, fake_encoder):
    from tests.live_server import served

    with served(tmp_path / "lib", fake_encoder) as (_, http):
        assert http.get("/api/info").json()["sync"] is None


def test_serve_refuses_a_watch_folder_that_does_not_exist(tmp_path):
    from retrieval.server import Settings

    with pytest.raises(ConfigError, match="does not exist"):
        Settings(library=tmp_path / "lib", watch_paths=(tmp_path / "nope",))


def test_a_half_written_file_that_failed_is_read_again_once_complete(photos, tmp_path):
    folder = tmp_path / "camera"
    folder.mkdir()
    data = write_photo(tmp_path / "source.jpg", 8, size=256).read_bytes()
    syncer = photos.syncer([folder], INDEX, SyncOptions(**FAST))
    target = folder / "paused.jpg"
    with syncing(syncer):
        with open(target, "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            # The writer pauses for longer than the settle time: the half file is read.
            wait_for(lambda: totals(syncer, "failed") == 1, 20)
            assert [f["path"] for f in photos.failures()] == [str(target)]
            out.write(data[len(data) // 2 :])
        wait_for(lambda: totals(syncer, "indexed") == 1, 20)
    assert photos.failures() == []  # the failure was not final
    assert catalog_paths(photos.root) == {str(target)}


def test_serve_poll_without_watch_is_refused_with_a_clear_message(tmp_path):
    from typer.testing import CliRunner

    from retrieval.cli import app

    result = CliRunner().invoke(app, ["serve", "--poll", "5", "--library", str(tmp_path)])
    assert result.exit_code == 1
    assert "--poll applies to the --watch folders" in result.output
    missing = CliRunner().invoke(app, ["serve", "--watch", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
