"""Photos with words in them, made by the tests: embedded metadata and rendered text.

Writers without exiftool: EXIF through Pillow, IPTC-IIM in a Photoshop APP13 segment and XMP
in an APP1 segment built byte by byte and spliced into a JPEG after its SOI marker (so the
tests can also write garbage, mixed encodings and oversized packets). Rendered text: words
drawn onto a background (a corpus photo when given, else a synthetic one) as a sign, a
receipt or a screenshot, at a chosen size, angle, font and contrast. The fusion tests and
bench/bench_ocr.py use the same makers.
"""

from __future__ import annotations

import io
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

XMP_HEADER = b"http://ns.adobe.com/xap/1.0/\x00"
FONT_DIRS = (Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/truetype/liberation"))
UTF8_MARK = b"\x1b%G"

# Words the rendered set draws: plain, distinct, each a single dictionary-like token.
WORDS = (
    "receipt", "coffee", "invoice", "station", "museum", "garden", "ticket", "bakery",
    "library", "pharmacy", "parking", "harbour", "market", "theatre", "hotel", "bridge",
    "closed", "welcome", "exit", "platform", "total", "change", "orange", "window",
    "summer", "winter", "castle", "river", "mountain", "airport", "gallery", "kitchen",
)  # fmt: skip


# -- metadata -----------------------------------------------------------------------------------
def iptc_dataset(record: int, dataset: int, value: bytes) -> bytes:
    """One IPTC-IIM dataset (tag marker 0x1C, record, dataset, 2-byte length, value)."""
    return bytes([0x1C, record, dataset]) + struct.pack(">H", len(value)) + value


def iptc_block(
    keywords: Sequence[str] = (),
    caption: str | None = None,
    *,
    encoding: str = "utf-8",
    declare_utf8: bool = True,
    raw: Sequence[tuple[int, int, bytes]] = (),
) -> bytes:
    """IPTC-IIM data: CodedCharacterSet (1:90) when ``declare_utf8``, keywords (2:25),
    caption (2:120) in ``encoding``, then ``raw`` (record, dataset, bytes) as given."""
    out = iptc_dataset(1, 90, UTF8_MARK) if declare_utf8 else b""
    for word in keywords:
        out += iptc_dataset(2, 25, word.encode(encoding))
    if caption is not None:
        out += iptc_dataset(2, 120, caption.encode(encoding))
    for record, dataset, value in raw:
        out += iptc_dataset(record, dataset, value)
    return out


def app13_segment(iptc: bytes) -> bytes:
    """A JPEG APP13 segment: "Photoshop 3.0" + one 8BIM resource 0x0404 holding ``iptc``."""
    resource = b"8BIM" + struct.pack(">H", 0x0404) + b"\x00\x00" + struct.pack(">I", len(iptc))
    resource += iptc + (b"\x00" if len(iptc) % 2 else b"")
    return _segment(0xED, b"Photoshop 3.0\x00" + resource)


def xmp_packet(
    subjects: Sequence[str] = (),
    description: str | None = None,
    hierarchical: Sequence[str] = (),
    digikam: Sequence[str] = (),
) -> bytes:
    """An XMP packet with dc:subject, dc:description, lr:hierarchicalSubject, digiKam tags."""

    def bag(tag: str, items: Sequence[str]) -> str:
        lis = "".join(f"<rdf:li>{_xml(item)}</rdf:li>" for item in items)
        return f"<{tag}><rdf:Bag>{lis}</rdf:Bag></{tag}>" if items else ""

    body = bag("dc:subject", subjects) + bag("lr:hierarchicalSubject", hierarchical)
    body += bag("digiKam:TagsList", digikam)
    if description is not None:
        body += (
            '<dc:description><rdf:Alt><rdf:li xml:lang="x-default">'
            f"{_xml(description)}</rdf:li></rdf:Alt></dc:description>"
        )
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/" '
        'xmlns:lr="http://ns.adobe.com/lightroom/1.0/" '
        'xmlns:digiKam="http://www.digikam.org/ns/1.0/">'
        f"{body}</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode()


def xmp_segment(packet: bytes) -> bytes:
    """A JPEG APP1 XMP segment (at most 65,533 bytes of payload, as JPEG allows)."""
    return _segment(0xE1, XMP_HEADER + packet)


def _segment(marker: int, payload: bytes) -> bytes:
    if len(payload) + 2 > 0xFFFF:
        raise ValueError("a JPEG segment holds at most 65,533 bytes")
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def jpeg_bytes(
    image: Image.Image | None = None,
    *,
    description: str | None = None,
    user_comment: bytes | None = None,
    segments: Sequence[bytes] = (),
) -> bytes:
    """A JPEG of ``image`` (a small synthetic one by default) with EXIF ImageDescription /
    UserComment written by Pillow and raw ``segments`` spliced in after SOI."""
    image = image or synthetic_background(160, 120, seed=1)
    exif = Image.Exif()
    if description is not None:
        exif[0x010E] = description
    if user_comment is not None:
        exif.get_ifd(0x8769)[0x9286] = user_comment
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=90, exif=exif.tobytes())
    data = out.getvalue()
    return data[:2] + b"".join(segments) + data[2:]


def write_jpeg(path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(**kwargs))
    return path


# -- rendered text -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TextPhoto:
    """A made photo with words drawn on it (``words``: what a reader should find)."""

    path: Path
    words: tuple[str, ...]
    kind: str  # sign | receipt | screenshot
    size: int  # font size in pixels
    angle: float
    contrast: str  # high | low
    font: str


