"""Words people and cameras wrote into a photo: EXIF, IPTC and XMP captions and keywords.

Read at decode time in the decode workers from the image Pillow already opened (no second
read of the file). What is extracted, as ``(source, text, None)`` rows for the catalog's
``image_text`` (:mod:`indexer.store.textindex`):

- ``description``: EXIF ImageDescription and UserComment, Windows XPTitle/XPComment/XPSubject,
  IPTC Caption-Abstract (2:120), Headline (2:105) and Object Name (2:05), XMP dc:description
  and dc:title;
- ``keywords``: IPTC Keywords (2:25), XMP dc:subject, Lightroom lr:hierarchicalSubject,
  digiKam TagsList, Windows XPKeywords; hierarchical keywords keep their levels
  ("Places|Italy|Rome": each level is a word to the index).

Metadata is hostile input like pixels are: every reader here is bounded (XMP packets are
read up to :data:`MAX_XMP_BYTES` with linear scans, never an XML parser; at most
:data:`MAX_ITEMS` keywords) and degrades to nothing on garbage. IPTC text is decoded as
UTF-8 when its CodedCharacterSet (1:90) says so or when it is valid UTF-8, else as Latin-1
(Windows-1252), the encoding of legacy IPTC writers; text that is mostly not printable is
dropped. Nothing here ever fails a photo: :func:`extract_texts` returns [] at worst.
"""

from __future__ import annotations

import html
import re
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from PIL import Image

MAX_XMP_BYTES = 1 << 20  # an XMP packet is read up to this many bytes (a JPEG's is < 64 KB)
MAX_IPTC_BYTES = 1 << 20
MAX_ITEMS = 200  # keywords (and description parts) kept per photo
MAX_ITEM_CHARS = 2000

_DESCRIPTION, _KEYWORDS = "description", "keywords"
_IMAGE_DESCRIPTION, _EXIF_IFD, _USER_COMMENT = 0x010E, 0x8769, 0x9286
_XP_TITLE, _XP_COMMENT, _XP_KEYWORDS, _XP_SUBJECT = 0x9C9B, 0x9C9C, 0x9C9E, 0x9C9F
_TIFF_XMP, _TIFF_IPTC, _TIFF_PHOTOSHOP = 700, 33723, 34377
_PHOTOSHOP = b"Photoshop 3.0\x00"
_IPTC_RESOURCE = 0x0404
_IPTC_KEYWORDS, _IPTC_CAPTION, _IPTC_HEADLINE, _IPTC_OBJECT_NAME = 25, 120, 105, 5
_UTF8_ESCAPES = (b"\x1b%G", b"\x1b%/G", b"\x1b%/I")  # ISO 2022 designations of UTF-8

# XMP elements whose rdf:li items are keywords / descriptions.
_XMP_KEYWORD_TAGS = ("dc:subject", "lr:hierarchicalSubject", "digiKam:TagsList")
_XMP_DESCRIPTION_TAGS = ("dc:description", "dc:title")
_RDF_LI = re.compile(rf"<rdf:li\b[^>]{{0,200}}>([^<]{{0,{MAX_ITEM_CHARS}}})</rdf:li>")


def extract_texts(im: Image.Image, exif: Image.Exif | None) -> list[tuple[str, str, None]]:
    """The description and keyword rows of an opened image; [] when it has none."""
    descriptions: list[str] = []
    keywords: list[str] = []
    for reader in (_exif_texts, _iptc_texts, _xmp_texts):
        try:
            more_descriptions, more_keywords = reader(im, exif)
        except Exception:  # one broken block never hides the others, nor fails the photo
            continue
        descriptions += more_descriptions
        keywords += more_keywords
    rows = []
    if text := _join(descriptions, " · "):
        rows.append((_DESCRIPTION, text, None))
    if text := _join(keywords, "; "):
        rows.append((_KEYWORDS, text, None))
    return rows


def _join(items: Iterable[str], separator: str) -> str:
    """Clean, distinct (case-insensitively) items joined, at most :data:`MAX_ITEMS`."""
    seen: dict[str, str] = {}
    for item in items:
        text = clean(item)
        if text and text.casefold() not in seen and len(seen) < MAX_ITEMS:
            seen[text.casefold()] = text
    return separator.join(seen.values())


