"""Turn one image file into MobileCLIP-S2 model input plus the metadata the catalog keeps.

Everything Pillow can throw at us (OSError, SyntaxError, struct.error, MemoryError, ...) is
caught at the public functions and re-raised as :class:`~indexer.errors.DecodeError` (or
:class:`~indexer.errors.ImageTooLarge`) carrying a short human reason, so one bad file never
stops a run. The pixel limit is checked on header sizes, before any pixel is decoded, for
the frame we decode and for the frames we skip.

Camera RAW files are handed to :mod:`indexer.ingest.raw` (LibRaw), JPEG XL is registered
with Pillow by :mod:`indexer.ingest.jxl`; both return what a photo decode returns.

This module must stay importable without torch: the query path uses it to embed a query
image. ``to_model_input`` reproduces open_clip's MobileCLIP-S2 eval transform with PIL and
numpy only (tests compare the two to < 1e-6).
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import datetime
from typing import IO, Any

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

from indexer.errors import ClipdexError, DecodeError, ImageTooLarge
from indexer.ingest import jxl, raw, textfields

DEFAULT_MAX_MEGAPIXELS: float = 89.0
"""Default pixel limit, about Pillow's own decompression-bomb threshold (89.5 MP)."""

MODEL_IMAGE_SIZE = 256
"""MobileCLIP-S2 input side (``open_clip.get_pretrained_cfg('MobileCLIP-S2', 'datacompdr')``)."""

# fmt: off
# Photo formats people keep in libraries, plus every raster format Pillow reads.
_COMMON_SUFFIXES = {
    ".jpg", ".jpeg", ".jpe", ".jfif", ".jps", ".mpo", ".png", ".apng", ".webp", ".gif", ".bmp",
    ".dib", ".tif", ".tiff", ".btf", ".heic", ".heics", ".heif", ".heifs", ".hif", ".avif",
    ".avifs", ".jp2", ".j2k", ".j2c", ".jpc", ".jpf", ".jpx", ".psd", ".tga", ".icb", ".vda",
    ".vst", ".ico", ".cur", ".icns", ".qoi", ".dds", ".blp", ".sgi", ".rgb", ".rgba", ".bw",
    ".pbm", ".pgm", ".ppm", ".pnm", ".pfm", ".pcx", ".dcx", ".fli", ".flc", ".fits", ".fit",
    ".ftc", ".ftu", ".gbr", ".im", ".im1", ".ras", ".msp", ".pxr", ".xbm", ".xpm", ".spider",
    ".pcd", ".jxl", ".fpx", ".mic",
}
# Formats a photographer has but no decoder here reads (HDR, layered, vector): discovered
# anyway, so `clipdex failures` tells the user why they are missing.
_KNOWN_UNSUPPORTED_SUFFIXES = {
    ".bpg", ".flif", ".psp", ".xcf", ".exr", ".hdr", ".dpx", ".miff", ".pgf", ".djvu",
    ".eps", ".wmf", ".emf", ".wal", ".gd",
}
# Camera RAW (indexer/ingest/raw.py, LibRaw) is read too.
IMAGE_SUFFIXES: frozenset[str] = frozenset(
    _COMMON_SUFFIXES | raw.RAW_SUFFIXES | _KNOWN_UNSUPPORTED_SUFFIXES
)
# fmt: on
"""File suffixes (lower case) that discovery treats as images."""

Source = str | os.PathLike | bytes

# Pillow formats we never hand a file to: EPS runs the external Ghostscript interpreter on
# the file (a history of remote-code-execution bugs) - not acceptable for untrusted folders.
_REFUSED_FORMATS = frozenset({"EPS"})
_DRAFT_MARGIN = 2  # JPEG draft keeps the short side >= 2 * MODEL_IMAGE_SIZE (see _apply_draft)
_MAX_FRAMES_SCANNED = 1000  # later-frame size check stops here (those frames are never decoded)
_MAX_RESIZED_SIDE = 16384  # beyond this, resize only the crop window (degenerate aspect ratios)
_PILLOW_LIMIT_LOCK = threading.Lock()

