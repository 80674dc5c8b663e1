"""The library itself damaged: index files and catalogs truncated, overwritten or bit-flipped,
stored vectors corrupted, the disk full during a checkpoint. Damage is refused with a message
naming `clipdex repair`, repair restores the exact library, and a full disk keeps the
previous checkpoint. Never a traceback, never silently wrong results.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import event
from typer.testing import CliRunner

from indexer.errors import DiskFull, LibraryDamaged
from indexer.ingest.pipeline import IndexOptions, index_paths
from indexer.ingest.repair import repair_library
from indexer.store import segments
from indexer.store.catalog import ImageRecord, vector_is_sound
from indexer.store.library import Library, index_problem
from retrieval.cli import app

runner = CliRunner()


def _photos(folder: Path, count: int, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{i:03d}.png")
    return folder


def _build(root: Path, folder: Path, encoder) -> None:
    with Library.open(root, create=True) as lib:
        index_paths(lib, encoder, [folder], IndexOptions(workers=1, checkpoint_every=16))


def _snapshot(root: Path) -> dict[str, list]:
    """Every photo's path with its 5 nearest neighbours' paths, as the index answers."""
    with Library.open(root) as lib:
        rows = lib.catalog.get_images(lib.catalog.ids())
        ids, vectors = lib.catalog.vectors(sorted(rows))
        _, found = lib.index.search(vectors, 5)
        return {rows[i]["path"]: [rows[j]["path"] for j in hits] for i, hits in zip(ids, found)}


def _open_index(root: Path) -> None:
    """Open the library and read its index (read on first use)."""
    with Library.open(root) as lib:
        len(lib.index)


def _index_file(root: Path) -> Path:
    (path,) = root.glob("vectors.*.faiss")
    return path


def _cli(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture
def built(tmp_path, fake_encoder):
    """A library of 40 photos and the answers it gives when sound."""
    folder = _photos(tmp_path / "photos", 40)
    root = tmp_path / "lib"
    _build(root, folder, fake_encoder)
    return root, folder, _snapshot(root)


# -- the index files -----------------------------------------------------------------------------
@pytest.fixture
def compacted(built):
    """The same library with its vectors folded into a base file (`clipdex optimize`)."""
    root, folder, sound = built
    assert _cli("optimize", "--library", str(root)).exit_code == 0
    return root, folder, sound


TRUNCATIONS = [
    (lambda data: data[: len(data) // 2], "truncated?"),
    (lambda data: data[:-1], "truncated?"),
    (lambda data: b"", "truncated?"),
]


@pytest.mark.parametrize(("damage", "symptom"), TRUNCATIONS, ids=["half", "last-byte", "empty"])
def test_truncated_base_file_is_refused_without_reading_it_then_repaired(
    compacted, damage, symptom, monkeypatch
):
    root, _, sound = compacted
    path = _index_file(root)
    path.write_bytes(damage(path.read_bytes()))
    read = _count_opens(monkeypatch, path)
    with pytest.raises(LibraryDamaged, match="clipdex repair") as caught:
        _open_index(root)
    assert symptom in str(caught.value)
    assert read == []  # refused on its size alone: the file was never opened
    _refused_then_repaired(root, sound, symptom)


def _count_opens(monkeypatch, path: Path) -> list:
    """Record every Python-level open of ``path`` (FAISS reads through its own C code:
    the size check must refuse before any read is attempted, so faiss.read_index too)."""
    import faiss

    opened: list = []
    real_read = faiss.read_index

    def read_index(name, *args):
        if Path(name) == path:
            opened.append(name)
        return real_read(name, *args)

    monkeypatch.setattr(faiss, "read_index", read_index)
    return opened


def test_bit_flip_in_base_vectors_is_found_by_repair(compacted):
    """An open checks size, header and count, not every byte: the full CRC is repair's."""
    root, _, sound = compacted
    path = _index_file(root)
    path.write_bytes(_flip(path.read_bytes(), len(path.read_bytes()) // 2))
    _refused_then_repaired(root, sound, "checksum mismatch", refused_on_open=False)


@pytest.mark.parametrize(
    ("damage", "symptom"),
    [*TRUNCATIONS[:2], (lambda data: _flip(data, len(data) // 2), "checksum mismatch")],
    ids=["half", "last-byte", "bit-flip"],
)
def test_damaged_delta_is_refused_then_repaired(built, damage, symptom):
    """The delta (vectors since the last compaction) is small: every open checks its CRC."""
    root, _, sound = built
    (path,) = root.glob("delta.*.vec")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(LibraryDamaged, match="clipdex repair") as caught:
        _open_index(root)
    assert symptom in str(caught.value)
    _refused_then_repaired(root, sound, symptom)


def test_missing_delta_is_damage_not_an_empty_library(built):
    root, _, sound = built
    (path,) = root.glob("delta.*.vec")
    path.unlink()
    with pytest.raises(LibraryDamaged, match="missing"):
        _open_index(root)
    _refused_then_repaired(root, sound, "missing")


def _refused_then_repaired(root: Path, sound, symptom: str, refused_on_open=True) -> None:
    if refused_on_open:
        refused = _cli("similar", "1", "--library", str(root), "--json")
        assert refused.exit_code == 1 and "Traceback" not in refused.output
        assert "clipdex repair" in refused.output and "damaged" in refused.output
    repaired = _cli("repair", "--library", str(root), "--json")
    assert repaired.exit_code == 0, repaired.output
    report = json.loads(repaired.stdout)
    assert report["catalog"] == "ok" and report["index_images"] == 40
    assert symptom in report["index_problem"]
    assert _snapshot(root) == sound
    again = json.loads(_cli("repair", "--library", str(root), "--json").stdout)
    assert again["index_problem"] is None


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]


def test_unreadable_stamp_is_damage(compacted):
    root, _, _ = compacted
    stamp = _index_file(root).with_name(_index_file(root).name + ".check")
    stamp.write_text("{not json")
    with pytest.raises(LibraryDamaged, match="unreadable stamp"):
        _open_index(root)


def test_index_file_without_stamp_is_rebuilt_from_the_catalog(compacted):
    """An index written before stamps existed is not trusted: the catalog is the truth."""
    root, _, sound = compacted
    path = _index_file(root)
    (root / "segments.json").unlink()  # as an older clipdex left it: no manifest either
    path.with_name(path.name + ".check").unlink()
    path.write_bytes(_flip(path.read_bytes(), len(path.read_bytes()) // 2))
    assert _snapshot(root) == sound


def test_repair_leaves_one_index_file_and_no_litter(built):
    root, _, _ = built
    (root / "vectors.999.faiss.abc123.tmp").write_bytes(b"half a write")
    assert _cli("repair", "--library", str(root)).exit_code == 0
    names = sorted(p.name for p in root.iterdir() if p.name.startswith(("vectors.", "delta.")))
    assert len(names) == 2 and names[1] == names[0] + ".check"
    assert not list(root.glob("*.tmp"))


# -- the catalog ---------------------------------------------------------------------------------
def test_truncated_catalog_is_refused_then_salvaged(built, fake_encoder):
    root, folder, sound = built
    catalog = root / "catalog.sqlite"
    size = catalog.stat().st_size
    with open(catalog, "r+b") as handle:
        handle.truncate(size * 6 // 10)
    with pytest.raises(LibraryDamaged, match="clipdex repair") as caught:
        _open_index(root)
    assert "truncated" in str(caught.value)
    info = _cli("info", "--library", str(root))
    assert info.exit_code == 1 and "clipdex repair" in info.output
    report = repair_library(root, lambda: fake_encoder, [folder])
    assert report.catalog == "salvaged" and report.rows_lost > 0
    assert Path(report.damaged_copy).stat().st_size == size * 6 // 10
    assert report.indexed.indexed == report.rows_lost  # the lost rows, encoded again
    assert _snapshot(root) == sound
    assert repair_library(root).catalog == "ok"


def test_overwritten_catalog_page_is_found_on_open(built, fake_encoder):
    """The images table's root page overwritten with garbage (a bad sector, a stray write)."""
    root, folder, sound = built
    catalog = root / "catalog.sqlite"
    with sqlite3.connect(catalog) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root_page = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name='images'"
        ).fetchone()
    conn.close()
    with open(catalog, "r+b") as handle:
        handle.seek((root_page[0] - 1) * page_size)
        handle.write(np.random.default_rng(0).bytes(page_size))
    with pytest.raises(LibraryDamaged, match="clipdex repair"):
        _open_index(root)
    report = repair_library(root, lambda: fake_encoder, [folder])
    assert report.catalog == "salvaged" and "images" in report.unreadable_tables
    assert report.indexed.indexed == 40
    assert _snapshot(root) == sound


def test_not_a_database_at_all(built, fake_encoder):
    root, folder, sound = built
    (root / "catalog.sqlite").write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(LibraryDamaged, match="not a SQLite database"):
        _open_index(root)
    report = repair_library(root, lambda: fake_encoder, [folder])
    assert report.catalog == "salvaged" and report.indexed.indexed == 40
    assert _snapshot(root) == sound


def test_damaged_stored_vectors_are_encoded_again(built, fake_encoder):
    root, _, sound = built
    with sqlite3.connect(root / "catalog.sqlite") as conn:
        conn.execute("UPDATE images SET vector = zeroblob(100) WHERE id = 3")
        nan = np.full(512, np.nan, dtype="<f4").tobytes()
        conn.execute("UPDATE images SET vector = ? WHERE id = 7", (nan,))
    conn.close()
    for path in _index_files(root):
        path.unlink()  # so the catalog's vectors are what an open rebuilds from
    with pytest.raises(LibraryDamaged, match="stored vector of image 3 is invalid"):
        _open_index(root)
    report = repair_library(root, lambda: fake_encoder)
    assert report.vectors_damaged == 2 and report.reencoded == 2 and report.not_recovered == []
    assert _snapshot(root) == sound
    with Library.open(root) as lib:
        rows = lib.catalog.unsound_vectors()
    assert rows == []


def test_damaged_vector_whose_file_is_gone_is_reported(built, fake_encoder):
    root, _, _ = built
    with sqlite3.connect(root / "catalog.sqlite") as conn:
        (path,) = conn.execute("SELECT path FROM images WHERE id = 5").fetchone()
        conn.execute("UPDATE images SET vector = zeroblob(2048) WHERE id = 5")
    conn.close()
    os.unlink(path)
    report = repair_library(root, lambda: fake_encoder)
    assert report.not_recovered == [(path, "the file is gone")]
    with Library.open(root) as lib:
        assert lib.catalog.id_for_path(path) is None and len(lib.index) == 39


def test_repair_has_help():
    result = _cli("repair", "--help")
    assert result.exit_code == 0
    assert "--library" in result.output and "--json" in result.output


def test_repair_without_a_library_is_a_clear_error(tmp_path):
    result = _cli("repair", "--library", str(tmp_path / "none"))
    assert result.exit_code == 1 and "nothing to repair" in result.output


def test_stored_vector_check():
    unit = np.zeros(512, dtype="<f4")
    unit[0] = 1
    assert vector_is_sound(unit.tobytes())
    assert not vector_is_sound((unit * 2).tobytes())
    assert not vector_is_sound(unit.tobytes()[:-4])
    assert not vector_is_sound(None)


# -- disk full -------------------------------------------------------------------------------------
def _index_files(root: Path) -> list[Path]:
    """The base, its stamp, the delta files and the manifest."""
    return [*root.glob("vectors.*"), *root.glob("delta.*"), *root.glob("segments.json*")]


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in _index_files(root)}


def test_disk_full_while_writing_the_index_keeps_the_previous_checkpoint(
    built, tmp_path, fake_encoder, monkeypatch
):
    """The catalog commit succeeds, then the delta append runs out of space part-way."""
    root, _, _ = built
    before = _files(root)

    def write_until_full(fd, data):
        os.write(fd, data[:4096])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(segments, "write_all", write_until_full)
    more = _photos(tmp_path / "more", 5, seed=1)
    with Library.open(root) as lib, pytest.raises(DiskFull, match="keeps its previous checkpoint"):
        index_paths(lib, fake_encoder, [more], IndexOptions(workers=1))
    assert _files(root) == before  # the previous delta and manifest, byte for byte
    monkeypatch.undo()
    with Library.open(root) as lib:  # the catalog had committed: nothing is lost
        assert len(lib.catalog.ids()) == 45
        assert sorted(lib.index.ids()) == sorted(lib.catalog.ids())


def test_disk_full_in_the_catalog_commit_keeps_the_previous_checkpoint(
    built, tmp_path, fake_encoder
):
    """SQLite's own SQLITE_FULL (here through max_page_count): the transaction rolls back."""
    root, _, sound = built
    before = _files(root)
    # Enough new rows (~2.3 KB each) to need new pages, not just fill the free room of the
    # catalog's partly filled ones (32 KiB pages hold 13 rows).
    more = _photos(tmp_path / "more", 40, seed=1)
    with Library.open(root) as lib:
        pages = lib.catalog.engine.connect().exec_driver_sql("PRAGMA page_count").scalar()
        lib.catalog.engine.dispose()
        event.listen(
            lib.catalog.engine,
            "connect",
            lambda conn, _: conn.execute(f"PRAGMA max_page_count = {pages}"),
        )
        with pytest.raises(DiskFull, match="free some space"):
            index_paths(lib, fake_encoder, [more], IndexOptions(workers=1))
    assert _files(root) == before
    assert _snapshot(root) == sound


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MB tmpfs: a real file system that really runs out of space (needs mount rights)."""
    where = tmp_path / "tiny"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (not root?): {mounted.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.mark.parametrize("room", [0, 120_000, 200_000], ids=["none", "some", "more"])
def test_real_disk_full_keeps_the_previous_checkpoint(tiny_disk, tmp_path, fake_encoder, room):
    """The disk fills up mid-run, leaving ``room`` bytes: depending on how much, SQLite's
    commit or the index write is the one that fails (on this machine 'none' fails in
    SQLite, 'some' and 'more' in the index write). Either way: DiskFull, the previous index
    file intact, committed rows kept, and a later run completes."""
    root = tiny_disk / "lib"
    _build(root, _photos(tmp_path / "first", 20), fake_encoder)
    before = _files(root)
    more = _photos(tmp_path / "more", 30, seed=1)
    filler = tiny_disk / "filler"
    with Library.open(root) as lib:  # the disk fills up while an index run has it open
        _fill(filler, leave=room)
        with pytest.raises(DiskFull, match="no space left"):
            index_paths(lib, fake_encoder, [more], IndexOptions(workers=1, checkpoint_every=8))
    _assert_whole_checkpoint(root, before)
    filler.unlink()
    with Library.open(root) as lib:
        assert 20 <= len(lib.catalog.ids()) < 50
        assert sorted(lib.index.ids()) == sorted(lib.catalog.ids())
        index_paths(lib, fake_encoder, [more], IndexOptions(workers=1))
        assert len(lib.catalog.ids()) == 50
        assert sorted(lib.index.ids()) == sorted(lib.catalog.ids())


def _assert_whole_checkpoint(root: Path, before: dict[str, bytes]) -> None:
    """The files left are one whole checkpoint: the earlier one byte for byte, or a later
    one that passes its stamp; no temporary file of the failed write is left behind."""
    files = _files(root)
    assert not [name for name in files if name.endswith(".tmp")]
    if files != before:
        assert index_problem(root) is None  # every byte the manifest counts checks out
        with Library.open(root) as lib:
            assert len(lib.index) > 20


def _fill(path: Path, leave: int = 0) -> None:
    """Write zeros until the file system is full, then give back ``leave`` bytes."""
    with open(path, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        handle.truncate(max(0, handle.tell() - leave))


def test_a_damaged_video_frame_vector_takes_its_video_back_to_encoding(tmp_path):
    """A frame's stored vector (frames table) is checked as a photo's is: the video's row
    and frames go, the index is rebuilt without them, and the video is named to re-encode."""
    root = tmp_path / "lib"
    rng = np.random.default_rng(1)
    unit = rng.standard_normal((6, 512)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    video = ImageRecord(str(tmp_path / "clip.mp4"), 1, 1, "f" * 64, unit[0], 64, 48, "MP4")
    video.kind, video.frame_time = "video", 0.0
    video.frame_times, video.frame_vectors = [0.0, 1.0, 2.0], unit[:3]
    photo = ImageRecord(str(tmp_path / "a.jpg"), 1, 1, "a" * 64, unit[4], 64, 48, "JPEG")
    with Library.open(root, create=True) as lib:
        video_id, photo_id = lib.catalog.commit_batch([video, photo])
        assert len(lib.catalog.ids()) == 4  # the video, two more frames, the photo
    with sqlite3.connect(root / "catalog.sqlite") as conn:
        conn.execute("UPDATE frames SET vector = zeroblob(2048) WHERE image_id = ?", (video_id,))
    conn.close()
    with Library.open(root) as lib:
        assert lib.catalog.unsound_vectors() == [(video_id, video.path)]
    report = repair_library(root)
    assert report.vectors_damaged == 1
    assert report.not_recovered == [(video.path, "the file is gone")]
    with Library.open(root) as lib:
        assert lib.catalog.ids().tolist() == [photo_id] and len(lib.index) == 1
