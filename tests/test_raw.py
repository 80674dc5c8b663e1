"""Camera RAW (rawpy/LibRaw) and JPEG XL (pillow-jxl-plugin) decoding.

The RAW files are DNGs written here from the shipped sample photos (tests/rawfakes.py):
one with an embedded JPEG preview (the fast path), one without (the half-size demosaic),
oriented ones, broken ones. The JPEG XL files are written by the plugin itself.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.errors import DecodeError, ImageTooLarge
from indexer.ingest import raw
from indexer.ingest.decode import IMAGE_SUFFIXES, decode_for_model, open_rgb
from indexer.ingest.pipeline import index_paths
from indexer.store.library import Library
from tests.rawfakes import jpeg_bytes, write_dng

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "samples"


@pytest.fixture(scope="module")
def puppy() -> Image.Image:
    return Image.open(SAMPLES / "puppy.jpg").convert("RGB")  # 640x512


def _mad(image: Image.Image, reference: Image.Image) -> float:
    """Mean absolute difference (8-bit levels) after bringing ``reference`` to the same size."""
    ours = np.asarray(image.convert("RGB"), dtype=np.float64)
    theirs = np.asarray(reference.resize(image.size, Image.Resampling.BILINEAR), np.float64)
    return float(np.abs(ours - theirs).mean())


# -- the two decode paths ------------------------------------------------------------------------
def test_preview_path_uses_the_embedded_jpeg(tmp_path, puppy):
    path = write_dng(tmp_path / "shot.dng", puppy, preview=jpeg_bytes(puppy, 600))
    image, info = open_rgb(path)
    assert image.size == (600, 480)  # the preview's size: nothing was demosaiced
    assert (info.width, info.height, info.format) == (640, 512, "DNG")  # the sensor's
    assert _mad(image, puppy) < 4


def test_demosaic_path_without_a_preview_is_close_to_the_source(tmp_path, puppy):
    path = write_dng(tmp_path / "shot.dng", puppy)
    image, info = open_rgb(path)
    assert image.size == (320, 256)  # half size: one RGB pixel per Bayer cell
    assert (info.width, info.height) == (640, 512)
    # LibRaw's default rendering (BT.709 gamma, auto-brightness) is not the photo's exact
    # tone curve, but the picture is the same: a different photo is > 50 levels away.
    assert _mad(image, puppy) < 20
    other = Image.open(SAMPLES / "black_cat.jpg").convert("RGB")
    assert _mad(image, other) > 2 * _mad(image, puppy)


def test_a_preview_too_small_for_the_model_is_not_used(tmp_path, puppy):
    path = write_dng(tmp_path / "shot.dng", puppy, preview=jpeg_bytes(puppy, 160))
    image, _ = open_rgb(path)
    assert image.size == (320, 256)  # demosaiced: a 160x128 preview is below 256 pixels


def test_a_preview_showing_another_crop_is_not_used(tmp_path, puppy):
    square = jpeg_bytes(puppy.crop((64, 0, 576, 512)), 512)
    image, _ = open_rgb(write_dng(tmp_path / "shot.dng", puppy, preview=square))
    assert image.size == (320, 256)


def test_both_paths_give_nearly_the_same_model_input(tmp_path, puppy):
    fast = write_dng(tmp_path / "fast.dng", puppy, preview=jpeg_bytes(puppy, 600))
    slow = write_dng(tmp_path / "slow.dng", puppy)
    a, _ = decode_for_model(fast)
    b, _ = decode_for_model(slow)
    assert float(np.abs(a - b).mean()) < 0.08  # model inputs in [0, 1]


# -- orientation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("preview", [False, True], ids=["demosaic", "preview"])
@pytest.mark.parametrize(
    ("orientation", "turn"),
    [
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_270),
        (8, Image.Transpose.ROTATE_90),
    ],
)
def test_the_raw_flip_makes_the_image_upright(tmp_path, puppy, orientation, turn, preview):
    jpeg = jpeg_bytes(puppy, 600) if preview else None
    path = write_dng(tmp_path / "shot.dng", puppy, preview=jpeg, orientation=orientation)
    image, info = open_rgb(path)
    upright = puppy.transpose(turn)
    assert (info.width, info.height) == upright.size
    assert _mad(image, upright) < (4 if preview else 20)
    assert _mad(image, upright) < _mad(image, upright.transpose(Image.Transpose.ROTATE_180)) / 2


def test_a_preview_with_its_own_orientation_is_turned_once(tmp_path, puppy):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = write_dng(
        tmp_path / "shot.dng", puppy, preview=jpeg_bytes(puppy, 600, exif), orientation=6
    )
    image, _ = open_rgb(path)
    assert _mad(image, puppy.transpose(Image.Transpose.ROTATE_270)) < 4


# -- metadata ------------------------------------------------------------------------------------
def test_capture_time_and_camera_come_from_the_raw(tmp_path, puppy):
    path = write_dng(
        tmp_path / "shot.dng", puppy, make="Leica", model="M11", taken="2023:02:01 09:08:07"
    )
    _, info = open_rgb(path)
    assert (info.camera_make, info.camera_model) == ("Leica", "M11")
    assert info.taken_at == datetime(2023, 2, 1, 9, 8, 7)


def test_a_caption_in_the_raw_is_kept_for_text_search(tmp_path, puppy):
    path = write_dng(tmp_path / "shot.dng", puppy, description="Puppy on the lawn")
    _, info = open_rgb(path)
    assert [text for _, text, _ in info.texts] == ["Puppy on the lawn"]


@pytest.mark.parametrize("preview", [False, True], ids=["demosaic", "preview"])
def test_no_recorded_time_is_none_not_1970(tmp_path, puppy, preview):
    # LibRaw stamps the preview it hands out with its own EXIF: time 0 when it found none.
    jpeg = jpeg_bytes(puppy, 600) if preview else None
    _, info = open_rgb(write_dng(tmp_path / "shot.dng", puppy, preview=jpeg, taken=None))
    assert info.taken_at is None
    assert info.camera_model == "Test Camera"


# -- limits and broken files ---------------------------------------------------------------------
def test_the_pixel_limit_applies_to_the_sensor_size(tmp_path, puppy):
    path = write_dng(tmp_path / "shot.dng", puppy, preview=jpeg_bytes(puppy, 600))
    with pytest.raises(ImageTooLarge, match=r"0\.3 megapixels.*0\.1 MP limit"):
        open_rgb(path, max_megapixels=0.1)


@pytest.mark.parametrize(
    ("name", "cut", "reason"),
    [
        ("short.dng", 0.6, "truncated camera RAW (DNG) (file ends early)"),
        ("header.nef", 0.002, "truncated camera RAW (Nikon NEF)"),
        ("empty.arw", 0.0, "empty file"),
    ],
)
def test_a_broken_raw_fails_with_a_reason(tmp_path, puppy, name, cut, reason):
    data = write_dng(tmp_path / "whole.dng", puppy).read_bytes()
    broken = tmp_path / name
    broken.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(DecodeError) as caught:
        open_rgb(broken)
    assert str(caught.value).startswith(reason)


def test_not_a_raw_at_all_is_refused_by_name(tmp_path):
    path = tmp_path / "holiday.cr2"
    path.write_bytes(b"this is a text file, not a Canon RAW\n" * 20)
    with pytest.raises(DecodeError, match=r"unsupported format: camera RAW \(Canon CR2\)"):
        open_rgb(path)


def test_bytes_are_recognised_by_name_or_magic(tmp_path, puppy):
    data = write_dng(tmp_path / "shot.dng", puppy).read_bytes()
    _, info = decode_for_model(data, name="shot.dng")
    assert info.format == "DNG"
    assert raw.is_raw(b"FUJIFILMCCD-RAW 0201FF383501")
    assert raw.is_raw(b"\x00\x00\x00\x18ftypcrx \x00\x00\x00\x01")
    # A DNG, NEF or ARW is a TIFF: its first IFD says so (DNGVersion, or a reduced-size
    # first image); an uploaded RAW has no name to go by.
    _, info = decode_for_model(data)
    assert info.format == "RAW" and (info.width, info.height) == (640, 512)
    plain = io.BytesIO()
    puppy.save(plain, "TIFF")
    assert not raw.is_raw(plain.getvalue())


def test_every_raw_suffix_is_discovered():
    assert raw.RAW_SUFFIXES <= IMAGE_SUFFIXES
    for suffix in (".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2", ".dng"):
        assert suffix in raw.RAW_SUFFIXES


def test_indexing_a_folder_reads_raws_and_lists_broken_ones(tmp_path, puppy, fake_encoder):
    folder = tmp_path / "card"
    folder.mkdir()
    write_dng(folder / "IMG_0001.dng", puppy, preview=jpeg_bytes(puppy, 600))
    write_dng(folder / "IMG_0002.dng", puppy, orientation=6)
    data = (folder / "IMG_0002.dng").read_bytes()
    (folder / "IMG_0003.dng").write_bytes(data[: len(data) // 2])
    with Library.open(tmp_path / "lib", create=True) as library:
        report = index_paths(library, fake_encoder, [folder])
        rows = library.catalog.get_images(library.catalog.ids()).values()
        failures = {Path(r["path"]).name: r["error"] for r in library.catalog.list_failures()}
    assert report.indexed == 2
    by_name = {Path(row["path"]).name: row for row in rows}
    assert by_name["IMG_0001.dng"]["format"] == "DNG"
    assert (by_name["IMG_0002.dng"]["width"], by_name["IMG_0002.dng"]["height"]) == (512, 640)
    assert by_name["IMG_0001.dng"]["camera_make"] == "Clipdex"
    assert failures == {"IMG_0003.dng": "truncated camera RAW (DNG) (file ends early)"}


# -- JPEG XL -------------------------------------------------------------------------------------
def _jxl(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, "JXL", **options)
    return out.getvalue()


def test_jpeg_xl_decodes(tmp_path, puppy):
    path = tmp_path / "puppy.jxl"
    path.write_bytes(_jxl(puppy, quality=95))
    image, info = open_rgb(path)
    assert info.format == "JXL" and image.size == (640, 512)
    assert _mad(image, puppy) < 4
    assert ".jxl" in IMAGE_SUFFIXES


def test_jpeg_xl_orientation_and_exif(puppy):
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "JxlCam"
    image, info = open_rgb(_jxl(puppy, exif=exif.tobytes()))
    assert image.size == (512, 640) and (info.width, info.height) == (512, 640)
    assert info.camera_make == "JxlCam"


def test_a_corrupt_jpeg_xl_fails_with_a_reason(tmp_path, puppy):
    data = _jxl(puppy)
    path = tmp_path / "cut.jxl"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(DecodeError, match="JPEG XL"):
        open_rgb(path)


def test_a_jpeg_xl_bomb_is_refused_before_libjxl_decodes_it():
    # SizeHeader of a 100000 x 100000 image (not small; U32 selector 3: 30-bit value;
    # ratio 1 = square), followed by nothing: libjxl is never reached.
    bits = [0] + [1, 1] + [(99999 >> i) & 1 for i in range(30)] + [1, 0, 0]
    header = bytes(sum(bit << j for j, bit in enumerate(bits[i : i + 8])) for i in range(0, 40, 8))
    with pytest.raises(ImageTooLarge, match=r"10000 megapixels \(100000x100000\)"):
        open_rgb(b"\xff\x0a" + header + b"\x00" * 16)
