"""Video files: sample a few frames by scene change and turn them into model input.

The one home of PyAV (FFmpeg's libraries; its wheels ship the decoders). A video becomes a
handful of frames, each a searchable vector with its time, so a *moment* inside a clip can
be found. The cost per file is bounded whatever its length:

- a short clip is decoded once from start to end (the decoder runs on every frame, but
  only frames on an analysis grid are scaled down and looked at); a long one (more
  frames x pixels than ``Sampling.sequential_pixels``) is probed at most
  ``Sampling.probes`` times by seeking to the keyframe before each grid point and decoding
  that keyframe alone;
- every probe is compared as a tiny colour thumbnail with the last kept frame: a frame is
  kept when the picture changed by more than ``threshold`` (a scene change) and at least
  ``min_spacing`` seconds passed, or when ``max_spacing`` seconds passed without one;
- at most ``max_frames`` are kept (the biggest changes win), and only kept frames are
  scaled to the model's size; no frame is ever converted at full size;
- rotation metadata (the display matrix phones write) is honoured; a time bound
  (``Sampling.seconds``) fails a file that decodes forever.

Every failure (truncated, zero-length, audio only, unknown codec, absurd dimensions or
length) is a :class:`~indexer.errors.DecodeError` with a short reason.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import heapq
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from PIL import Image

from indexer.errors import ClipdexError, DecodeError, ImageTooLarge
from indexer.ingest import objectstore
from indexer.ingest.decode import MODEL_IMAGE_SIZE, to_model_input

# fmt: off
VIDEO_SUFFIXES: frozenset[str] = frozenset({
    ".mp4", ".m4v", ".mov", ".qt", ".mkv", ".webm", ".avi", ".3gp", ".3g2", ".mts", ".m2ts",
    ".mpg", ".mpeg", ".wmv", ".ogv",
})
# fmt: on
"""File suffixes (lower case) that discovery treats as videos."""

MAX_HOURS = 48.0  # a longer "duration" is a damaged or hostile header, not a film
_THUMB = 16  # side of the analysis thumbnails (colour, 16 x 16)
_CONTAINER_LABELS = {
    "mov,mp4,m4a,3gp,3g2,mj2": None,  # told apart by the file's suffix below
    "matroska,webm": None,
    "avi": "AVI",
    "mpegts": "MPEG-TS",
    "mpeg": "MPEG-PS",
    "asf": "ASF",
    "ogg": "OGG",
}
_SUFFIX_LABELS = {
    ".mp4": "MP4", ".m4v": "M4V", ".mov": "MOV", ".qt": "MOV", ".3gp": "3GP", ".3g2": "3GP",
    ".mkv": "MKV", ".webm": "WEBM",
}  # fmt: skip


@dataclass(frozen=True)
class Sampling:
    """How frames are chosen; the defaults suit phone clips and feature films alike."""

    min_spacing: float = 1.0  # seconds between kept frames, at least
    max_spacing: float = 30.0  # a frame is kept at least this often, changes or not
    max_frames: int = 24  # per video
    threshold: float = 0.12  # mean absolute change of the thumbnail (0..1) that is a new scene
    probes: int = 240  # analysis frames at most (the grid of a long video)
    # Decode every frame while frames x pixels stay under this (about 500 frames of 1080p),
    # else probe by seeking to keyframes (cheaper for long or large videos).
    sequential_pixels: float = 1.0e9
    seconds: float = 20.0  # time bound for one file


@dataclass(frozen=True)
class VideoInfo:
    """What the catalog stores about a video; sizes are as displayed (rotation applied)."""

    width: int
    height: int
    format: str
    codec: str
    duration: float
    taken_at: dt.datetime | None = None


@dataclass
class VideoFrames:
    """The kept frames of one video: times (seconds, ascending) and model input."""

    times: list[float]
    pixels: np.ndarray  # (n, 3, 256, 256) float32
    info: VideoInfo
    probes: int = 0  # frames analysed (for the benchmark)


@dataclass(order=True)
class _Kept:
    score: float
    time: float = field(compare=False)
    pixels: np.ndarray = field(compare=False, repr=False)
    turned: int = field(compare=False, default=0)  # the rotation applied, degrees


def is_video_path(path: str | os.PathLike) -> bool:
    """Whether the file's suffix is one of :data:`VIDEO_SUFFIXES`."""
    return os.path.splitext(os.fspath(path))[1].lower() in VIDEO_SUFFIXES


