"""The whole shared corpus: every should-index file indexed, every other file indexed or
listed with a reason, and the run completes without crashing or hanging."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from indexer.errors import DecodeError
from indexer.ingest.decode import IMAGE_SUFFIXES, decode_for_model
from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library

# The MANIFEST's expectations were written against Pillow + pillow-heif. clipdex now also
# reads camera RAW (rawpy/LibRaw), JPEG XL (pillow-jxl-plugin) and, with olefile installed,
# Pillow's FlashPix and MIC plugins work. So some rows change:
#
# Refused there for want of a decoder, read now: these must be indexed.
NOW_READ = {"odd/pillow/input_bw_one_band.fpx", "odd/pillow/hopper.mic"}
# "should-index" there because Pillow read the 8x8 / 1x1 TIFF thumbnail in the first IFD of
# these exiftool metadata stubs, whose sensor data was stripped. Read as the RAWs they are,
# they hold no picture: refusing them with that reason is the honest outcome.
NOW_REFUSED = {
    "odd/exiftool-stubs/DNG.dng": "truncated camera RAW (DNG): 13662 bytes cannot hold",
    "odd/exiftool-stubs/PhaseOne.iiq": "truncated camera RAW (Phase One IIQ)",
}
# Still refused now that a decoder exists, because the files themselves are damaged stubs
# (a few KB where the sensor data needs MBs): the reason must name the real problem, not
# "unsupported format".
STILL_REFUSED = {
    "odd/exiftool-stubs/JXL.jxl": "corrupt JPEG XL",
    "odd/exiftool-stubs/JXL2.jxl": "corrupt JPEG XL",
    "odd/exiftool-stubs/CanonRaw.cr3": "truncated camera RAW (Canon CR3)",
    "odd/exiftool-stubs/FujiFilm.raf": "truncated camera RAW (Fujifilm RAF)",
    "odd/exiftool-stubs/Nikon.nef": "truncated camera RAW (Nikon NEF)",
    "odd/exiftool-stubs/Panasonic.rw2": "truncated camera RAW (Panasonic RW2)",
}


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
    must_index = must_index - {str(corpus / p) for p in NOW_REFUSED}
    must_index |= {str(corpus / p) for p in NOW_READ}
    missing = sorted(must_index - indexed)
    assert not missing, [(p, failed.get(p)) for p in missing]
    unaccounted = [p for p in expected if p not in indexed and not failed.get(p)]
    assert not unaccounted
    assert all(reason.strip() for reason in failed.values())
    for relative, reason in {**NOW_REFUSED, **STILL_REFUSED}.items():
        assert failed[str(corpus / relative)].startswith(reason), relative
    assert report.indexed + report.reused == len(indexed - set(by_name))
    print(f"\ncorpus: {len(indexed)} indexed, {len(failed)} listed as failed")


@pytest.mark.parametrize("relative", sorted(NOW_READ))
def test_files_refused_for_want_of_a_decoder_are_read_now(corpus, relative):
    pixels, info = decode_for_model(str(corpus / relative))
    assert pixels.shape == (3, 256, 256) and info.width > 0
    assert pixels.std() > 0.01  # a picture, not a flat fill


@pytest.mark.parametrize("relative", sorted({**NOW_REFUSED, **STILL_REFUSED}))
def test_damaged_raw_and_jxl_stubs_are_refused_with_their_real_reason(corpus, relative):
    reason = {**NOW_REFUSED, **STILL_REFUSED}[relative]
    with pytest.raises(DecodeError) as caught:
        decode_for_model(str(corpus / relative))
    assert str(caught.value).startswith(reason)