_ORIENTATION_TAG, _MAKE_TAG, _MODEL_TAG, _DATETIME_TAG = 0x0112, 0x010F, 0x0110, 0x0132
_EXIF_IFD, _GPS_IFD, _DATETIME_ORIGINAL_TAG = 0x8769, 0x8825, 0x9003
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_DATETIME = re.compile(
    r"\s*(\d{4})[:\-/.](\d{1,2})[:\-/.](\d{1,2})[ T]+(\d{1,2}):(\d{2})(?::(\d{2}))?"
)
# fmt: off
_TRUNCATION_WORDS = (
    "truncated", "expected to read", "end of file", "not enough image data", "premature end",
)
# fmt: on
_MAGIC = (  # (regex on the first bytes, format label) for sources given as bytes
    (rb"\xff\xd8\xff", "JPEG"),
    (rb"\x89PNG\r\n\x1a\n", "PNG"),
    (rb"GIF8[79]a", "GIF"),
    (rb"RIFF....WEBP", "WebP"),
    (rb"II\*\x00|MM\x00\*|II\+\x00|MM\x00\+", "TIFF"),
    (rb"BM", "BMP"),
    (rb"....ftyp(avif|avis)", "AVIF"),
    (rb"....ftyp", "HEIF"),
    (rb"\x00\x00\x00\x0cjP  |\xff\x4f\xff\x51", "JPEG 2000"),
)
_NOT_AN_IMAGE = "not an image (unrecognised file format)"
_FORMAT_NAME = re.compile(r"[A-Z][A-Z0-9]*|TIFF with .+|WebP|JPEG 2000")
_SUFFIX_LABELS = {
    suffix: label
    for label, suffixes in {
        "JPEG": ".jpg .jpeg .jpe .jfif",
        "PNG": ".png .apng",
        "GIF": ".gif",
        "WebP": ".webp",
        "BMP": ".bmp",
        "TIFF": ".tif .tiff",
        "HEIF": ".heic .heif .hif",
        "AVIF": ".avif",
        "JPEG 2000": ".jp2 .j2k .jpf",
        "MPO": ".mpo",
        "JPEG XL": ".jxl",
    }.items()
    for suffix in suffixes.split()
}
_UNSUPPORTED_SUFFIXES = {
    ".bpg": "BPG",
    ".flif": "FLIF",
    ".psp": "PaintShop Pro",
    ".xcf": "GIMP XCF",
    ".exr": "OpenEXR",
    ".hdr": "Radiance HDR",
    ".dpx": "DPX",
    ".miff": "ImageMagick MIFF",
    ".pgf": "PGF",
    ".djvu": "DjVu",
    ".eps": "EPS/PostScript",
    ".ps": "PostScript",
    ".pdf": "PDF",
    ".svg": "SVG",
    ".wmf": "Windows Metafile",
    ".emf": "Windows Metafile",
}
# TIFF compressions Pillow/libtiff decode everywhere; others (webp, zstd, jpeg2000...) may not.
# fmt: off
_COMMON_TIFF_COMPRESSIONS = frozenset({
    "raw", "tiff_ccitt", "group3", "group4", "tiff_lzw", "tiff_jpeg", "jpeg", "packbits",
    "tiff_adobe_deflate", "tiff_deflate", "tiff_raw_16", "tiff_thunderscan", "tiff_sgilog",
    "tiff_sgilog24", "lzma",
})
# fmt: on


@dataclass(frozen=True)
class ImageInfo:
    """What the catalog stores about a decoded image; sizes are as displayed (EXIF-rotated)."""

    width: int
    height: int
    format: str | None
    taken_at: datetime | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None
    # (source, text, None) rows: EXIF/IPTC/XMP captions and keywords (ingest.textfields)
    texts: tuple[tuple[str, str, None], ...] = ()


# ---------------------------------------------------------------------------------------------
# public API


def open_rgb(
    source: Source,
    *,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    draft: bool = True,
    name: str | None = None,
) -> tuple[Image.Image, ImageInfo]:
    """Decode the first frame of ``source`` (a path or the file's bytes) as an upright RGB image.

    EXIF orientation is applied, every mode becomes RGB (transparency composited on white),
    and ``draft=True`` lets JPEG decode at a reduced DCT scale whose short side stays >=
    2 x ``MODEL_IMAGE_SIZE`` (pass ``draft=False`` when the full-size image is wanted).
    Header sizes of all frames are checked against ``max_megapixels`` (<= 0: no
    limit) before pixels are decoded. ``name`` is the file's name when ``source`` is its
    bytes: a camera RAW is recognised by it (see :mod:`indexer.ingest.raw`).
    Raises DecodeError / ImageTooLarge, nothing else.
    """
    if raw.is_raw(source, name):
        return _open_raw(source, name, max_megapixels, draft)
    hint = _source_hint(source)
    try:
        return _open_rgb(source, _pixel_limit(max_megapixels), max_megapixels, draft)
    except ClipdexError:
        raise
    except Exception as exc:  # the boundary: every failure becomes a reason
        raise DecodeError(describe_failure(exc, hint)) from exc


