"""Camera RAW test files the project makes itself: DNGs written from ordinary photos.

A DNG is a TIFF: the sensor data is a colour-filter-array (Bayer RGGB) image of linear
12-bit values; the tags tell a RAW converter how to read it (DNG 1.4). The writer here
is a small TIFF writer (no extra dependency), enough for LibRaw:

- the mosaic is sampled from the photo after undoing its sRGB gamma, so a demosaic of the
  DNG gives back (close to) the photo;
- ColorMatrix1 is XYZ (D65) -> linear sRGB, AsShotNeutral 1,1,1: the "camera" sees sRGB;
- with ``preview=JPEG bytes`` the first IFD is that JPEG preview (NewSubFileType 1,
  Compression 7, as cameras and Adobe's converter write it) and the sensor image is its
  SubIFD; without, the first IFD is the sensor image itself (no preview at all).
"""

from __future__ import annotations

import io
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

WHITE_LEVEL = 4095
XYZ_TO_LINEAR_SRGB = (
    (3.2404542, -1.5371385, -0.4985314),
    (-0.9692660, 1.8760108, 0.0415560),
    (0.0556434, -0.2040259, 1.0572252),
)
BYTE, ASCII, SHORT, LONG, RATIONAL, SRATIONAL = 1, 2, 3, 4, 5, 10
_FORMATS = {BYTE: "B", SHORT: "H", LONG: "I", RATIONAL: "I", SRATIONAL: "i"}


def bayer_mosaic(rgb: np.ndarray) -> np.ndarray:
    """RGGB mosaic (uint16, 0..WHITE_LEVEL) of an 8-bit sRGB image cut to even sides."""
    height, width = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    values = rgb[:height, :width].astype(np.float64) / 255.0
    linear = np.where(values <= 0.04045, values / 12.92, ((values + 0.055) / 1.055) ** 2.4)
    cfa = np.empty((height, width), np.float64)
    cfa[0::2, 0::2] = linear[0::2, 0::2, 0]
    cfa[0::2, 1::2] = linear[0::2, 1::2, 1]
    cfa[1::2, 0::2] = linear[1::2, 0::2, 1]
    cfa[1::2, 1::2] = linear[1::2, 1::2, 2]
    return np.rint(cfa * WHITE_LEVEL).astype(np.uint16)


def jpeg_bytes(image: Image.Image, long_side: int, exif: Image.Exif | None = None) -> bytes:
    """``image`` shrunk to ``long_side`` as JPEG bytes (a camera's embedded preview)."""
    preview = image.copy()
    preview.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    preview.save(out, "JPEG", quality=90, **({"exif": exif} if exif is not None else {}))
    return out.getvalue()


def write_dng(
    path: Path,
    photo: Image.Image,
    *,
    preview: bytes | None = None,
    orientation: int = 1,
    make: str = "Clipdex",
    model: str = "Test Camera",
    taken: str | None = "2021:06:05 14:30:00",
    description: str | None = None,
) -> Path:
    """Write ``photo`` (upright as the sensor saw it) as a CFA DNG; see the module doc."""
    cfa = bayer_mosaic(np.asarray(photo.convert("RGB")))
    camera = {
        50706: (BYTE, [1, 4, 0, 0]),  # DNGVersion
        50708: (ASCII, f"{make} {model}"),  # UniqueCameraModel
        50721: (SRATIONAL, _rationals(v for row in XYZ_TO_LINEAR_SRGB for v in row)),
        50778: (SHORT, [21]),  # CalibrationIlluminant1: D65
        50728: (RATIONAL, [1, 1, 1, 1, 1, 1]),  # AsShotNeutral
        271: (ASCII, make),
        272: (ASCII, model),
        274: (SHORT, [orientation]),
        **({306: (ASCII, taken)} if taken else {}),
        **({270: (ASCII, description)} if description else {}),  # ImageDescription
    }
    sensor = _cfa_tags(cfa)
    writer = _TiffWriter()
    if preview is None:
        writer.ifd({**camera, **sensor}, cfa.tobytes())
    else:
        main = writer.ifd({**camera, **_preview_tags(preview)}, preview)
        writer.ifd(sensor, cfa.tobytes(), parent=main)
    path.write_bytes(writer.finish())
    return path


