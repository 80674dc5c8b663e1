"""Camera RAW files (CR2, CR3, NEF, ARW, RAF, ORF, RW2, DNG, ...) through rawpy (LibRaw).

This module is rawpy's one home. :func:`open_raw` returns the same upright RGB image and
:class:`~indexer.ingest.decode.ImageInfo` as a photo decode, so the rest of clipdex does not
know a RAW from a JPEG:

- **Preview first.** Nearly every camera embeds a JPEG preview. When its short side is at
  least the model's input side (``MODEL_IMAGE_SIZE``, 256) and its shape matches the sensor
  image, it is decoded like any JPEG (DCT draft, no demosaic: many times faster);
- **else a half-size demosaic** (LibRaw's ``half_size``: one RGB pixel per 2x2 Bayer cell,
  camera white balance, sRGB), still far above the model's 256 pixels.
- **Orientation** comes from the RAW's own flip (LibRaw reads it from the maker's tags);
  a preview that carries its own EXIF orientation is trusted instead, never both.
- **Metadata** (capture time, make, model, GPS): LibRaw exposes little, so the file's TIFF
  structure (DNG, CR2, NEF, ARW, ORF, RW2, PEF... are TIFF inside) is read as EXIF with
  Pillow; then the preview's EXIF fills gaps (RAF, CR3: LibRaw writes the make, model and
  time it read from the RAW into the preview it hands out), then LibRaw's timestamp.

Limits are the photo ones: the sensor size is checked against the pixel limit before any
pixel is decoded, the decode worker's time and memory bounds apply, and every failure
(truncated, corrupt, a RAW that LibRaw does not know) becomes a DecodeError with a reason.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import fields, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.errors import ClipdexError, DecodeError, ImageTooLarge

if TYPE_CHECKING:
    from PIL import Image

    from indexer.ingest.decode import ImageInfo, Source

# decode.py dispatches here and this module decodes previews through decode.py: it is
# imported inside the functions below (as ``photo``) so neither import runs first. Pillow
# is imported there too: the query side reads RAW_SUFFIXES without loading an image library.

# Makers named in messages ("camera RAW (Canon CR2)"); other suffixes name the format only.
_MAKERS = {
    ".cr2": "Canon", ".cr3": "Canon", ".crw": "Canon", ".nef": "Nikon", ".nrw": "Nikon",
    ".arw": "Sony", ".srf": "Sony", ".sr2": "Sony", ".raf": "Fujifilm", ".rw2": "Panasonic",
    ".orf": "Olympus", ".pef": "Pentax", ".srw": "Samsung", ".x3f": "Sigma", ".mrw": "Minolta",
    ".iiq": "Phase One", ".3fr": "Hasselblad", ".rwl": "Leica", ".gpr": "GoPro",
}  # fmt: skip
# fmt: off
# Suffix -> the format name the catalog keeps. LibRaw reads many more cameras than these
# names; every suffix here is discovered and tried.
RAW_FORMATS: dict[str, str] = {
    ".3fr": "3FR", ".ari": "ARI", ".arw": "ARW", ".bay": "BAY", ".cap": "CAP", ".cr2": "CR2",
    ".cr3": "CR3", ".crw": "CRW", ".dcr": "DCR", ".dcs": "DCS", ".dng": "DNG", ".erf": "ERF",
    ".fff": "FFF", ".gpr": "GPR", ".iiq": "IIQ", ".k25": "K25", ".kdc": "KDC", ".mef": "MEF",
    ".mos": "MOS", ".mrw": "MRW", ".nef": "NEF", ".nrw": "NRW", ".orf": "ORF", ".ori": "ORF",
    ".pef": "PEF", ".raf": "RAF", ".raw": "RAW", ".rw2": "RW2", ".rwl": "RWL", ".sr2": "SR2",
    ".srf": "SRF", ".srw": "SRW", ".x3f": "X3F",
}
# fmt: on
RAW_SUFFIXES: frozenset[str] = frozenset(RAW_FORMATS)
"""File suffixes (lower case) decoded as camera RAW."""

# First bytes that announce a RAW whatever its name (bytes handed in without a file name).
# Plain-TIFF RAWs (DNG, NEF, ARW...) look like any TIFF: those are recognised by name only.
_RAW_MAGIC = re.compile(
    rb"FUJIFILMCCD-RAW |....ftypcrx |IIRO\x08\x00|IIRS\x08\x00|MMOR\x00|IIU\x00|II\*\x00.{4}CR",
    re.S,
)
# LibRaw's flip (dcraw's "50132467"[exif & 7]) back to the EXIF orientation it came from.
_FLIP_TO_ORIENTATION = {0: 1, 1: 2, 3: 3, 2: 4, 4: 5, 6: 6, 7: 7, 5: 8}
# Below this, the file is too small to hold its sensor data: cut short or stripped (LibRaw
# then reads whatever memory held, without a word). Real RAWs, lossy ones included, store
# 3 bits per pixel or more.
_MIN_BITS_PER_PIXEL = 1
_ASPECT_TOLERANCE = 0.05  # a preview this close to the sensor's shape shows the whole frame
_TAG_WINDOW = 1 << 20  # bytes of a TIFF-based RAW read for its tags (after its first IFD)
_LIBRAW_DAMAGE = ("unexpected end of file", "data corrupted", "data error")
_CAPTURE_LOCK = threading.Lock()


class RawError(DecodeError):
    """A RAW failed to decode; for bytes without a name the message says only "camera RAW"."""


class UnknownToLibRaw(RawError):
    """LibRaw does not recognise the file: a plain image with a RAW name may still be read."""


def is_raw(source: Source, name: str | None = None) -> bool:
    """True when ``name`` (or a path ``source``) has a RAW suffix, or bytes look like a RAW."""
    label = name if name is not None else source
    if isinstance(label, (str, os.PathLike)):
        return os.path.splitext(os.fsdecode(label))[1].lower() in RAW_SUFFIXES
    if isinstance(source, (bytes, bytearray, memoryview)):
        head = bytes(source[:16])
        return _RAW_MAGIC.match(head) is not None or _tiff_says_raw(source)
    return False


def _tiff_says_raw(data: bytes | bytearray | memoryview) -> bool:
    """A TIFF whose first IFD is a DNG's (DNGVersion) or a reduced-resolution image
    (NewSubFileType 1: the main image lives elsewhere, as in NEF, ARW, PEF, DNG). A plain
    TIFF that also says so is tried by LibRaw, which refuses it, then read by Pillow."""
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(bytes(data[:4]))
    if order is None or len(data) < 8:
        return False
    offset = struct.unpack(order + "I", bytes(data[4:8]))[0]
    if offset + 2 > len(data):
        return False
    count = struct.unpack(order + "H", bytes(data[offset : offset + 2]))[0]
    for index in range(min(count, 256)):
        entry = bytes(data[offset + 2 + 12 * index : offset + 14 + 12 * index])
        if len(entry) < 12:
            return False
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag == 50706:  # DNGVersion
            return True
        if tag == 254:  # NewSubFileType (LONG, or SHORT in the entry's first two bytes)
            value = entry[8:12] if kind == 4 else entry[8:10]
            if struct.unpack(order + ("I" if kind == 4 else "H"), value)[0] == 1:
                return True
    return False


def open_raw(
    source: Source,
    *,
    name: str | None = None,
    max_megapixels: float,
    draft: bool = True,
) -> tuple[Image.Image, ImageInfo]:
    """Decode a camera RAW (a path or its bytes) as an upright RGB image plus its metadata.

    ``name`` is the file's name when ``source`` is bytes (it names the format in messages).
    Raises DecodeError / ImageTooLarge with a reason, nothing else.
    """
    label, fmt = _label(name if name is not None else source)
    try:
        data = _read(source)
        return _decode(data, label, fmt, max_megapixels, draft)
    except ClipdexError:
        raise
    except Exception as exc:  # the boundary: every failure becomes a reason
        unknown = type(exc).__name__ == "LibRawFileUnsupportedError"
        error = UnknownToLibRaw if unknown else RawError
        raise error(describe_raw_failure(exc, label)) from exc


def describe_raw_failure(exc: BaseException, label: str = "camera RAW") -> str:
    """A short human reason for a LibRaw (or reading) failure on one RAW file."""
    kind, text = type(exc).__name__, _first_line(exc)
    if isinstance(exc, MemoryError) or kind == "LibRawUnsufficientMemoryError":
        return "out of memory while decoding (a lower pixel limit may help)"
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return {
            FileNotFoundError: "file not found",
            PermissionError: "permission denied (check the file's permissions)",
            IsADirectoryError: "is a directory, not an image file",
        }[type(exc)]
    if isinstance(exc, ImportError):
        return f"unsupported format: {label} needs rawpy (pip install rawpy)"
    if kind == "LibRawFileUnsupportedError":
        return f"unsupported format: {label} (LibRaw does not recognise this file)"
    if kind == "LibRawTooBigError":
        return f"{label} is too big for LibRaw to process"
    if kind == "LibRawIOError" or any(word in text.lower() for word in _LIBRAW_DAMAGE[:1]):
        return f"truncated {label} (file ends early)"
    if kind in ("LibRawDataError", "LibRawNotImplementedError") or "corrupt" in text.lower():
        return f"corrupt {label}: {text}"
    return f"cannot decode {label}: {kind}: {text}"


def name_the_format(message: str, path: str) -> str:
    """Put the format a path's suffix names into a reason given for nameless bytes."""
    label = raw_label(os.path.splitext(path)[1])
    if label == "camera RAW" or any(f"{fmt})" in message for fmt in RAW_FORMATS.values()):
        return message
    return message.replace("camera RAW", label, 1)


