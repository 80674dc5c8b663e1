"""One library, several processes: searches while `clipdex index` writes, and two writers.

A search sees one checkpoint, never a mix: since this index run only adds photos (ids grow
with each commit), a consistent answer holds exactly the photos with id <= some m, each
scored as its stored vector says. A second `index` (or a `repair`) is refused at once with
a clear message while the first holds the lock, and the first then finishes unharmed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.store.library import Library
from tests.clirun import check_library, cli_env, clipdex, generation, make_photos, warm_model

N_FIRST, N_MORE = 10, 50


def _index_args(photos: Path, library: Path, weights: Path) -> list[str]:
    return clipdex(
        "index",
        str(photos),
        *("--library", str(library), "--weights", str(weights)),
        *("--batch-size", "2", "--checkpoint-every", "2", "--workers", "1", "--json"),
    )


def _run(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def setup(tmp_path, spread_checkpoint):
    """A library holding N_FIRST photos, and a folder of N_MORE more to index."""
    warm_model(spread_checkpoint)
    library = tmp_path / "lib"
    make_photos(tmp_path / "first", N_FIRST, seed=1)
    first = _run(_index_args(tmp_path / "first", library, spread_checkpoint))
    assert first.returncode == 0, first.stderr
    make_photos(tmp_path / "more", N_MORE, seed=2)
    return library, tmp_path / "more", spread_checkpoint


@pytest.mark.slow
def test_searches_during_indexing_see_whole_checkpoints(setup):
    library, more, weights = setup
    query_text = "a photo of a dog"
    text_vector = _embed_text(query_text, weights)
    writer = subprocess.Popen(
        _index_args(more, library, weights),
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    answers: list[tuple[str, list[dict]]] = []
    try:
        while writer.poll() is None:
            kind = "text" if len(answers) % 4 == 3 else "photo"
            query = ["search", query_text] if kind == "text" else ["similar", "1"]
            args = clipdex(*query, "-k", "1000", "--library", str(library), "--json")
            if kind == "text":
                args += ["--weights", str(weights)]
            answers.append((kind, _search_racing(args, writer, library)))
    finally:
        writer.send_signal(signal.SIGCONT)
    assert writer.wait() == 0, writer.stderr.read().decode()
    writer.stdout.close()
    writer.stderr.close()
    assert len(check_library(library)) == N_FIRST + N_MORE
    ids, vectors = _final_vectors(library)
    sizes = {len(results) for _, results in answers}
    for kind, results in answers:
        query = text_vector if kind == "text" else vectors[ids.index(1)]
        _assert_one_checkpoint(results, ids, vectors, query)
    assert len(sizes) >= 3, f"the searches saw too few checkpoints to tell: {sorted(sizes)}"
    print(f"\n{len(answers)} searches during indexing saw {len(sizes)} different checkpoints")


def _search_racing(args: list[str], writer: subprocess.Popen, library: Path) -> list[dict]:
    """One search run while the writer writes; the writer then held until the next search.

    The writer goes on (SIGCONT) as the search starts and is stopped (SIGSTOP) once it has
    written one more checkpoint; if the search ended first, the writer goes on until it has.
    So every search overlaps writing and consecutive searches see the library one or two
    checkpoints apart, however fast this machine runs either process (a free-running writer
    could finish before three searches had started).
    """
    start = generation(library)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # pipes fill up
        search = subprocess.Popen(args, env=cli_env(), stdout=out, stderr=err)
        writer.send_signal(signal.SIGCONT)
        _pace_writer(writer, library, start, search)
        out.seek(0), err.seek(0)
        assert search.wait() == 0, f"a search failed during indexing: {err.read().decode()}"
        return json.loads(out.read())["results"]


def _pace_writer(writer, library: Path, start: int, search: subprocess.Popen) -> None:
    """Stop the writer once it is past checkpoint ``start``: during the search, or after."""
    deadline = time.monotonic() + 300
    while search.poll() is None:
        if generation(library) > start:
            writer.send_signal(signal.SIGSTOP)
        _tick(deadline)
    writer.send_signal(signal.SIGCONT)
    while generation(library) <= start and writer.poll() is None:
        _tick(deadline)
    writer.send_signal(signal.SIGSTOP)


def _tick(deadline: float) -> None:
    assert time.monotonic() < deadline, "no progress in 300 s"
    time.sleep(0.02)


def _embed_text(text: str, weights: Path) -> np.ndarray:
    done = _run(clipdex("embed", "--text", text, "--weights", str(weights), "--json"))
    assert done.returncode == 0, done.stderr
    return np.asarray(json.loads(done.stdout)["vector"], dtype=np.float32)


def _final_vectors(library: Path) -> tuple[list[int], np.ndarray]:
    with Library.open(library) as lib:
        ids, vectors = lib.catalog.vectors(lib.catalog.ids())
    return [int(i) for i in ids], vectors


def _assert_one_checkpoint(results: list[dict], ids: list[int], vectors, query) -> None:
    """Exactly the photos committed up to one checkpoint, each with its true score."""
    got = [r["id"] for r in results]
    assert len(got) == len(set(got)) and got, "duplicate or no results"
    assert sorted(got) == [i for i in ids if i <= max(got)], "a mix of two checkpoints"
    for result in results:
        true = float(vectors[ids.index(result["id"])] @ query)
        assert result["score"] == pytest.approx(true, abs=2e-5), "a score from another vector"
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.slow
def test_second_writer_is_refused_and_first_finishes(setup):
    library, more, weights = setup
    start = generation(library)
    first = subprocess.Popen(
        _index_args(more, library, weights),
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while generation(library) <= start:  # it holds the lock and has written a checkpoint
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first index run made no progress"
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # hold it mid-run, lock held, for as long as needed
        for command in (_index_args(more, library, weights), _repair_args(library)):
            began = time.monotonic()
            second = _run(command, timeout=120)
            assert second.returncode == 1, second.stdout + second.stderr
            assert "another clipdex process is indexing into" in second.stderr
            assert "Traceback" not in second.stderr and len(second.stderr.splitlines()) == 1
            assert time.monotonic() - began < 20, "refused only after loading the model"
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=600) == 0, first.stderr.read().decode()
    first.stdout.close()
    first.stderr.close()
    assert len(check_library(library)) == N_FIRST + N_MORE


def _repair_args(library: Path) -> list[str]:
    return clipdex("repair", "--library", str(library))


WRITER = """
import os
import sys
import numpy as np
from indexer.store.catalog import ImageRecord
from indexer.store.library import Library
from indexer.model.identity import l2_normalise