def clean(text: str) -> str:
    """Printable text in one line, or "" when it is mostly garbage (binary read as text)."""
    text = text[:MAX_ITEM_CHARS].replace("\x00", " ")
    if not text.strip():
        return ""
    printable = [ch for ch in text if ch.isprintable() and ch != "\ufffd"]
    if len(printable) < 0.8 * len(text.replace("\n", "").replace("\r", "")):
        return ""
    return " ".join("".join(printable).split())


# -- EXIF -----------------------------------------------------------------------------------------
def _exif_texts(im: Image.Image, exif: Image.Exif | None) -> tuple[list[str], list[str]]:
    if exif is None:
        return [], []
    descriptions = [_exif_string(exif.get(_IMAGE_DESCRIPTION))]
    try:
        sub = exif.get_ifd(_EXIF_IFD)
    except Exception:
        sub = {}
    descriptions.append(_user_comment(sub.get(_USER_COMMENT)))
    descriptions += [_xp_string(exif.get(tag)) for tag in (_XP_TITLE, _XP_SUBJECT, _XP_COMMENT)]
    keywords = _split_keywords(_xp_string(exif.get(_XP_KEYWORDS)))
    return [d for d in descriptions if d], keywords


def _exif_string(value: Any) -> str:
    if isinstance(value, bytes):
        return decode_legacy(value)
    return value if isinstance(value, str) else ""


def _user_comment(value: Any) -> str:
    """EXIF UserComment: an 8-byte character code, then the text."""
    if isinstance(value, str):
        return value
    if not isinstance(value, bytes) or len(value) <= 8:
        return ""
    code, body = value[:8], value[8:]
    if code.startswith(b"UNICODE"):
        return _utf16(body)
    if code.startswith(b"JIS"):
        return body.decode("shift_jis", "replace")
    return decode_legacy(body)  # ASCII, or undefined (all zeros): often UTF-8 in practice


def _utf16(body: bytes) -> str:
    """UTF-16 of unknown byte order: the order whose text has more zero high bytes wins."""
    if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return body.decode("utf-16", "replace")
    little = body[1::2].count(0) >= body[0::2].count(0)
    return body.decode("utf-16-le" if little else "utf-16-be", "replace")


def _xp_string(value: Any) -> str:
    """Windows XP* tags: UTF-16LE bytes (Pillow may hand them as a tuple of byte values)."""
    if isinstance(value, tuple) and all(isinstance(v, int) and 0 <= v < 256 for v in value):
        value = bytes(value)
    if not isinstance(value, bytes):
        return ""
    return value.decode("utf-16-le", "replace").rstrip("\x00")


def _split_keywords(text: str) -> list[str]:
    return [part for part in re.split(r"[;,]", text) if part.strip()]


# -- IPTC -----------------------------------------------------------------------------------------
def _iptc_texts(im: Image.Image, _exif: Image.Exif | None) -> tuple[list[str], list[str]]:
    descriptions: list[str] = []
    keywords: list[str] = []
    for block in _iptc_blocks(im):
        records = list(_iptc_datasets(block[:MAX_IPTC_BYTES]))
        utf8 = any(r == (1, 90) and v.startswith(_UTF8_ESCAPES) for r, v in records)
        for (record, dataset), value in records:
            if record != 2:
                continue
            text = value.decode("utf-8", "replace") if utf8 else decode_legacy(value)
            if dataset == _IPTC_KEYWORDS:
                keywords.append(text)
            elif dataset in (_IPTC_CAPTION, _IPTC_HEADLINE, _IPTC_OBJECT_NAME):
                descriptions.append(text)
    return descriptions, keywords


def decode_legacy(value: bytes) -> str:
    """Bytes of unknown encoding: UTF-8 when they are valid UTF-8, else Windows-1252/Latin-1."""
    value = value.rstrip(b"\x00")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("cp1252", "replace")


