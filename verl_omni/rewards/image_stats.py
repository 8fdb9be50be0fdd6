"""Cheap, deterministic image statistics used as rewards in CPU learning tests.

They need no model and move smoothly with pixel values, so a LoRA on a tiny random transformer can raise
them within a few steps: a quick end-to-end check that the RL loop actually learns.
"""

from __future__ import annotations

import numpy as np

from verl_omni.rewards.registry import register_reward


def _as_float(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    return image.astype(np.float64) / 255.0


@register_reward("brightness")
def brightness(images: list, prompts: list[str], metadata: list[dict]) -> list[float]:
    """Mean pixel value in [0, 1]."""
    return [float(_as_float(image).mean()) for image in images]


@register_reward("redness")
def redness(images: list, prompts: list[str], metadata: list[dict]) -> list[float]:
    """Mean of R - (G + B) / 2, in [-1, 1]."""
    out = []
    for image in images:
        x = _as_float(image)
        out.append(float((x[..., 0] - 0.5 * (x[..., 1] + x[..., 2])).mean()))
    return out
