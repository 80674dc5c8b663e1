"""The whole shared corpus: every should-index file indexed, every other file indexed or
listed with a reason, and the run completes without crashing or hanging."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from indexer.ingest.decode import IMAGE_SUFFIXES
from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library


def _manifest(corpus: Path) -> dict[str, str]:
    with open(corpus / "MANIFEST.tsv", newline="") as handle:
        rows = csv.DictReader(handle, delimiter="\t")
        return {str(corpus / row["path"]): row["expected"] for row in rows}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_whole_corpus(tmp_path, corpus, fake_encoder):
    expected = _manifest(corpus)
    with Library.open(tmp_path / "lib", create=True) as library:
        report = index_paths(library, fake_encoder, [corpus])
        # Files whose name says "not an image" (.doc, .tar, no suffix...) are not picked up
        # from a folder; given by name, they too must be refused with a reason.
        by_name = [p for p in expected if Path(p).suffix.lower() not in IMAGE_SUFFIXES]
        index_paths(library, fake_encoder, by_name)
        indexed = {
            row["path"] for row in library.catalog.get_images(library.catalog.ids()).values()
        }
        failed = {row["path"]: row["error"] for row in library.catalog.list_failures()}
    must_index = {p for p, e in expected.items() if e.startswith("should-index")}
    missing = sorted(must_index - indexed)
    assert not missing, [(p, failed.get(p)) for p in missing]
    unaccounted = [p for p in expected if p not in indexed and not failed.get(p)]
    assert not unaccounted
    assert all(reason.strip() for reason in failed.values())
    assert report.indexed + report.reused == len(indexed - set(by_name))
    print(f"\ncorpus: {len(indexed)} indexed, {len(failed)} listed as failed")