def preload_codecs() -> None:
    """Load the lazily registered decoders (HEIF, JPEG XL, LibRaw) now, so a decode worker
    pays their import before it caps its own memory, not inside the first file's budget."""
    _readable_formats()
    raw.preload()


def to_model_input(img: Image.Image, size: int = MODEL_IMAGE_SIZE) -> np.ndarray:
    """Return the (3, size, size) float32 CHW array in [0, 1] that MobileCLIP-S2 takes.

    Same arithmetic as open_clip's eval transform for ('MobileCLIP-S2', 'datacompdr'):
    torchvision ``Resize(size)`` on the PIL image (shortest side to ``size``, long side
    ``int(size * long / short)``, PIL bilinear with antialias), ``CenterCrop`` (offsets
    ``int(round(d / 2))``), ``ToTensor`` (/255), Normalize with mean 0, std 1 (identity).
    Non-RGB input is first converted with :func:`to_rgb`.
    """
    try:
        rgb = to_rgb(img)
        cropped = _resize_and_crop(rgb, size)
        chw = np.ascontiguousarray(np.asarray(cropped, dtype=np.uint8).transpose(2, 0, 1))
        return chw.astype(np.float32) / np.float32(255.0)
    except ClipdexError:
        raise
    except Exception as exc:  # the boundary
        raise DecodeError(describe_failure(exc, getattr(img, "format", None))) from exc


def decode_for_model(
    source: Source,
    *,
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
    draft: bool = True,
    name: str | None = None,
) -> tuple[np.ndarray, ImageInfo]:
    """Decode ``source`` straight to model input: :func:`open_rgb` then :func:`to_model_input`."""
    img, info = open_rgb(source, max_megapixels=max_megapixels, draft=draft, name=name)
    return to_model_input(img), info


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB the way a viewer shows it.

    Transparency (alpha bands, palette or colour-key ``transparency``) is composited on
    white; 16/32-bit integer and float images are scaled to 8 bits by their range instead
    of being clipped; CMYK with an ICC profile goes through colour management.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_depth_to_rgb(img)
    if _has_alpha(img):
        return _on_white(img.convert("RGBA"))
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    return img.convert("RGB")


def describe_failure(exc: BaseException, path_or_format_hint: str | None = None) -> str:
    """Return a short human reason for ``exc`` raised while decoding one file.

    ``path_or_format_hint`` is the file's path or suffix, or a Pillow format name ("JPEG"),
    used to name the format ("truncated JPEG"). Works for any exception, including a worker
    process that died or timed out, so the pipeline can report every failure the same way.
    """
    if isinstance(exc, ClipdexError):
        return _sharpen(exc, path_or_format_hint)
    what, unsupported = _format_label(path_or_format_hint)
    text = _first_line(exc)
    reason = _reason_by_type(exc, what, unsupported)
    if reason:
        return reason
    if unsupported:
        return f"unsupported format: {unsupported} ({text})"
    reason = _reason_by_text(exc, text, what)
    if reason:
        return reason
    if what.startswith("TIFF with"):
        return f"unsupported codec: {what} ({text})"
    if isinstance(exc, (OSError, ValueError, SyntaxError, struct.error, IndexError, KeyError)):
        return f"corrupt {what}: {text}"
    return f"cannot decode {what}: {type(exc).__name__}: {text}"


# ---------------------------------------------------------------------------------------------
# opening and decoding


def _open_rgb(
    source: Source, limit: float, max_megapixels: float, draft: bool
) -> tuple[Image.Image, ImageInfo]:
    """Open, check sizes, decode, orient and convert; errors carry the detected format."""
    hint = _source_hint(source)
    with _open_stream(source) as fp:
        im, pillow_max = _open_checked(fp, hint, limit, max_megapixels)
        header_size = im.size
        try:
            if draft:
                _apply_draft(im, MODEL_IMAGE_SIZE)
            beyond_pillow = pillow_max is not None and limit > 2 * pillow_max
            with _pillow_limit_off() if beyond_pillow else nullcontext():
                im.load()  # plugins re-check sizes against Pillow's global while decoding
            exif = _exif(im)
            orientation = _orientation(exif)
            rgb = _orient(to_rgb(im), orientation)  # convert first: TIFF tags guide scaling
        except ClipdexError:
            raise
        except Exception as exc:  # name the format Pillow detected
            raise _load_failure(exc, im, hint) from exc
    width, height = header_size if orientation < 5 else header_size[::-1]
    info = _image_info(width, height, im.format, exif)
    return rgb, replace(info, texts=tuple(textfields.extract_texts(im, exif)))