def sample_video(
    path: str | os.PathLike,
    sampling: Sampling | None = None,
    max_megapixels: float = 89.0,
) -> VideoFrames:
    """Open a video and return its kept frames; DecodeError with a reason on any failure."""
    av = _pyav()

    sampling = sampling or Sampling()
    # A video in object storage (s3://) is read where FFmpeg seeks, never downloaded whole.
    remote = objectstore.open_input(path) if objectstore.is_uri(path) else None
    if (remote.size() if remote is not None else os.path.getsize(path)) == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        with av.open(remote or os.fspath(path), metadata_errors="ignore") as container:
            return _sample(container, path, sampling, max_megapixels)
    except ClipdexError:
        raise
    except av.error.InvalidDataError as exc:
        raise DecodeError(
            "not a readable video: truncated, damaged or not a video at all "
            f"(FFmpeg: {_ffmpeg_reason(exc)})"
        ) from exc
    except av.error.FFmpegError as exc:
        raise DecodeError(f"cannot decode the video (FFmpeg: {_ffmpeg_reason(exc)})") from exc
    except MemoryError:
        raise
    except Exception as exc:  # the boundary: every failure becomes a reason
        raise DecodeError(f"cannot decode the video: {_first_line(exc)}") from exc
    finally:
        if remote is not None:
            remote.close()


def decode_video_file(path: str, max_megapixels: float) -> tuple[np.ndarray, dict]:
    """The decode workers' entry for a video: stacked frames and the catalog's fields."""
    video = sample_video(path, max_megapixels=max_megapixels)
    info = video.info
    fields = {
        "width": info.width,
        "height": info.height,
        "format": info.format,
        "taken_at": info.taken_at,
        "kind": "video",
        "duration": info.duration,
        "codec": info.codec,
        "frame_time": video.times[0],
        "frame_times": video.times,
    }
    return video.pixels, fields


def frame_at(source: str | os.PathLike | BinaryIO, seconds: float, size: int = 512) -> Image.Image:
    """The (upright) frame of a video (a path or an open binary file) at ``seconds``, its
    longest side at most ``size``: a thumbnail of a search hit at its best moment."""
    av = _pyav()
    opened = source if hasattr(source, "read") else os.fspath(source)
    try:
        with av.open(opened, metadata_errors="ignore") as container:
            stream = _video_stream(container)
            _seek(container, stream, max(0.0, seconds))
            for frame in _frames(container, stream):
                if frame.time is None or frame.time + 1e-3 >= seconds or seconds <= 0:
                    return _upright(frame, _fit(frame, size))
            raise DecodeError("no frame at that time")
    except ClipdexError:
        raise
    except Exception as exc:  # the boundary
        raise DecodeError(f"cannot decode the video: {_first_line(exc)}") from exc


def _pyav():
    """The ``av`` module, imported on first use (photos never need it)."""
    try:
        import av
    except ImportError as exc:
        raise DecodeError(f"video support needs PyAV: pip install av ({exc})") from exc
    return av


# -- sampling -----------------------------------------------------------------------------------
def _sample(container, path, sampling: Sampling, max_megapixels: float) -> VideoFrames:
    started = time.monotonic()
    stream = _video_stream(container)
    info = _info(container, stream, path, max_megapixels)
    fps = float(stream.average_rate or stream.guessed_rate or 30)
    frames_estimate = stream.frames or int(info.duration * fps)
    grid = max(info.duration / sampling.probes, 0.0) if info.duration else 0.0
    pixels = float(frames_estimate) * info.width * info.height
    seeking = pixels > sampling.sequential_pixels and info.duration > 0
    if seeking:
        probes = _probe_by_seeking(container, stream, info.duration, sampling.probes)
    else:
        probes = _probe_sequentially(container, stream, grid)
    kept, count, end = _select(probes, sampling, started)
    if not kept:
        raise DecodeError("the video has no decodable frame (truncated or damaged)")
    if not seeking and end < 0.8 * info.duration - 1.0:
        raise DecodeError(
            f"truncated: its frames stop at {end:.1f} s of the {info.duration:.1f} s it "
            "announces (a copy that did not finish?)"
        )
    if kept[0].turned % 180:
        info = dataclasses.replace(info, width=info.height, height=info.width)
    kept.sort(key=lambda k: k.time)
    pixels = np.stack([k.pixels for k in kept])
    return VideoFrames([round(k.time, 3) for k in kept], pixels, info, count)


