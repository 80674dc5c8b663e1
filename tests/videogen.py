"""Videos the tests (and bench/bench_video.py) write themselves with PyAV from photos.

A video is a list of scenes, each a still photo held for some seconds (with a little
noise so the encoder has motion to code); the cut times are therefore known exactly.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from PIL import Image

# (container suffix, codec) pairs this PyAV wheel can write; each is read back by the tests.
FORMATS = {
    "mp4-h264": (".mp4", "libx264"),
    "webm-vp9": (".webm", "libvpx-vp9"),
    "avi-mpeg4": (".avi", "mpeg4"),
    "mkv-h264": (".mkv", "libx264"),
    "mov-hevc": (".mov", "libx265"),
}


def scene_image(photo: str | Path | Image.Image, size: tuple[int, int]) -> Image.Image:
    """A photo scaled and centre-cropped to ``size`` (width, height)."""
    image = photo if isinstance(photo, Image.Image) else Image.open(photo)
    image = image.convert("RGB")
    scale = max(size[0] / image.width, size[1] / image.height)
    resized = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    )
    left, top = (resized.width - size[0]) // 2, (resized.height - size[1]) // 2
    return resized.crop((left, top, left + size[0], top + size[1]))


def write_video(
    path: str | Path,
    photos: Sequence[str | Path | Image.Image],
    seconds: Sequence[float] | float = 2.0,
    *,
    kind: str = "mp4-h264",
    size: tuple[int, int] = (192, 128),
    fps: int = 10,
    rotation: int = 0,
    creation_time: dt.datetime | None = None,
    gop: int = 10,
    noise: int = 3,
    pan: int = 0,
) -> list[float]:
    """Write one scene per photo; returns the start time of each scene (seconds).

    ``rotation``: counter-clockwise degrees a player must turn the stored picture; the
    photos are stored turned the other way, so a player that honours it shows them upright
    (as a phone does with a portrait clip). ``noise``: +- this much random noise per pixel
    and frame (motion for the encoder; 0 for none); ``pan``: pixels the view moves right per
    frame within a scene (a slow camera pan, cheap to write).
    """
    path = Path(path)
    suffix, codec = FORMATS[kind]
    assert path.suffix == suffix, f"{kind} videos end in {suffix}"
    durations = [seconds] * len(photos) if isinstance(seconds, (int, float)) else list(seconds)
    stored = size if rotation % 180 == 0 else (size[1], size[0])
    rng = np.random.default_rng(0)
    starts, at = [], 0.0
    with av.open(str(path), "w") as container:
        if creation_time is not None:
            container.metadata["creation_time"] = creation_time.strftime(
                "%Y-%m-%dT%H:%M:%S.000000Z"
            )
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = stored
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx265":
            stream.options = {"x265-params": "log-level=none"}
        if rotation:
            stream.set_display_rotation(rotation)
        for photo, duration in zip(photos, durations):
            starts.append(at)
            count = max(1, round(duration * fps))
            wide = scene_image(photo, (size[0] + pan * count, size[1]))
            for i in range(count):
                picture = wide.crop((pan * i, 0, pan * i + size[0], size[1]))
                if rotation:
                    picture = picture.rotate(-rotation, expand=True)
                pixels = np.asarray(picture)
                if noise:
                    jitter = rng.integers(-noise, noise + 1, pixels.shape)
                    pixels = np.clip(pixels.astype(np.int16) + jitter, 0, 255).astype(np.uint8)
                frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            at += count / fps
        for packet in stream.encode():
            container.mux(packet)
    return starts


def write_audio_only(path: str | Path, seconds: float = 1.0) -> None:
    """An .mp4 with one AAC audio stream and no video."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=22050)
        samples = int(22050 * seconds)
        for start in range(0, samples, 1024):
            n = min(1024, samples - start)
            tone = (0.1 * np.sin(np.arange(start, start + n) / 10)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(tone[None], format="fltp", layout="mono")
            frame.sample_rate = 22050
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def truncate(path: str | Path, keep: float = 0.4) -> None:
    """Cut a file to ``keep`` of its bytes (a copy interrupted mid-way)."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