def _cfa_tags(cfa: np.ndarray) -> dict[int, tuple[int, object]]:
    height, width = cfa.shape
    return {
        254: (LONG, [0]),  # NewSubFileType: the main image
        256: (LONG, [width]),
        257: (LONG, [height]),
        258: (SHORT, [16]),
        259: (SHORT, [1]),  # uncompressed
        262: (SHORT, [32803]),  # PhotometricInterpretation: CFA
        277: (SHORT, [1]),
        278: (LONG, [height]),
        279: (LONG, [cfa.nbytes]),
        284: (SHORT, [1]),
        33421: (SHORT, [2, 2]),  # CFARepeatPatternDim
        33422: (BYTE, [0, 1, 1, 2]),  # CFAPattern: R G / G B
        50710: (BYTE, [0, 1, 2]),  # CFAPlaneColor
        50711: (SHORT, [1]),  # CFALayout: rectangular
        50714: (LONG, [0]),  # BlackLevel
        50717: (LONG, [WHITE_LEVEL]),  # WhiteLevel
    }


def _preview_tags(jpeg: bytes) -> dict[int, tuple[int, object]]:
    width, height = Image.open(io.BytesIO(jpeg)).size
    return {
        254: (LONG, [1]),  # NewSubFileType: reduced-resolution preview
        256: (LONG, [width]),
        257: (LONG, [height]),
        258: (SHORT, [8, 8, 8]),
        259: (SHORT, [7]),  # JPEG
        262: (SHORT, [6]),  # YCbCr
        277: (SHORT, [3]),
        278: (LONG, [height]),
        279: (LONG, [len(jpeg)]),
        284: (SHORT, [1]),
    }


def _rationals(values) -> list[int]:
    out: list[int] = []
    for value in values:
        fraction = Fraction(value).limit_denominator(10000)
        out += [fraction.numerator, fraction.denominator]
    return out


class _TiffWriter:
    """Little-endian TIFF laid out as cameras do: header, IFDs, then the image data (so a
    file cut short keeps its tags and loses pixels). One strip per image; the first IFD
    added is IFD0, an IFD added with ``parent`` is that IFD's SubIFD (tag 330)."""

    def __init__(self) -> None:
        self.ifds: list[tuple[dict[int, tuple[int, object]], bytes]] = []
        self.children: dict[int, int] = {}

    def ifd(self, tags: dict[int, tuple[int, object]], strip: bytes, parent: int = -1) -> int:
        self.ifds.append((tags, strip))
        if parent >= 0:
            self.children[parent] = len(self.ifds) - 1
        return len(self.ifds) - 1

    def finish(self) -> bytes:
        # Every tag's size is known before any offset is (273 and 330 hold one LONG).
        sizes = [_ifd_size({**tags, 273: (LONG, [0]), 330: (LONG, [0])}) for tags, _ in self.ifds]
        offsets = [8 + sum(sizes[:i]) for i in range(len(sizes))]
        strips, position = [], 8 + sum(sizes)
        for _, strip in self.ifds:
            strips.append(position)
            position += len(strip) + (len(strip) & 1)
        out = bytearray(b"II*\x00" + struct.pack("<I", offsets[0]))
        for index, (tags, _) in enumerate(self.ifds):
            tags = {**tags, 273: (LONG, [strips[index]])}
            if index in self.children:
                tags[330] = (LONG, [offsets[self.children[index]]])
            out += _ifd_bytes(tags, offsets[index]).ljust(sizes[index], b"\x00")
        for _, strip in self.ifds:
            out += strip + b"\x00" * (len(strip) & 1)
        return bytes(out)


def _ifd_size(tags: dict[int, tuple[int, object]]) -> int:
    size = len(_ifd_bytes(tags, 0))
    return size + (size & 1)


def _ifd_bytes(tags: dict[int, tuple[int, object]], offset: int) -> bytes:
    entries, extra = [], bytearray()
    extra_base = offset + 2 + 12 * len(tags) + 4
    for tag in sorted(tags):
        kind, value = tags[tag]
        payload, count = _encode(kind, value)
        if len(payload) <= 4:
            field = payload.ljust(4, b"\x00")
        else:
            field = struct.pack("<I", extra_base + len(extra))
            extra += payload + b"\x00" * (len(payload) & 1)
        entries.append(struct.pack("<HHI", tag, kind, count) + field)
    return struct.pack("<H", len(tags)) + b"".join(entries) + b"\x00" * 4 + bytes(extra)


def _encode(kind: int, value: object) -> tuple[bytes, int]:
    if kind == ASCII:
        data = str(value).encode("ascii") + b"\x00"
        return data, len(data)
    values = list(value)  # type: ignore[call-overload]
    count = len(values) // 2 if kind in (RATIONAL, SRATIONAL) else len(values)
    return struct.pack(f"<{len(values)}{_FORMATS[kind]}", *values), count