def _select(probes: Iterator, sampling: Sampling, started: float) -> tuple[list[_Kept], int, float]:
    """Keep frames at scene changes, spaced and capped; returns (kept, frames analysed, the
    time of the last frame seen)."""
    kept: list[_Kept] = []  # a min-heap on score: the smallest change goes first when full
    last_thumb: np.ndarray | None = None
    last_time = -math.inf
    count, end = 0, 0.0
    for frame, at in probes:
        end = max(end, at)
        count += 1
        if time.monotonic() - started > sampling.seconds:
            raise DecodeError(
                f"decoding took longer than {sampling.seconds:g} s, the per-video time limit"
            )
        thumb = _thumbnail(frame)
        change = 1.0 if last_thumb is None else float(np.abs(thumb - last_thumb).mean())
        spaced = at - last_time >= sampling.min_spacing
        due = at - last_time >= sampling.max_spacing
        if last_thumb is None or (spaced and change >= sampling.threshold) or due:
            # The first frame always stays (score 2); others compete on how much changed.
            score = 2.0 if last_thumb is None else change
            item = _Kept(score, at, _model_input(frame), _rotation(frame))
            if len(kept) < sampling.max_frames:
                heapq.heappush(kept, item)
            else:
                heapq.heappushpop(kept, item)
            last_thumb, last_time = thumb, at
    return kept, count, end


def _probe_sequentially(container, stream, grid: float) -> Iterator[tuple[object, float]]:
    """Every frame is decoded; those on the analysis grid are yielded with their time."""
    stream.thread_type = "AUTO"
    next_at = -math.inf
    for frame in _frames(container, stream):
        at = _time_of(frame)
        if at >= next_at:
            next_at = at + grid
            yield frame, at


def _probe_by_seeking(container, stream, duration: float, probes: int):
    """The keyframe at or before each of ``probes`` evenly spaced times, each decoded once."""
    stream.codec_context.skip_frame = "NONKEY"  # only keyframes are decoded at all
    seen: set[float] = set()
    for i in range(probes):
        target = duration * i / probes
        _seek(container, stream, target)
        frame = next(_frames(container, stream), None)
        if frame is None:
            continue
        at = _time_of(frame)
        if at in seen:  # the same keyframe as the previous grid point (a long GOP)
            continue
        seen.add(at)
        yield frame, at


def _frames(container, stream) -> Iterator:
    """Decoded frames of ``stream``; a damaged packet ends the stream instead of raising."""
    import av

    try:
        for packet in container.demux(stream):
            try:
                yield from packet.decode()
            except av.error.InvalidDataError:
                continue  # one corrupt packet: the next keyframe recovers
    except av.error.EOFError:
        return
    except av.error.InvalidDataError:
        return  # truncated: keep what was decoded


def _seek(container, stream, seconds: float) -> None:
    offset = int(seconds / stream.time_base) + (stream.start_time or 0)
    container.seek(offset, stream=stream, backward=True, any_frame=False)


def _time_of(frame) -> float:
    return float(frame.time) if frame.time is not None else 0.0


# -- frames to arrays ---------------------------------------------------------------------------
def _thumbnail(frame) -> np.ndarray:
    """A 16 x 16 colour thumbnail in [0, 1]: cheap to make and to compare."""
    small = frame.reformat(width=_THUMB, height=_THUMB, format="rgb24")
    return small.to_ndarray().astype(np.float32) / 255.0