def fonts() -> list[tuple[str, Path | None]]:
    """(name, file) of the fonts to render with: DejaVu/Liberation when installed, and
    Pillow's built-in default (file None)."""
    found: list[tuple[str, Path | None]] = []
    for folder in FONT_DIRS:
        for name in ("DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "LiberationSans-Regular.ttf"):
            if (folder / name).is_file():
                found.append((name.removesuffix(".ttf"), folder / name))
    return [*found, ("pillow-default", None)]


def load_font(file: Path | None, size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    if file is not None:
        return ImageFont.truetype(str(file), size)
    return ImageFont.load_default(size)


def synthetic_background(width: int, height: int, seed: int) -> Image.Image:
    """A smooth colour field with soft blobs: photo-like, without any text."""
    rng = random.Random(seed)
    small = Image.new("RGB", (8, 6))
    small.putdata([tuple(rng.randrange(40, 220) for _ in range(3)) for _ in range(48)])
    return small.resize((width, height), Image.Resampling.BICUBIC)


def render_text(
    background: Image.Image,
    words: Sequence[str],
    *,
    kind: str = "sign",
    size: int = 48,
    angle: float = 0.0,
    contrast: str = "high",
    font_file: Path | None = None,
) -> Image.Image:
    """``words`` drawn on a panel (a sign, a receipt, a screenshot window) pasted onto
    ``background``, rotated by ``angle`` degrees; ``contrast`` "low" draws grey on grey."""
    font = load_font(font_file, size)
    lines = _layout(words, kind)
    ink, paper = (
        ((20, 20, 20), (245, 245, 240)) if contrast == "high" else ((95, 95, 95), (150, 150, 150))
    )
    if kind == "sign":
        ink, paper = (
            ((255, 255, 255), (25, 70, 160))
            if contrast == "high"
            else ((120, 140, 170), (70, 95, 150))
        )
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [draw_probe.textbbox((0, 0), line, font=font) for line in lines]
    line_h = max(b[3] - b[1] for b in boxes) + size // 2
    width = max(b[2] - b[0] for b in boxes) + 2 * size
    height = line_h * len(lines) + size
    panel = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(panel)
    if kind == "screenshot":  # a title bar
        draw.rectangle((0, 0, width, size // 3), fill=(60, 60, 70))
    for i, line in enumerate(lines):
        draw.text((size, size // 2 + i * line_h), line, fill=ink, font=font)
    if angle:
        panel = panel.convert("RGBA").rotate(angle, expand=True, resample=Image.Resampling.BICUBIC)
    canvas = background.convert("RGB").copy()
    scale = min(1.0, 0.9 * canvas.width / panel.width, 0.9 * canvas.height / panel.height)
    if scale < 1.0:
        panel = panel.resize((int(panel.width * scale), int(panel.height * scale)))
    left, top = (canvas.width - panel.width) // 2, (canvas.height - panel.height) // 2
    canvas.paste(panel, (left, top), panel if panel.mode == "RGBA" else None)
    return canvas


def _layout(words: Sequence[str], kind: str) -> list[str]:
    if kind == "receipt":  # one item per line with a price
        return [f"{word.upper()}  {3 + i}.50" for i, word in enumerate(words)]
    if kind == "screenshot":
        return [" ".join(words[i : i + 2]) for i in range(0, len(words), 2)]
    return [" ".join(words[i : i + 3]) for i in range(0, len(words), 3)]


def make_text_set(
    folder: Path,
    count: int,
    *,
    backgrounds: Sequence[Path] = (),
    seed: int = 0,
    sizes: Sequence[int] = (28, 40, 64),
    angles: Sequence[float] = (0.0, 0.0, 5.0, -8.0),
    contrasts: Sequence[str] = ("high", "high", "low"),
    kinds: Sequence[str] = ("sign", "receipt", "screenshot"),
    image_size: tuple[int, int] = (1024, 768),
) -> list[TextPhoto]:
    """``count`` JPEGs of ``image_size`` with 2-4 words each, cycling kinds, sizes, angles,
    contrasts and fonts; backgrounds from ``backgrounds`` (photos) or synthetic."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    font_list = fonts()
    made: list[TextPhoto] = []
    for i in range(count):
        words = tuple(rng.sample(WORDS, rng.randint(2, 4)))
        kind = kinds[i % len(kinds)]  # the other traits drawn independently of the kind
        size, angle, contrast = rng.choice(sizes), rng.choice(angles), rng.choice(contrasts)
        font_name, font_file = rng.choice(font_list)
        if backgrounds:
            with Image.open(backgrounds[i % len(backgrounds)]) as bg:
                base = bg.convert("RGB").resize(image_size)
        else:
            base = synthetic_background(*image_size, seed=seed * 1000 + i)
        image = render_text(
            base, words, kind=kind, size=size, angle=angle, contrast=contrast, font_file=font_file
        )
        path = folder / f"text_{i:04d}.jpg"
        image.save(path, "JPEG", quality=90)
        made.append(TextPhoto(path, words, kind, size, angle, contrast, font_name))
    return made


def make_plain_set(
    folder: Path, count: int, *, seed: int = 0, image_size: tuple[int, int] = (1024, 768)
) -> list[Path]:
    """``count`` synthetic JPEGs of ``image_size`` with no text at all."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"plain_{i:04d}.jpg"
        background = synthetic_background(*image_size, seed=seed * 1000 + 500 + i)
        background.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths
