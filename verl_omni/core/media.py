"""The media convention of the whole package: a sample is uint8 RGB frames with a frame axis.

A video is ``[F, H, W, 3]`` uint8; an image is one frame, and its usual ``[H, W, 3]`` form is accepted everywhere
a sample is (``as_frames`` gives it the frame axis). A batch of samples is a list of such arrays, or one array with
a leading batch axis (``[B, H, W, 3]`` images, ``[B, F, H, W, 3]`` videos).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def check_media(x: Any, field: str = "media") -> np.ndarray:
    """``x`` as a uint8 array of shape ``[H, W, 3]`` or ``[F, H, W, 3]`` (F, H, W >= 1), else a ValueError naming
    ``field`` with what it got. Values are never rescaled or cast: a float image is a caller's bug to report."""
    array = np.asarray(x)
    if array.dtype != np.uint8:
        raise ValueError(
            f"{field}: expected uint8 RGB (0-255), got dtype {array.dtype}; convert with "
            "(x * 255).round().clip(0, 255).astype(np.uint8) if it holds values in [0, 1]"
        )
    if array.ndim not in (3, 4) or array.shape[-1] != 3:
        raise ValueError(
            f"{field}: expected shape [H, W, 3] (an image) or [F, H, W, 3] (a video), got {list(array.shape)}"
        )
    if min(array.shape) < 1:
        raise ValueError(f"{field}: has an empty axis, shape {list(array.shape)}")
    return array


def as_frames(x: Any, field: str = "media") -> np.ndarray:
    """A sample as ``[F, H, W, 3]`` uint8 frames (an image becomes one frame; no copy)."""
    array = check_media(x, field)
    return array[None] if array.ndim == 3 else array


def num_frames(x: Any, field: str = "media") -> int:
    array = check_media(x, field)
    return 1 if array.ndim == 3 else array.shape[0]


def is_video(x: Any, field: str = "media") -> bool:
    """More than one frame. A ``[1, H, W, 3]`` sample is an image with an explicit frame axis."""
    return num_frames(x, field) > 1


def as_image(x: Any, field: str = "media") -> np.ndarray:
    """A one-frame sample as ``[H, W, 3]``; a video is refused (score its frames one by one instead)."""
    frames = as_frames(x, field)
    if frames.shape[0] != 1:
        raise ValueError(f"{field}: expected an image (one frame), got a video of {frames.shape[0]} frames")
    return frames[0]


def batch_is_video(batch: Any) -> bool:
    """A batched array ``[B, F, H, W, 3]`` with F > 1 (``[B, H, W, 3]`` and ``[B, 1, H, W, 3]`` are images)."""
    shape = np.shape(batch)
    return len(shape) == 5 and shape[1] > 1


def media_samples(batch: Any) -> list[np.ndarray]:
    """The samples of a batched media array (``[B, F, H, W, 3]``, or ``[B, H, W, 3]`` images; a CPU tensor too) as
    rewards take them: an image ``[H, W, 3]`` where a sample has one frame, else its ``[F, H, W, 3]`` frames (views,
    no copy)."""
    array = np.asarray(batch)
    if array.ndim == 5:
        return [sample[0] if sample.shape[0] == 1 else sample for sample in array]
    return list(array)
