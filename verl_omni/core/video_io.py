"""Videos a person can watch: uint8 ``[F, H, W, 3]`` frames written as MP4 (H.264), animated WebP or GIF.

MP4 is encoded with PyAV (FFmpeg's libraries, bundled in its wheels, with libx264): H.264 in yuv420p at CRF 18
(a file also ``+faststart``), which browsers and players open. yuv420p needs an even width and height, so an odd
size is padded by one edge row / column. Without PyAV (or without its H.264 encoder) ``write_video`` writes an
animated WebP with Pillow instead and logs that once per process. ``.webp`` and ``.gif`` are written by Pillow.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from typing import Any, BinaryIO, Optional, Union

import numpy as np
from PIL import Image

from verl_omni.core.media import as_frames

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webp", ".gif")
H264_CRF = 18  # visually near-lossless; the files are for people to watch, not for scoring


@functools.lru_cache(maxsize=1)
def mp4_unavailable_reason() -> str:
    """Why MP4 cannot be written here ('' when it can): PyAV missing, or its FFmpeg built without H.264."""
    try:
        import av
    except ImportError:
        return "PyAV is not installed (pip install av)"
    try:
        av.codec.Codec("libx264", "w")
    except Exception as exc:  # an FFmpeg build without libx264
        return f"PyAV's FFmpeg has no libx264 encoder ({type(exc).__name__}: {exc})"
    return ""


def check_fps(fps: Any, field: str = "fps") -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) or not 0 < fps <= 1000:
        raise ValueError(f"{field}={fps!r} must be a number of frames per second in (0, 1000]")
    return float(fps)


def encode_mp4(frames: Any, fps: float, field: str = "video") -> bytes:
    """The MP4 file of ``frames`` (``[F, H, W, 3]`` uint8, or one ``[H, W, 3]`` image) as bytes."""
    buffer = io.BytesIO()
    _write_mp4(buffer, frames, fps, field)
    return buffer.getvalue()


def _write_mp4(target: Union[str, BinaryIO], frames: Any, fps: float, field: str) -> None:
    reason = mp4_unavailable_reason()
    if reason:
        raise RuntimeError(f"{field}: cannot encode MP4: {reason}")
    import av

    frames = _even_size(as_frames(frames, field))
    fps = check_fps(fps)
    rate = round(fps) if float(fps).is_integer() else fps
    # +faststart (the index before the data, for streaming players) rewrites the file by name: paths only.
    options = {"movflags": "+faststart"} if isinstance(target, str) else {}
    container = av.open(target, mode="w", format="mp4", options=options)
    try:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(H264_CRF)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    finally:
        container.close()


def _even_size(frames: np.ndarray) -> np.ndarray:
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _write_animation(path: str, frames: np.ndarray, fps: float) -> None:
    images = [Image.fromarray(np.ascontiguousarray(frame)) for frame in frames]
    options: dict[str, Any] = {"save_all": True, "append_images": images[1:], "loop": 0}
    options["duration"] = max(1, round(1000 / fps))  # milliseconds per frame
    if path.lower().endswith(".webp"):
        options["quality"] = 90
    images[0].save(path, **options)


@functools.lru_cache(maxsize=1)
def _log_fallback_once(reason: str) -> None:
    logger.warning("videos are written as animated WebP instead of MP4: %s", reason)


def write_video(path: str, frames: Any, fps: float = 16, field: str = "video") -> str:
    """Write ``frames`` to ``path`` (``.mp4``, ``.webp`` or ``.gif``) and return the path written.

    An ``.mp4`` path where MP4 cannot be encoded becomes the same name with ``.webp`` (logged once).
    """
    stem, suffix = os.path.splitext(path)
    if suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"{field}: cannot write {path!r}: the file name must end in one of {list(VIDEO_SUFFIXES)}")
    frames = as_frames(frames, field)
    fps = check_fps(fps)
    if suffix.lower() == ".mp4":
        reason = mp4_unavailable_reason()
        if not reason:
            _write_mp4(path, frames, fps, field)
            return path
        _log_fallback_once(reason)
        path = stem + ".webp"
    _write_animation(path, frames, fps)
    return path


def read_video(path: str, fps: Optional[float] = None) -> np.ndarray:
    """The frames of an MP4 / WebP / GIF file as ``[F, H, W, 3]`` uint8 (an MP4 needs PyAV).

    WebP and GIF store a run of identical frames as one longer frame; given the ``fps`` it was written at, such a
    frame is repeated once per frame period it lasts, which restores the written frame count.
    """
    if path.lower().endswith(".mp4"):
        import av

        with av.open(path) as container:
            return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    frames = []
    with Image.open(path) as image:
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            image.load()  # the frame's own info (its duration) is read with its pixels
            repeats = 1 if fps is None else max(1, round(image.info.get("duration", 0) * check_fps(fps) / 1000))
            frames.extend([np.asarray(image.convert("RGB"))] * repeats)
    return np.stack(frames)