def _model_input(frame) -> np.ndarray:
    """Scale the frame so its short side is twice the model's, rotate it upright, then apply
    the model's own resize and crop (the same arithmetic as for photos)."""
    return to_model_input(_upright(frame, _short_side(frame, 2 * MODEL_IMAGE_SIZE)))


def _short_side(frame, side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(1, min(frame.width, frame.height)))
    return max(1, round(frame.width * scale)), max(1, round(frame.height * scale))


def _fit(frame, side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(1, max(frame.width, frame.height)))
    return max(1, round(frame.width * scale)), max(1, round(frame.height * scale))


def _upright(frame, size: tuple[int, int]) -> Image.Image:
    image = frame.to_image(width=size[0], height=size[1])
    turn = _rotation(frame)
    return image.rotate(turn, expand=True) if turn else image


def _rotation(frame) -> int:
    """Degrees counter-clockwise to turn the stored picture to display it (0, 90, 180, 270)."""
    try:
        degrees = float(frame.rotation or 0)
    except (AttributeError, TypeError, ValueError):
        return 0
    return round(degrees / 90.0) % 4 * 90


# -- container facts ----------------------------------------------------------------------------
def _video_stream(container):
    streams = [s for s in container.streams.video if s.codec_context is not None]
    if not streams:
        audio = " (audio only)" if container.streams.audio else ""
        raise DecodeError(f"no video stream in the file{audio}")
    stream = streams[0]
    if stream.codec_context.codec is None or not stream.codec_context.codec.name:
        raise DecodeError("unknown video codec: this build of FFmpeg has no decoder for it")
    return stream


def _info(container, stream, path, max_megapixels: float) -> VideoInfo:
    codec = stream.codec_context
    width, height = int(codec.width or 0), int(codec.height or 0)
    if width <= 0 or height <= 0:
        raise DecodeError("the video stream has no picture size (damaged header?)")
    if max_megapixels > 0 and width * height > max_megapixels * 1_000_000:
        raise ImageTooLarge(
            f"video frames are {width}x{height} ({width * height / 1e6:.0f} MP), over the "
            f"{max_megapixels:g} MP limit",
            setting="max_megapixels",
        )
    duration = _duration(container, stream)
    if duration > MAX_HOURS * 3600:
        raise DecodeError(f"the video claims to last {duration / 3600:.0f} hours (damaged header?)")
    if stream.frames and stream.frames > MAX_HOURS * 3600 * 240:
        raise DecodeError(f"the video claims {stream.frames} frames (damaged header?)")
    return VideoInfo(
        width=width,
        height=height,
        format=_container_label(container, path),
        codec=codec.codec.name.upper(),
        duration=round(duration, 3),
        taken_at=_creation_time(container, stream),
    )


def _duration(container, stream) -> float:
    if stream.duration and stream.time_base:
        return max(0.0, float(stream.duration * stream.time_base))
    if container.duration:
        return max(0.0, container.duration / 1_000_000)  # AV_TIME_BASE
    return 0.0


def _container_label(container, path) -> str:
    name = container.format.name
    label = _CONTAINER_LABELS.get(name)
    if label:
        return label
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix in _SUFFIX_LABELS:
        return _SUFFIX_LABELS[suffix]
    return (
        "WEBM" if name.startswith("matroska") and suffix == ".webm" else name.split(",")[0].upper()
    )


def _creation_time(container, stream) -> dt.datetime | None:
    """The container's creation time (phones write it, in UTC), as a naive local time like
    EXIF's; None when absent or unparseable."""
    for metadata in (container.metadata, stream.metadata):
        text = metadata.get("creation_time") if metadata else None
        if not text:
            continue
        try:
            when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
        except ValueError:
            continue
        if when.year < 1971:  # 1904-01-01 / 1970: an unset QuickTime date
            return None
        if when.tzinfo is not None:
            when = when.astimezone().replace(tzinfo=None)
        return when
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _ffmpeg_reason(exc: BaseException) -> str:
    """FFmpeg's words without the errno and the path PyAV adds."""
    text = getattr(exc, "strerror", None) or _first_line(exc)
    return str(text).rstrip(".")
