"""JPEG XL through pillow-jxl-plugin (libjxl): registration, and its size before decoding.

This module is pillow_jxl's one home. The plugin decodes the whole image while Pillow is
still identifying the file, so the pixel limit cannot wait for Pillow's header size as
it does for every other format: :func:`declared_size` reads the width and height from
the JPEG XL SizeHeader (a few bytes, plain codestream or inside the ISO-BMFF container)
and decode.py checks them before Pillow sees the file.
"""

from __future__ import annotations

import struct
from typing import IO

CODESTREAM_SIGNATURE = b"\xff\x0a"
CONTAINER_SIGNATURE = b"\x00\x00\x00\x0cJXL \r\n\x87\n"
_HEAD_BYTES = 1 << 16  # the codestream box is found within this many bytes of the start
# SizeHeader aspect ratios 1..7 (ISO/IEC 18181-1, 'ratio' field): xsize = ysize * num / den
_RATIOS = {1: (1, 1), 2: (12, 10), 3: (4, 3), 4: (3, 2), 5: (16, 9), 6: (5, 4), 7: (2, 1)}


def register() -> bool:
    """Register the JPEG XL opener with Pillow; False when the plugin is not installed."""
    try:
        import pillow_jxl  # noqa: F401  (importing it registers the "JXL" format)
    except ImportError:
        return False
    return True


def looks_like_jxl(head: bytes) -> bool:
    """True for the first bytes of a JPEG XL codestream or container."""
    return head.startswith(CODESTREAM_SIGNATURE) or head.startswith(CONTAINER_SIGNATURE)


def declared_size(fp: IO[bytes]) -> tuple[int, int] | None:
    """(width, height) a JPEG XL file declares, or None when it is no JPEG XL or the header
    is unreadable (libjxl then refuses the file with its own error). ``fp`` is rewound."""
    position = fp.tell()
    try:
        fp.seek(0)
        head = fp.read(_HEAD_BYTES)
    finally:
        fp.seek(position)
    codestream = _codestream(head)
    if codestream is None or len(codestream) < 2 + 9:
        return None
    try:
        return _size_header(codestream[2:])
    except IndexError:  # the header runs past what we read: let libjxl judge
        return None


def failure_reason(exc: BaseException) -> str:
    """libjxl says only 'Generic Error' for a damaged file: say what that means."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "generic error" in text.lower():
        return "corrupt JPEG XL (libjxl could not decode it)"
    return f"corrupt JPEG XL: {text[:160]}"


def _codestream(head: bytes) -> bytes | None:
    """The codestream's first bytes: the file itself, or its jxlc/first jxlp box."""
    if head.startswith(CODESTREAM_SIGNATURE):
        return head
    if not head.startswith(CONTAINER_SIGNATURE):
        return None
    offset = 0
    while offset + 8 <= len(head):
        size, kind = struct.unpack(">I4s", head[offset : offset + 8])
        header = 8
        if size == 1:
            if offset + 16 > len(head):
                return None
            size, header = struct.unpack(">Q", head[offset + 8 : offset + 16])[0], 16
        if kind == b"jxlc":
            return head[offset + header :]
        if kind == b"jxlp":
            return head[offset + header + 4 :]  # after the part's 4-byte index
        if size < header:  # 0 ("to the end") or damaged: no codestream box found
            return None
        offset += size
    return None


class _Bits:
    """LSB-first bit reader (JPEG XL's bit order)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0

    def read(self, count: int) -> int:
        value = 0
        for index in range(count):
            byte = self.data[(self.position + index) >> 3]
            value |= ((byte >> ((self.position + index) & 7)) & 1) << index
        self.position += count
        return value

    def u32_size(self) -> int:
        """U32(u(9), u(13), u(18), u(30)) + 1: a size field's 'not small' form."""
        return self.read((9, 13, 18, 30)[self.read(2)]) + 1


def _size_header(data: bytes) -> tuple[int, int]:
    """Parse SizeHeader: small sizes count in multiples of 8, else U32 fields."""
    bits = _Bits(data)
    small = bits.read(1)
    height = (bits.read(5) + 1) * 8 if small else bits.u32_size()
    ratio = bits.read(3)
    if ratio:
        numerator, denominator = _RATIOS[ratio]
        return height * numerator // denominator, height
    width = (bits.read(5) + 1) * 8 if small else bits.u32_size()
    return width, height