def _open_raw(
    source: Source, name: str | None, max_megapixels: float, draft: bool
) -> tuple[Image.Image, ImageInfo]:
    """A camera RAW through LibRaw; a file LibRaw does not know may be a plain image."""
    try:
        return raw.open_raw(source, name=name, max_megapixels=max_megapixels, draft=draft)
    except raw.UnknownToLibRaw as unknown:
        try:
            return _open_rgb(source, _pixel_limit(max_megapixels), max_megapixels, draft)
        except ImageTooLarge:
            raise
        except Exception:  # neither reads it: LibRaw's reason is the one to show
            raise unknown from None


def _open_checked(
    fp: IO[bytes], hint: str | None, limit: float, max_mp: float
) -> tuple[Image.Image, int | None]:
    """Identify the file and check every frame's header size; also return Pillow's limit.

    Pillow's own bomb check is off meanwhile: ours is the authoritative one, per call.
    """
    jxl_size = jxl.declared_size(fp)  # libjxl decodes while Pillow identifies: check first
    if jxl_size is not None:
        _check_pixels(jxl_size, limit, max_mp, "image")
    with _pillow_limit_off() as pillow_max:
        im = _identify(fp, hint, limit, max_mp)
        _check_pixels(im.size, limit, max_mp, "image")
        _check_other_frames(im, fp, limit, max_mp)
    return im, pillow_max


@contextmanager
def _open_stream(source: Source) -> Iterator[IO[bytes]]:
    """Yield a seekable binary stream over ``source``; refuse empty files and odd types."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise DecodeError("empty file")
        yield io.BytesIO(bytes(source))
        return
    if not isinstance(source, (str, os.PathLike)):
        raise DecodeError(f"cannot decode a {type(source).__name__}: pass a path or bytes")
    with open(source, "rb") as fp:
        if os.fstat(fp.fileno()).st_size == 0:
            raise DecodeError("empty file")
        yield fp


def _identify(fp: IO[bytes], hint: str | None, limit: float, max_mp: float) -> Image.Image:
    """Image.open restricted to the formats we accept; HEIF gets libheif's own reason."""
    try:
        return Image.open(fp, formats=_readable_formats())
    except RuntimeError as exc:  # libjxl's errors are RuntimeErrors, raised while identifying
        fp.seek(0)
        if jxl.looks_like_jxl(fp.read(16)):
            raise DecodeError(jxl.failure_reason(exc)) from exc
        raise
    except UnidentifiedImageError as exc:
        suffix = os.path.splitext(hint or "")[1].lower()
        heif_reason = None if suffix in _UNSUPPORTED_SUFFIXES else _heif_failure(fp, limit, max_mp)
        raise DecodeError(heif_reason or describe_failure(exc, hint)) from exc


@functools.cache
def _readable_formats() -> tuple[str, ...]:
    """Register the HEIF and JPEG XL openers once (lazily); list the Pillow formats we try."""
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
    except ImportError:  # HEIF then fails with a reason; everything else still works
        pass
    Image.init()
    jxl.register()  # after init(): JPEG XL joins the list when the plugin is installed
    return tuple(fmt for fmt in Image.ID if fmt not in _REFUSED_FORMATS)


def _heif_failure(fp: IO[bytes], limit: float, max_mp: float) -> str | None:
    """For an ISO-BMFF (HEIF family) file Pillow could not open, ask libheif why.

    Pillow's HEIF plugin turns every libheif error into "cannot identify image file"; the
    real reason (a codec libheif was built without, a truncated box...) is worth showing.
    """
    fp.seek(0)
    head = fp.read(12)
    if head[4:8] != b"ftyp":
        return None
    brand = "".join(ch for ch in head[8:12].decode("latin-1") if ch.isalnum())
    brand = f" (brand '{brand}')" if brand else ""
    try:
        import pillow_heif

        fp.seek(0)
        heif = pillow_heif.open_heif(fp, convert_hdr_to_8bit=True)
        if not len(heif):
            return f"unsupported codec: no image in this HEIF file{brand} is decodable"
        primary = heif[heif.primary_index]
        _check_pixels(primary.size, limit, max_mp, "image")
        primary.load()
    except ImportError:
        return f"unsupported format: HEIF/AVIF{brand} needs pillow-heif"
    except ClipdexError as exc:
        return str(exc)
    except Exception as exc:  # libheif's message is the reason
        return _heif_reason(_first_line(exc), brand)
    return f"unsupported format: HEIF{brand}: pillow-heif's Pillow plugin does not accept it"


