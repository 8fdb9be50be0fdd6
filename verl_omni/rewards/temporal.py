"""Temporal consistency of a video, with no model: how little consecutive frames differ.

    g_t   = luma of frame t (0.299 R + 0.587 G + 0.114 B) / 255, in [0, 1], averaged over square blocks so that the
            longer side is at most DOWNSCALE_TO pixels (noise of single pixels counts less than a change of a region)
    d_t   = mean over pixels of |g_{t+1} - g_t|, in [0, 1]
    score = 1 - mean over the F - 1 consecutive pairs of d_t, in [0, 1]

A static clip scores 1.0; a clip flickering between black and white every frame scores 0.0. Slow motion scores
close to 1, so the reward pulls towards smooth clips and, alone, towards still ones: weigh it against a reward
for the content. An image (one frame) has no consecutive frames: it is refused, naming the samples, because a
constant score would look like a signal to train on.
"""

from __future__ import annotations

import numpy as np

from verl_omni.rewards.registry import RewardSampleError, register_reward

DOWNSCALE_TO = 64
_LUMA = np.array([0.299, 0.587, 0.114])


def grey_thumbnail(frames: np.ndarray) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 -> ``[F, h, w]`` float64 luma in [0, 1], block-averaged to a side <= DOWNSCALE_TO."""
    grey = frames.astype(np.float64) @ _LUMA / 255.0
    block = -(-max(grey.shape[1:]) // DOWNSCALE_TO)  # ceil: the smallest block that fits the longer side
    if block > 1:
        f, h, w = grey.shape
        bh, bw = min(block, h), min(block, w)  # a side shorter than the block is averaged whole
        grey = grey[:, : h // bh * bh, : w // bw * bw]  # whole blocks only
        grey = grey.reshape(f, h // bh, bh, w // bw, bw).mean(axis=(2, 4))
    return grey


def temporal_consistency_score(frames: np.ndarray) -> float:
    grey = grey_thumbnail(frames)
    return float(1.0 - np.abs(np.diff(grey, axis=0)).mean(axis=(1, 2)).mean())


@register_reward("temporal_consistency", media="video")
def temporal_consistency(videos: list, prompts: list[str], metadata: list[dict]) -> list[float]:
    """One score per ``[F, H, W, 3]`` clip (module docstring); clips of one frame are refused."""
    images = [i for i, clip in enumerate(videos) if clip.shape[0] < 2]
    if images:
        raise RewardSampleError(
            images, "temporal_consistency scores videos of 2 or more frames; these samples have one frame (images)"
        )
    return [temporal_consistency_score(clip) for clip in videos]