def _iptc_blocks(im: Image.Image) -> Iterator[bytes]:
    """IPTC-IIM data: JPEG APP13 Photoshop resources, TIFF IPTC/Photoshop tags."""
    for marker, payload in getattr(im, "applist", None) or []:
        if marker == "APP13" and payload.startswith(_PHOTOSHOP):
            yield from _photoshop_iptc(payload[len(_PHOTOSHOP) :])
    tags = getattr(im, "tag_v2", None)
    if tags is not None:
        iptc = _tag_bytes(tags.get(_TIFF_IPTC))
        if iptc:
            yield iptc
        photoshop = _tag_bytes(tags.get(_TIFF_PHOTOSHOP))
        if photoshop:
            yield from _photoshop_iptc(photoshop)


def _tag_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value[:16]):
        try:
            return bytes(v & 0xFF for v in value[:MAX_IPTC_BYTES])
        except (TypeError, ValueError):
            return b""
    return b""


def _photoshop_iptc(data: bytes) -> Iterator[bytes]:
    """The IPTC resource (0x0404) of a Photoshop image-resource block ("8BIM" records)."""
    pos = 0
    while pos + 12 <= len(data) and data[pos : pos + 4] == b"8BIM":
        resource = struct.unpack(">H", data[pos + 4 : pos + 6])[0]
        name_length = data[pos + 6]
        pos += 6 + 1 + name_length + ((1 + name_length) % 2)  # Pascal name, padded to even
        if pos + 4 > len(data):
            return
        size = struct.unpack(">I", data[pos : pos + 4])[0]
        pos += 4
        if resource == _IPTC_RESOURCE:
            yield data[pos : pos + size]
        pos += size + (size % 2)


def _iptc_datasets(data: bytes) -> Iterator[tuple[tuple[int, int], bytes]]:
    """((record, dataset), value) of IPTC-IIM data; stops at the first malformed tag."""
    pos = 0
    while pos + 5 <= len(data) and data[pos] == 0x1C:
        record, dataset = data[pos + 1], data[pos + 2]
        size = struct.unpack(">H", data[pos + 3 : pos + 5])[0]
        pos += 5
        if size & 0x8000:  # extended length: the next (size & 0x7fff) bytes hold it
            count = size & 0x7FFF
            if count > 4 or pos + count > len(data):
                return
            size = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        if pos + size > len(data):
            return
        yield (record, dataset), data[pos : pos + size]
        pos += size


# -- XMP ------------------------------------------------------------------------------------------
def _xmp_texts(im: Image.Image, _exif: Image.Exif | None) -> tuple[list[str], list[str]]:
    packet = _xmp_packet(im)
    if not packet:
        return [], []
    keywords = [item for tag in _XMP_KEYWORD_TAGS for item in _xmp_items(packet, tag)]
    descriptions = [item for tag in _XMP_DESCRIPTION_TAGS for item in _xmp_items(packet, tag)]
    return descriptions, keywords


def _xmp_packet(im: Image.Image) -> str:
    """The XMP packet as text (JPEG APP1, PNG iTXt, WebP, TIFF tag 700), at most
    :data:`MAX_XMP_BYTES`; "" when absent."""
    info = getattr(im, "info", {}) or {}
    raw = info.get("xmp") or info.get("XML:com.adobe.xmp")
    if not raw:
        tags = getattr(im, "tag_v2", None)
        raw = _tag_bytes(tags.get(_TIFF_XMP)) if tags is not None else b""
    if isinstance(raw, bytes):
        return decode_legacy(raw[:MAX_XMP_BYTES])
    return raw[:MAX_XMP_BYTES] if isinstance(raw, str) else ""


def _xmp_items(packet: str, tag: str) -> list[str]:
    """The rdf:li items of the first ``<tag>`` element, or its attribute form ``tag="..."``.

    Linear scans only (``find`` and a regex without nested repetition), so a hostile packet
    costs at most a few passes over :data:`MAX_XMP_BYTES`.
    """
    start = packet.find(f"<{tag}")
    if start >= 0:
        end = packet.find(f"</{tag}>", start)
        if end < 0:
            return []
        body = packet[start:end]
        items = [html.unescape(m) for m in _RDF_LI.findall(body)[:MAX_ITEMS]]
        if items:
            return items
        inner = body[body.find(">") + 1 :]  # a plain text element
        return [html.unescape(inner)] if "<" not in inner else []
    attribute = re.search(rf'\b{re.escape(tag)}="([^"]{{0,{MAX_ITEM_CHARS}}})"', packet)
    return [html.unescape(attribute.group(1))] if attribute else []