def _heif_reason(text: str, brand: str) -> str:
    """Phrase a libheif error: missing codec / feature versus a damaged file."""
    lowered = text.lower()
    if any(key in lowered for key in ("unsupported", "not been built in", "no decoding plugin")):
        return f"unsupported codec: HEIF{brand}: {text}"
    if "end of file" in lowered or "truncated" in lowered:
        return f"truncated HEIF: {text}"
    return f"corrupt HEIF: {text}"


@contextmanager
def _pillow_limit_off() -> Iterator[int | None]:
    """Switch Pillow's process-wide bomb check off while we hold the lock; yield its value.

    Pillow reads the global ``Image.MAX_IMAGE_PIXELS`` (warn at 1x, raise at 2x); clipdex has
    its own per-call limit, checked on header sizes right after opening. Only header parsing
    (and decoding under a limit raised above Pillow's) runs inside this window.
    """
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield saved
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _pixel_limit(max_megapixels: float) -> float:
    """Pixel count allowed; a non-positive or infinite setting means no limit."""
    if not max_megapixels or max_megapixels <= 0 or math.isnan(max_megapixels):
        return math.inf
    return max_megapixels * 1_000_000


def _check_pixels(size: tuple[int, int], limit: float, max_mp: float, what: str) -> None:
    """Raise ImageTooLarge when ``size`` is over the limit (``what`` names the frame)."""
    width, height = size
    if width * height > limit:
        raise ImageTooLarge(
            f"{what} is {_megapixels(width * height)} megapixels ({width}x{height}), over the "
            f"{max_mp:g} MP limit (raise the pixel limit to index it)",
            setting="max_megapixels",
        )


def _megapixels(pixels: int) -> str:
    """Format a pixel count in megapixels: '200', '89.5', '0.3'."""
    mp = pixels / 1_000_000
    return f"{mp:.0f}" if mp >= 100 else f"{mp:.1f}".removesuffix(".0")


def _check_other_frames(im: Image.Image, fp: IO[bytes], limit: float, max_mp: float) -> None:
    """Check the header size of frames we skip, without decoding them.

    A later frame over the limit rejects the file (``decompression_bomb_extents.gif``); a
    later frame that is merely broken does not, since only the first frame is indexed.
    """
    if im.format == "GIF":
        _check_pixels(_gif_canvas(fp), limit, max_mp, "a later GIF frame")
    elif im.format == "HEIF":
        for index, size in enumerate(_heif_sizes(fp, im)):
            _check_pixels(size, limit, max_mp, f"image {index + 1} in this HEIF file")
    elif im.format not in ("PNG", "WEBP", "AVIF", "FLI"):  # their frames share one canvas
        _check_seekable_frames(im, limit, max_mp)


def _check_seekable_frames(im: Image.Image, limit: float, max_mp: float) -> None:
    """Seek through frames (header-only for TIFF, MPO, PSD, ...) and check each size."""
    start = im.tell()
    try:
        count = min(getattr(im, "n_frames", 1), _MAX_FRAMES_SCANNED)
    except Exception:  # a broken frame table: nothing more to check
        return
    if count <= 1:
        return
    for index in range(count):
        if index == start:
            continue
        try:
            im.seek(index)
        except Exception:  # broken later frame: never decoded, so ignored
            break
        _check_pixels(im.size, limit, max_mp, f"frame {index + 1}")
    im.seek(start)


def _gif_canvas(fp: IO[bytes]) -> tuple[int, int]:
    """Return the canvas Pillow would grow to for the GIF's frames, reading headers only."""
    position = fp.tell()
    try:
        fp.seek(0)
        head = fp.read(13)
        width, height = struct.unpack("<HH", head[6:10])
        _skip_colour_table(fp, head[10])
        while (block := fp.read(1)) and block != b";":
            if block == b",":
                descriptor = fp.read(9)
                if len(descriptor) < 9:
                    break
                x, y, w, h, flags = struct.unpack("<HHHHB", descriptor)
                width, height = max(width, x + w), max(height, y + h)
                _skip_colour_table(fp, flags)
            elif block != b"!":
                break
            fp.read(1)  # LZW minimum code size, or the extension label
            _skip_sub_blocks(fp)
        return width, height
    finally:
        fp.seek(position)


def _skip_colour_table(fp: IO[bytes], flags: int) -> None:
    """Skip a GIF global/local colour table if the flags byte announces one."""
    if flags & 0x80:
        fp.seek(3 << ((flags & 7) + 1), os.SEEK_CUR)


def _skip_sub_blocks(fp: IO[bytes]) -> None:
    """Skip GIF data sub-blocks up to the zero-length terminator (or end of file)."""
    while (length := fp.read(1)) and length[0]:
        fp.seek(length[0], os.SEEK_CUR)


