"""An image reward applied to videos frame by frame, then reduced to one score per clip.

A reward entry's ``frame_reduction`` (``mean`` by default, ``min``, ``max``, ``first``, ``last``) says how a
clip's per-frame scores become its score, ``frame_stride`` (default 1) which frames ``mean`` / ``min`` / ``max``
score: frames 0, s, 2s, ... (``first`` and ``last`` score one frame each). The frames of every clip of a call go to
the reward in one batch, so a batched scorer (an OCR engine, a CLIP model) is shared across frames as across
samples. An image is one frame: its score is the reward's score of the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from verl_omni.core.media import as_frames

FRAME_REDUCTIONS = ("mean", "min", "max", "first", "last")
DEFAULT_FRAME_REDUCTION = "mean"


def check_frame_options(where: str, reduction: Any, stride: Any) -> tuple[str, int]:
    """``(frame_reduction, frame_stride)`` of an entry, or a ValueError naming ``where`` and the key."""
    if reduction not in FRAME_REDUCTIONS:
        raise ValueError(f"{where}.frame_reduction={reduction!r} must be one of {list(FRAME_REDUCTIONS)}")
    if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"{where}.frame_stride={stride!r} must be an int >= 1")
    if reduction in ("first", "last") and stride != 1:
        raise ValueError(
            f"{where}.frame_stride={stride} does nothing with frame_reduction={reduction!r} (one frame is scored): "
            "leave it at 1, or reduce over strided frames with mean / min / max"
        )
    return reduction, int(stride)


def selected_frames(count: int, reduction: str, stride: int) -> range:
    """The frame indices scored for a clip of ``count`` frames."""
    if reduction == "first":
        return range(0, 1)
    if reduction == "last":
        return range(count - 1, count)
    return range(0, count, stride)


def frame_plan(samples: Sequence, reduction: str, stride: int) -> tuple[list[np.ndarray], list[int], list[int]]:
    """The frames to score (``[H, W, 3]`` each) and, for each, its sample's index and its index in that sample."""
    frames, owners, times = [], [], []
    for i, sample in enumerate(samples):
        clip = as_frames(sample, f"sample {i}")
        for t in selected_frames(clip.shape[0], reduction, stride):
            frames.append(clip[t])
            owners.append(i)
            times.append(t)
    return frames, owners, times


def reduce_frames(scores: np.ndarray, owners: Sequence[int], count: int, reduction: str) -> np.ndarray:
    """One score per sample from its frames' scores (NaN stays NaN, for the caller's finiteness check)."""
    owners = np.asarray(owners)
    out = np.empty(count, dtype=np.float64)
    for i in range(count):
        own = scores[owners == i]
        out[i] = {"min": np.min, "max": np.max}.get(reduction, np.mean)(own)  # first / last: a single frame
    return out