def preload() -> None:
    """Import LibRaw now (decode workers call it before they cap their memory)."""
    with contextlib.suppress(ImportError):  # absent: each RAW then fails with a reason
        import rawpy  # noqa: F401


# ---------------------------------------------------------------------------------------------
# decoding


def _decode(
    data: bytes, label: str, fmt: str, max_megapixels: float, draft: bool
) -> tuple[Image.Image, ImageInfo]:
    """Open with LibRaw, check the size, then the preview or a half-size demosaic."""
    import rawpy

    from indexer.ingest import decode as photo

    if not data:
        raise DecodeError("empty file")
    with _libraw_messages() as messages, rawpy.imread(io.BytesIO(data)) as raw:
        sizes = raw.sizes
        width, height = sizes.width, sizes.height  # the sensor image, before the flip
        limit = photo._pixel_limit(max_megapixels)
        photo._check_pixels((width, height), limit, max_megapixels, "RAW image")
        orientation = _FLIP_TO_ORIENTATION.get(sizes.flip, 1)
        preview = _preview(raw, (width, height), max_megapixels, draft)
        if preview is None and len(data) * 8 < width * height * _MIN_BITS_PER_PIXEL:
            raise RawError(
                f"truncated {label}: {len(data)} bytes cannot hold its {width}x{height} "
                "sensor image (and its preview is missing or too small)"
            )
        if preview is not None:
            rgb, preview_info, preview_oriented = preview
            rgb = rgb if preview_oriented else photo._orient(rgb, orientation)
            taken_by_libraw = None
        else:
            rgb, preview_info = _demosaic(raw, messages, label), None
            taken_by_libraw = _libraw_timestamp(raw)
    displayed = (width, height) if orientation < 5 else (height, width)
    info = _metadata(data, displayed, fmt, preview_info, taken_by_libraw)
    return rgb, info