def _heif_sizes(fp: IO[bytes], im: Image.Image) -> list[tuple[int, int]]:
    """Sizes of every top-level image in a HEIF file, from libheif's header parse."""
    if getattr(im, "n_frames", 1) <= 1:
        return []
    import pillow_heif

    position = fp.tell()
    try:
        fp.seek(0)
        return [image.size for image in pillow_heif.open_heif(fp)]
    finally:
        fp.seek(position)


def _apply_draft(im: Image.Image, size: int) -> None:
    """Let JPEG decode at 1/2, 1/4 or 1/8 scale in the DCT domain, keeping both sides >= 2*size.

    Pillow picks the largest scale that keeps both stored sides >= the request, so a square
    request keeps the short side large enough whatever the EXIF orientation. The 2x margin
    leaves the final bilinear resize a real downscale: model inputs stay within ~0.3/255
    (mean) of a full decode, against ~0.9/255 (6/255 on textured photos) when decoding
    right down to ``size``, for ~1.2x the time of the smallest draft (~4x faster than full).
    HEIF thumbnails (pillow-heif's draft) are not used: their fidelity is not verified.
    """
    if im.format in ("JPEG", "MPO"):
        im.draft("RGB", (_DRAFT_MARGIN * size, _DRAFT_MARGIN * size))


def _exif(im: Image.Image) -> Image.Exif | None:
    """The image's EXIF (also TIFF tags / XMP orientation), or None when unreadable."""
    try:
        return im.getexif()
    except Exception:  # broken EXIF never blocks indexing
        return None


def _orientation(exif: Image.Exif | None) -> int:
    """EXIF orientation 1-8; anything else (absent, 0, 9, garbage) counts as 1."""
    try:
        value = int(exif.get(_ORIENTATION_TAG, 1)) if exif is not None else 1
    except (TypeError, ValueError):
        return 1
    return value if value in _TRANSPOSE else 1


def _orient(im: Image.Image, orientation: int) -> Image.Image:
    """Apply EXIF orientation so the image is upright."""
    method = _TRANSPOSE.get(orientation)
    return im.transpose(method) if method is not None else im


def _load_failure(exc: Exception, im: Image.Image, hint: str | None) -> DecodeError:
    """The DecodeError for a failure after Pillow identified the file."""
    if isinstance(exc, Image.DecompressionBombError):
        return ImageTooLarge(describe_failure(exc))
    suffix = os.path.splitext(hint or "")[1].lower()
    label = hint if suffix in _UNSUPPORTED_SUFFIXES else _codec_label(im)  # e.g. a RAW as TIFF
    return DecodeError(describe_failure(exc, label))


def _codec_label(im: Image.Image) -> str | None:
    """Format name for messages, e.g. 'TIFF with webp compression' for an unusual codec."""
    compression = im.info.get("compression") if im.format == "TIFF" else None
    if compression and compression not in _COMMON_TIFF_COMPRESSIONS:
        return f"TIFF with {compression} compression"
    return im.format


# ---------------------------------------------------------------------------------------------
# colour modes


def _has_alpha(img: Image.Image) -> bool:
    """True for alpha modes, colour-key transparency and palettes with alpha entries."""
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        return True
    palette = img.palette if img.mode == "P" else None
    return palette is not None and palette.mode == "RGBA"


def _on_white(rgba: Image.Image) -> Image.Image:
    """Composite an RGBA image on an opaque white background."""
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """CMYK to RGB through the embedded ICC profile when there is one, else Pillow's formula."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(img, profile, srgb, outputMode="RGB")
        except Exception:  # a bad profile falls back to the plain formula
            pass
    return img.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale I;16*, I and F images to 8-bit grey (white where colour-key transparent)."""
    values = np.asarray(img)
    grey = Image.fromarray(_to_uint8(values, img), "L")
    key = img.info.get("transparency")
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")
        return _on_white(Image.merge("RGBA", (grey, grey, grey, alpha)))
    return grey.convert("RGB")


def _to_uint8(values: np.ndarray, img: Image.Image) -> np.ndarray:
    """Map integer/float samples to 0-255 by the format's nominal range.

    16-bit: 0..2**bits-1 (bits from the TIFF header if it says 9-15, else 16). 32-bit int:
    0..255 or 0..65535 when the data fits, else its own min..max. Float: 0..1 or 0..255
    when it fits, else min..max. NaN/inf become 0.
    """
    data = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        top = 2.0 ** _tiff_bits(img) - 1
    elif img.mode == "F" and low >= 0 and high <= 1:
        top = 1.0
    elif low >= 0 and high <= 255:
        top = 255.0
    elif img.mode == "I" and low >= 0 and high <= 65535:
        top = 65535.0
    else:
        data, top = data - low, max(high - low, 1e-12)
    return np.clip(np.rint(data * (255.0 / top)), 0, 255).astype(np.uint8)