rng = np.random.default_rng(0)
with Library.open(sys.argv[1], create=True) as lib, lib.writing():
    for step in range(int(sys.argv[2])):
        if os.path.exists(sys.argv[3]):  # the readers have seen enough
            break
        vectors = l2_normalise(rng.standard_normal((2, 512)))
        records = [
            ImageRecord(f"/p/{step}-{i}.jpg", 1, 1, f"{step}-{i}", vectors[i], 8, 8)
            for i in range(2)
        ]
        ids = lib.catalog.commit_batch(records)
        lib.index.add(np.asarray(ids), vectors)
        lib.checkpoint()
"""


def test_readers_racing_a_fast_writer_always_open_a_whole_checkpoint(tmp_path):
    """Checkpoints every few milliseconds, each deleting the file before it: a reader that
    picked a file just deleted looks again, and never sees a mix or an error.

    The writer goes on until the readers have opened the library 40 times and seen 10
    different checkpoints (it stops early only at 100,000 steps), so how many opens raced
    it is counted, not left to the relative speed of two processes."""
    root = tmp_path / "lib"
    Library.open(root, create=True).close()
    enough = tmp_path / "enough"
    command = [sys.executable, "-c", WRITER, str(root), "100000", str(enough)]
    writer = subprocess.Popen(command, env=cli_env())
    opens, seen = 0, set()
    deadline = time.monotonic() + 300
    while writer.poll() is None and (opens < 40 or len(seen) < 10):
        assert time.monotonic() < deadline, f"{opens} opens saw {len(seen)} checkpoints"
        for mmap in (True, False):
            with Library.open(root, mmap=mmap) as lib:
                ids = sorted(int(i) for i in lib.index.ids())
                assert ids == list(range(1, len(ids) + 1)), "not one checkpoint"
                lib.refresh()
                assert len(lib.index) >= len(ids)
            opens += 1
            seen.add(len(ids))
    enough.touch()
    assert writer.wait(timeout=120) == 0
    assert opens >= 40 and len(seen) >= 10, f"{opens} opens saw {len(seen)} checkpoints"