def _preview(
    raw: Any, sensor: tuple[int, int], max_megapixels: float, draft: bool
) -> tuple[Image.Image, ImageInfo | None, bool] | None:
    """(upright-by-its-own-EXIF RGB, its metadata, whether its EXIF oriented it), or None
    when there is no preview, it is too small for the model, shows another crop, or is
    broken (the caller then demosaics)."""
    import rawpy
    from PIL import Image

    from indexer.ingest import decode as photo

    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawError, MemoryError):  # none, unsupported, or unreadable: demosaic
        return None
    if thumb.format == rawpy.ThumbFormat.BITMAP:
        image = Image.fromarray(np.ascontiguousarray(thumb.data[..., :3]).astype(np.uint8))
        return (image, None, False) if _fits(image.size, sensor) else None
    try:
        with Image.open(io.BytesIO(thumb.data)) as head:
            stored, own_orientation = head.size, photo._orientation(head.getexif())
        if not _fits(stored, sensor):
            return None
        image, info = photo.open_rgb(thumb.data, max_megapixels=max_megapixels, draft=draft)
    except ImageTooLarge:
        raise
    except Exception:  # a damaged preview: the sensor data may still be fine
        return None
    return image, info, own_orientation != 1


def _fits(preview: tuple[int, int], sensor: tuple[int, int]) -> bool:
    """Large enough for the model and the sensor's shape (either way round)."""
    from indexer.ingest.decode import MODEL_IMAGE_SIZE

    if min(preview) < MODEL_IMAGE_SIZE or min(sensor) <= 0:
        return False
    aspect, target = preview[0] / preview[1], sensor[0] / sensor[1]
    return any(abs(aspect / t - 1) <= _ASPECT_TOLERANCE for t in (target, 1 / target))