def _tiff_bits(img: Image.Image) -> int:
    """Bits per sample a TIFF declares (e.g. 12), or 16 for every other 16-bit image."""
    try:
        bits = int(getattr(img, "tag_v2", {}).get(258, (16,))[0])
    except Exception:  # odd tag: assume the full 16-bit range
        return 16
    return bits if 8 < bits < 16 else 16


# ---------------------------------------------------------------------------------------------
# preprocessing


def _resize_and_crop(rgb: Image.Image, size: int) -> Image.Image:
    """torchvision Resize(size) + CenterCrop(size) on a PIL image, bit for bit.

    For absurd aspect ratios (resized long side > _MAX_RESIZED_SIDE), only the crop window
    is resampled, using PIL's ``box`` - same filter, no giant intermediate image.
    """
    width, height = rgb.size
    new_w, new_h = _shortest_side_size(width, height, size)
    left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)
    if max(new_w, new_h) > _MAX_RESIZED_SIDE:
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return rgb.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if (new_w, new_h) != (width, height):
        rgb = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
    return rgb.crop((left, top, left + size, top + size))


def _shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's ``_compute_resized_output_size`` for an int size: (new_w, new_h)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


# ---------------------------------------------------------------------------------------------
# metadata


def _image_info(width: int, height: int, fmt: str | None, exif: Image.Exif | None) -> ImageInfo:
    """Collect ImageInfo; every metadata field degrades to None on odd or broken EXIF."""
    if exif is None:
        return ImageInfo(width, height, fmt)
    make, model = _text_tag(exif, _MAKE_TAG), _text_tag(exif, _MODEL_TAG)
    lat, lon = _gps(_sub_ifd(exif, _GPS_IFD))
    return ImageInfo(width, height, fmt, _taken_at(exif), make, model, lat, lon)


def _sub_ifd(exif: Image.Exif, tag: int) -> dict[int, Any]:
    """An EXIF sub-IFD as a dict, empty when absent or broken."""
    try:
        return dict(exif.get_ifd(tag))
    except Exception:  # broken IFD pointers are common
        return {}


def _text_tag(tags: Any, tag: int) -> str | None:
    """A printable, stripped ASCII tag value or None."""
    try:
        value = tags.get(tag)
    except Exception:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = "".join(ch for ch in value if ch.isprintable()).strip()
    return value or None


def _taken_at(exif: Image.Exif) -> datetime | None:
    """DateTimeOriginal, else DateTime, as a naive local datetime; None when invalid."""
    for value in (
        _text_tag(_sub_ifd(exif, _EXIF_IFD), _DATETIME_ORIGINAL_TAG),
        _text_tag(exif, _DATETIME_TAG),
    ):
        parsed = _parse_exif_datetime(value)
        if parsed is not None:
            return parsed
    return None


def _parse_exif_datetime(value: str | None) -> datetime | None:
    """Parse 'YYYY:MM:DD HH:MM:SS' (and close variants); placeholders give None."""
    match = _EXIF_DATETIME.match(value or "")
    if not match:
        return None
    year, month, day, hour, minute, second = (int(g or 0) for g in match.groups())
    try:
        parsed = datetime(year, month, day, hour, minute, second)
    except ValueError:  # 0000:00:00, month 13, ...
        return None
    return parsed if parsed.year >= 1800 else None


def _gps(gps: dict[int, Any]) -> tuple[float | None, float | None]:
    """Signed decimal degrees from GPS IFD tags 1-4; (None, None) unless both are valid."""
    lat = _gps_coordinate(gps.get(2), gps.get(1), "S", 90.0)
    lon = _gps_coordinate(gps.get(4), gps.get(3), "W", 180.0)
    return (lat, lon) if lat is not None and lon is not None else (None, None)


def _gps_coordinate(value: Any, ref: Any, negative: str, bound: float) -> float | None:
    """Degrees/minutes/seconds rationals (or a bare number) plus N/S/E/W ref to a float."""
    try:
        parts = [float(v) for v in value] if isinstance(value, (tuple, list)) else [float(value)]
        degrees = sum(p / 60**i for i, p in enumerate(parts[:3]))
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not math.isfinite(degrees) or not 0 <= degrees <= bound:
        return None
    ref_text = ref.decode("ascii", "replace") if isinstance(ref, bytes) else str(ref or "")
    return -degrees if ref_text.strip().upper().startswith(negative) else degrees


