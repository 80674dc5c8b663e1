"""Photos on unreliable storage: files that vanish or change mid-run, unreadable entries,
symlink loops, non-UTF-8 names, very long paths. Every case ends in an indexed file or a
recorded reason, never a crash and never a vector stored under the wrong file state.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.ingest.pipeline import IndexOptions, index_paths
from indexer.ingest.workers import decode_file
from indexer.paths import display, from_db, to_db
from indexer.store.library import Library

REPO = Path(__file__).resolve().parents[1]
HOSTILE = "tests.test_storage:storage_hostile_decoder"


def _png(path: str | bytes | Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    with open(path, "wb") as handle:
        Image.fromarray(pixels).save(handle, format="PNG")


def storage_hostile_decoder(data: bytes, path: str, max_megapixels: float):
    """Runs in a decode worker: acts on the file system as marker files say, then decodes.

    ``X.vanish`` deletes X; ``X.change`` makes X grow; ``X.kill`` deletes the file it names
    (one the worker has not read yet). Markers have no image suffix, so nothing indexes them.
    """
    if os.path.exists(path + ".vanish"):
        os.unlink(path)
    if os.path.exists(path + ".change"):
        with open(path, "ab") as handle:
            handle.write(b"\0" * 64)
    if os.path.exists(path + ".kill"):
        with open(path + ".kill") as handle:
            os.unlink(os.path.join(os.path.dirname(path), handle.read()))
    return decode_file(data, path, max_megapixels)


def _mark(path: Path, action: str, text: str = "") -> Path:
    marker = path.with_name(path.name + "." + action)
    marker.write_text(text)
    return marker


def _index(library: Library, encoder, *paths, **options):
    options = IndexOptions(workers=1, decoder=HOSTILE, **options)
    return index_paths(library, encoder, list(paths), options)


def _paths(library: Library) -> list[str]:
    ids = library.catalog.ids()
    return sorted(row["path"] for row in library.catalog.get_images(ids).values())


def _consistent(library: Library) -> None:
    assert sorted(library.index.ids()) == sorted(library.catalog.ids())


@pytest.fixture
def library(tmp_path):
    with Library.open(tmp_path / "lib", create=True) as lib:
        yield lib


# -- files that move under the indexer ---------------------------------------------------------
def test_file_that_vanishes_or_changes_mid_run_is_not_stored(library, tmp_path, fake_encoder):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(["a.png", "b.png", "c.png", "d.png", "e.png"]):
        _png(folder / name, i)
    _mark(folder / "b.png", "vanish")
    changing = _mark(folder / "c.png", "change")
    _mark(folder / "d.png", "kill", "e.png")  # e.png goes before the worker reads it
    report = _index(library, fake_encoder, folder)
    reasons = dict(report.failures)
    assert reasons.pop(str(folder / "b.png")) == "the file disappeared while being indexed"
    assert reasons.pop(str(folder / "e.png")) == "the file disappeared while being indexed"
    assert reasons.pop(str(folder / "c.png")).startswith("the file changed while being indexed")
    assert reasons == {}
    assert _paths(library) == [str(folder / "a.png"), str(folder / "d.png")]
    _consistent(library)
    # The next run takes the changed file as it now is, and forgets the vanished ones.
    changing.unlink()
    again = _index(library, fake_encoder, folder)
    assert again.failures == [] and again.unchanged == 2 and again.indexed == 1
    assert _paths(library) == [str(folder / n) for n in ("a.png", "c.png", "d.png")]
    assert library.catalog.failure_count() == 0
    _consistent(library)


def test_indexed_file_that_vanishes_while_reindexed_leaves_no_stale_row(
    library, tmp_path, fake_encoder
):
    folder = tmp_path / "photos"
    folder.mkdir()
    _png(folder / "a.png", 1)
    _png(folder / "b.png", 2)
    _index(library, fake_encoder, folder)
    old_id = library.catalog.id_for_path(str(folder / "a.png"))
    # a.png is edited, and deleted while it is being indexed again.
    _png(folder / "a.png", 3)
    _mark(folder / "a.png", "vanish")
    report = _index(library, fake_encoder, folder)
    assert report.failures == [(str(folder / "a.png"), "the file disappeared while being indexed")]
    assert old_id not in library.index.ids()
    assert _paths(library) == [str(folder / "b.png")]
    _consistent(library)


# -- links and names -----------------------------------------------------------------------------
def test_symlink_loops_and_broken_links_are_reported_not_followed(library, tmp_path, fake_encoder):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    _png(folder / "sub" / "real.png", 1)
    os.symlink("..", folder / "sub" / "up")  # folder loop
    os.symlink(folder, folder / "sub" / "again")  # the same folder by another name
    os.symlink("self.png", folder / "self.png")  # a link to itself
    os.symlink("ping.png", folder / "pong.png")  # two links pointing at each other
    os.symlink("pong.png", folder / "ping.png")
    os.symlink("nowhere.png", folder / "broken.png")
    report = _index(library, fake_encoder, folder)
    reasons = dict(report.failures)
    for name in ("self.png", "ping.png", "pong.png"):
        assert reasons[str(folder / name)] == "symlink loop: the link leads back to itself"
    assert reasons[str(folder / "broken.png")] == "broken symlink: its target does not exist"
    assert _paths(library) == [str(folder / "sub" / "real.png")]


NAMES = [
    b"caf\xe9.png",  # Latin-1 from an old camera or a Windows share
    b"\xff\xfe\x80.png",  # nothing decodable at all
    "s\u00e9paration \u7167\u7247.png".encode(),  # ordinary UTF-8, untouched
    "escape \ufdd0 char.png".encode(),  # the storage escape character itself
    b"mixed \xc3\xa9 and \xe9.png",
]


def test_non_utf8_names_are_stored_losslessly(library, tmp_path, fake_encoder):
    folder = os.fsencode(tmp_path / "photos")
    os.mkdir(folder)
    os.mkdir(folder + b"/d\xe9j\xe0")  # a non-UTF-8 folder too
    for i, name in enumerate(NAMES):
        _png(folder + b"/" + name, i)
    _png(folder + b"/d\xe9j\xe0/inside.png", 99)
    report = _index(library, fake_encoder, os.fsdecode(folder))
    assert report.failures == [] and report.indexed == len(NAMES) + 1
    stored = {os.fsencode(p) for p in _paths(library)}
    assert stored == {folder + b"/" + n for n in NAMES} | {folder + b"/d\xe9j\xe0/inside.png"}
    # Incremental runs find them again by path (prefix queries work on the stored form).
    assert _index(library, fake_encoder, os.fsdecode(folder)).unchanged == len(NAMES) + 1
    assert _index(library, fake_encoder, os.fsdecode(folder + b"/d\xe9j\xe0")).unchanged == 1
    os.unlink(folder + b"/caf\xe9.png")
    assert _index(library, fake_encoder, os.fsdecode(folder)).removed == 1
    target = os.fsdecode(folder + b"/\xff\xfe\x80.png")
    assert library.catalog.id_for_path(target) is not None


def test_stored_and_display_forms():
    real = os.fsdecode(b"/p/caf\xe9 \xef\xb7\x90.png")
    assert to_db(real) == "/p/caf\ufdd0E9 \ufdd0\ufdd0.png"
    assert from_db(to_db(real)) == real
    assert display(real) == "/p/caf\\xe9 \ufdd0.png"
    assert to_db("/plain/été.png") == "/plain/été.png"
    folder = os.fsdecode(b"/p/d\xe9j\xe0")
    assert to_db(folder + "/x.png").startswith(to_db(folder + "/"))


def test_cli_prints_and_emits_non_utf8_paths(library, tmp_path, fake_encoder):
    folder = tmp_path / "photos"
    folder.mkdir()
    os.mkdir(os.fsencode(folder) + b"/caf\xe9 [")  # so the path reads "[/]", rich markup
    raw = os.fsencode(folder) + b"/caf\xe9 [/] [bold].png"
    _png(raw, 1)
    _index(library, fake_encoder, folder)
    lib = str(library.root)
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"}
    cli = [sys.executable, "-m", "retrieval.cli"]
    emitted = subprocess.run(
        [*cli, "similar", "1", "--library", lib, "--json"], env=env, capture_output=True
    )
    assert emitted.returncode == 0, emitted.stderr
    (result,) = json.loads(emitted.stdout)["results"]
    assert os.fsencode(result["path"]) == raw  # lossless through JSON
    shown = subprocess.run([*cli, "similar", "1", "--library", lib], env=env, capture_output=True)
    assert shown.returncode == 0, shown.stderr
    assert b"caf\\xe9 [/] [bold].png" in shown.stdout  # readable, and not taken as markup


# -- long paths -----------------------------------------------------------------------------------
def test_long_names_and_paths(library, tmp_path, fake_encoder):
    folder = tmp_path / "photos"
    deep = folder / "/".join(["d" * 60] * 5)  # a path well over 255 bytes
    deep.mkdir(parents=True)
    longest = "é" * 125 + ".png"  # 254 bytes: the longest name ext4 allows is 255
    _png(deep / longest, 1)
    beyond = _tree_beyond_path_max(folder)
    report = _index(library, fake_encoder, folder)
    assert _paths(library) == [str(deep / longest)]
    assert len(os.fsencode(_paths(library)[0])) > 255
    ((where, reason),) = report.failures
    assert beyond.startswith(where) and len(os.fsencode(where)) > 4096
    assert "File name too long" in reason


def _tree_beyond_path_max(folder: Path) -> str:
    """Folders nested past PATH_MAX (4096 bytes), built with dir fds, with an image inside."""
    name = "n" * 250
    fd = os.open(folder, os.O_RDONLY)
    path = str(folder)
    for _ in range(18):
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd, path = child, f"{path}/{name}"
    image = os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    with os.fdopen(image, "wb") as handle:
        Image.new("RGB", (32, 32)).save(handle, format="PNG")
    os.close(fd)
    return f"{path}/deep.png"


# -- permissions ----------------------------------------------------------------------------------
DRIVER = """
import json, sys
from pathlib import Path
from indexer.store.library import Library
from indexer.ingest.pipeline import IndexOptions, index_paths
from tests.conftest import FakeEncoder