def _demosaic(raw: Any, messages: list[str], label: str) -> Image.Image:
    """Half-size demosaic (one RGB pixel per Bayer cell), camera white balance, 8-bit sRGB.

    LibRaw applies the flip itself. LibRaw reports a short or damaged data stream only by
    printing it: such a file is refused, not indexed as a grey half-picture.
    """
    from PIL import Image

    rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
    damage = _damage(messages)
    if damage:
        raise OSError(damage)
    if np.count_nonzero(rgb) < rgb.size // 1000:  # LibRaw found no sensor data and said
        # nothing (sensor data stripped from the file): a few stray values, all else 0.
        raise RawError(f"{label} holds no image data (LibRaw read almost every pixel as 0)")
    return Image.fromarray(np.ascontiguousarray(rgb[..., :3]))


def _libraw_timestamp(raw: Any) -> datetime | None:
    """LibRaw's capture time (rawpy >= 0.25), read after unpacking; None when unknown."""
    try:
        stamp = raw.other.timestamp
    except Exception:  # older rawpy or nothing recorded
        return None
    return stamp if isinstance(stamp, datetime) else None


# ---------------------------------------------------------------------------------------------
# metadata


def _metadata(
    data: bytes,
    size: tuple[int, int],
    fmt: str,
    preview: ImageInfo | None,
    libraw_taken: datetime | None,
) -> ImageInfo:
    """The file's own TIFF/EXIF tags first, then the preview's EXIF, then LibRaw's time."""
    from indexer.ingest import textfields
    from indexer.ingest.decode import ImageInfo, _image_info

    exif = _tiff_exif(data)
    info = _image_info(size[0], size[1], fmt, exif)
    if exif is not None:  # captions and keywords in the RAW's own EXIF (no IPTC/XMP here)
        info = replace(info, texts=tuple(textfields.extract_texts(None, exif)))
    if preview is not None:
        gaps = {
            f.name: getattr(preview, f.name)
            for f in fields(ImageInfo)
            if f.name not in ("width", "height", "format") and getattr(info, f.name) in (None, ())
        }
        info = replace(info, **gaps)
    if info.taken_at is None:
        info = replace(info, taken_at=libraw_taken)
    if info.taken_at is not None and info.taken_at.year < 1980:
        # LibRaw writes its own EXIF block into the preview it hands out (make, model,
        # orientation and its timestamp, 1970-01-01 when it found none): no real time.
        info = replace(info, taken_at=None)
    return info