# ---------------------------------------------------------------------------------------------
# failure reasons


def _source_hint(source: object) -> str | None:
    """The path as text (its suffix names the format), or for bytes the format their magic
    number announces, so messages can say "truncated PNG" either way."""
    if isinstance(source, (str, os.PathLike)):
        return os.fsdecode(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        head = bytes(source[:32])
        return next((name for magic, name in _MAGIC if re.match(magic, head, re.S)), None)
    return None


def _format_label(hint: str | None) -> tuple[str, str | None]:
    """(format name for messages, unsupported-format description or None) from a hint.

    The hint is a Pillow format name ('JPEG', 'TIFF with webp compression') or a path whose
    suffix names the format (an unknown suffix is named by itself, 'DDS'; none: 'image').
    """
    if not hint:
        return "image", None
    if _FORMAT_NAME.fullmatch(hint):
        return hint, None
    suffix = os.path.splitext(hint)[1].lower()
    if suffix in raw.RAW_SUFFIXES:  # reached only when LibRaw never ran (a crash, a timeout)
        return raw.raw_label(suffix), None
    if suffix in _UNSUPPORTED_SUFFIXES:
        return _UNSUPPORTED_SUFFIXES[suffix], _UNSUPPORTED_SUFFIXES[suffix]
    return _SUFFIX_LABELS.get(suffix, suffix[1:].upper() or "image"), None


def _sharpen(exc: ClipdexError, hint: str | None) -> str:
    """Refine a DecodeError raised for bytes (no file name) with the caller's path."""
    message = str(exc)
    if not isinstance(exc, DecodeError) or isinstance(exc, ImageTooLarge) or not hint:
        return message
    what, unsupported = _format_label(hint)
    if isinstance(exc, raw.RawError):
        return raw.name_the_format(message, hint)
    if unsupported and not message.startswith("unsupported format"):
        detail = "" if message == _NOT_AN_IMAGE else f" ({message})"
        return f"unsupported format: {unsupported}{detail}"
    if message == _NOT_AN_IMAGE and what in _SUFFIX_LABELS.values():
        return f"not a readable {what} file (unrecognised or corrupt header)"
    return message


def _first_line(exc: BaseException) -> str:
    """The exception's message, one line, at most 160 characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _reason_by_type(exc: BaseException, what: str, unsupported: str | None) -> str | None:
    """Reasons decided by the exception class alone."""
    if isinstance(exc, Image.DecompressionBombError):
        return _bomb_reason(exc)
    if isinstance(exc, UnidentifiedImageError):
        if unsupported:
            return f"unsupported format: {unsupported}"
        if what not in _SUFFIX_LABELS.values() and not what.startswith("camera RAW"):
            return _NOT_AN_IMAGE
        return f"not a readable {what} file (unrecognised or corrupt header)"
    simple = {
        FileNotFoundError: "file not found",
        IsADirectoryError: "is a directory, not an image file",
        PermissionError: "permission denied (check the file's permissions)",
        MemoryError: "out of memory while decoding (a lower pixel limit may help)",
        RecursionError: f"corrupt {what}: nesting too deep",
        TimeoutError: "decoding timed out",
        NotImplementedError: f"unsupported codec: {what}: {_first_line(exc)}",
    }
    for kind, reason in simple.items():
        if isinstance(exc, kind):
            return reason
    if any(cls.__name__ == "BrokenProcessPool" for cls in type(exc).__mro__):
        return "the decoder crashed on this file (worker process died)"
    return None


def _bomb_reason(exc: BaseException) -> str:
    """Phrase Pillow's own DecompressionBombError (raised by a plugin while decoding)."""
    pixels = re.search(r"\((\d+) pixels\)", str(exc))
    size = _megapixels(int(pixels.group(1))) if pixels else "too many"
    return f"image is {size} megapixels, over the pixel limit (raise it to index the file)"


def _reason_by_text(exc: BaseException, text: str, what: str) -> str | None:
    """Reasons recognised from Pillow's message wording (and EOFError)."""
    lowered = text.lower()
    if isinstance(exc, EOFError) or any(key in lowered for key in _TRUNCATION_WORDS):
        return f"truncated {what} (file ends early)"
    if "ghostscript" in lowered:
        return "unsupported format: EPS/PostScript (needs Ghostscript)"
    if "cannot find loader" in lowered:
        return f"unsupported format: {what} (no loader on this system)"
    if "decoder" in lowered and "not available" in lowered:
        return f"unsupported codec: {text}"
    if "not supported" in lowered or lowered.startswith(("unsupported", "unknown", "unimpl")):
        return f"unsupported {what} variant: {text}"
    return None