locked = Path(sys.argv[3])
try:
    locked.read_bytes()
    print(json.dumps({"bypass": True}))
    sys.exit(0)
except PermissionError:
    pass
with Library.open(sys.argv[1], create=True) as lib:
    report = index_paths(lib, FakeEncoder(), [sys.argv[2]], IndexOptions(workers=1))
    ids = lib.catalog.ids()
    paths = sorted(r["path"] for r in lib.catalog.get_images(ids).values())
print(json.dumps({"failures": report.failures, "paths": paths}))
"""

PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


def _without_dac_override() -> None:
    """preexec_fn: drop the capabilities that let root ignore file permissions."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) refused")


def test_unreadable_file_and_folder_are_recorded(tmp_path):
    """Tests run as root, which reads anything: the indexer runs in a child process whose
    bounding set lacks CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so permissions apply to it."""
    folder = tmp_path / "photos"
    (folder / "closed").mkdir(parents=True)
    _png(folder / "open.png", 1)
    _png(folder / "secret.png", 2)
    _png(folder / "closed" / "inside.png", 3)
    (folder / "secret.png").chmod(0)
    (folder / "closed").chmod(0)
    try:
        out = _run_unprivileged(tmp_path / "lib", folder, folder / "secret.png")
    finally:
        (folder / "closed").chmod(0o755)
    if out.get("bypass"):
        pytest.skip("cannot drop root's permission override here (no CAP_SETPCAP?)")
    reasons = dict(map(tuple, out["failures"]))
    assert reasons[str(folder / "secret.png")] == "permission denied (check the file's permissions)"
    assert reasons[str(folder / "closed")] == "cannot list folder: Permission denied"
    assert out["paths"] == [str(folder / "open.png")]


def _run_unprivileged(library: Path, folder: Path, probe: Path) -> dict:
    preexec = _without_dac_override if os.geteuid() == 0 else None
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", DRIVER, str(library), str(folder), str(probe)]
    try:
        done = subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=120, preexec_fn=preexec
        )
    except subprocess.SubprocessError as exc:  # preexec_fn failed: no CAP_SETPCAP
        pytest.skip(f"cannot drop root's permission override here: {exc}")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])