def _tiff_exif(data: bytes) -> Image.Exif | None:
    """The RAW's first IFD read as EXIF, for the TIFF-based RAWs; None for the others.

    Olympus (IIRO/IIRS/MMOR) and Panasonic (IIU) write a TIFF with their own magic number:
    read as TIFF once the standard one is put in its place. Only the file's first part is
    handed to Pillow (copying a 50 MB RAW to read a few tags cost more than the preview's
    decode): the tags and their values sit there, before the sensor data.
    """
    from PIL import Image

    head = data[:4]
    standard = {b"IIRO": b"II*\x00", b"IIRS": b"II*\x00", b"IIU\x00": b"II*\x00"}
    standard |= {b"MMOR": b"MM\x00*", b"II*\x00": head, b"MM\x00*": head}
    if head not in standard or len(data) < 8:
        return None
    first_ifd = int.from_bytes(data[4:8], "little" if head.startswith(b"II") else "big")
    window = max(_TAG_WINDOW, first_ifd + _TAG_WINDOW)
    exif = Image.Exif()
    try:
        exif.load(standard[head] + data[4:window])
    except Exception:  # a broken IFD never blocks indexing
        return None
    return exif


# ---------------------------------------------------------------------------------------------
# helpers


def _label(hint: object) -> tuple[str, str]:
    """('camera RAW (NEF)', 'NEF') from a path or name; a generic label for bytes."""
    if isinstance(hint, (str, os.PathLike)):
        suffix = os.path.splitext(os.fsdecode(hint))[1].lower()
        if suffix in RAW_FORMATS:
            return raw_label(suffix), RAW_FORMATS[suffix]
    return "camera RAW", "RAW"


def raw_label(suffix: str) -> str:
    """How messages name a RAW format: 'camera RAW (Nikon NEF)', 'camera RAW (DNG)'."""
    fmt = RAW_FORMATS.get(suffix.lower())
    if fmt is None:
        return "camera RAW"
    maker = _MAKERS.get(suffix.lower())
    return f"camera RAW ({maker} {fmt})" if maker else f"camera RAW ({fmt})"


def _read(source: Source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if not isinstance(source, (str, os.PathLike)):
        raise DecodeError(f"cannot decode a {type(source).__name__}: pass a path or bytes")
    with open(source, "rb") as handle:
        return handle.read()


def _damage(messages: list[str]) -> str | None:
    """LibRaw's own words for a short or damaged data stream, if it printed any."""
    for line in messages:
        lowered = line.lower()
        if any(word in lowered for word in _LIBRAW_DAMAGE):
            return line.split(": ", 1)[-1].strip()
    return None


@contextlib.contextmanager
def _libraw_messages() -> Iterator[list[str]]:
    """Collect what LibRaw prints on stderr (e.g. "Unexpected end of file") meanwhile.

    LibRaw reports a damaged data stream only by printing it from C; the text is taken off
    file descriptor 2 so it becomes a failure reason instead of noise on the user's
    terminal. Lines that are not LibRaw's (another thread's log) are written back.
    """
    messages: list[str] = []
    with _CAPTURE_LOCK, tempfile.TemporaryFile() as sink:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to borrow: nothing to collect
            yield messages
            return
        os.dup2(sink.fileno(), 2)
        try:
            yield messages
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            _sort_lines(sink.read().decode("utf-8", "replace"), messages)


def _sort_lines(text: str, messages: list[str]) -> None:
    """LibRaw's lines go to ``messages``; anything else back to stderr."""
    others = []
    for line in text.splitlines():
        is_libraw = any(word in line.lower() for word in _LIBRAW_DAMAGE)
        (messages if is_libraw else others).append(line)
    if others:
        with contextlib.suppress(OSError):
            os.write(2, ("\n".join(others) + "\n").encode())


def _first_line(exc: BaseException) -> str:
    """The exception's message as one short line (LibRaw's come as bytes reprs)."""
    text = str(exc.args[0] if exc.args else exc)
    if text.startswith(("b'", 'b"')):
        text = text[2:-1]
    text = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
