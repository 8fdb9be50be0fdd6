"""What a run writes for people to look at: sample images or videos per step, and a validation grid.

Images (``[B, H, W, 3]``) are written as PNG, as they always were. Videos (``[B, F, H, W, 3]``, F > 1) are written
as MP4 (``core/video_io.py``; animated WebP where no MP4 encoder is installed): one file per sample, and the
validation grid as a clip whose every frame is the grid of that frame, beside a PNG of its first frame (what
TensorBoard shows and the run summary names).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

from verl_omni.core.media import batch_is_video
from verl_omni.core.video_io import write_video

DEFAULT_VIDEO_FPS = 16  # when the rollout does not say (its meta_info "fps")


def video_fps(meta_info: dict[str, Any], family_options: Any = None) -> float:
    """The rollout's own ``fps`` (meta_info), else the model family's (its options section's ``fps``, as Wan's
    ``actor_rollout_ref.model.wan.fps``), else ``DEFAULT_VIDEO_FPS``."""
    return meta_info.get("fps") or getattr(family_options, "fps", None) or DEFAULT_VIDEO_FPS


def write_samples(folder: str, media: np.ndarray, scores: np.ndarray, limit: int, fps: float) -> list[str]:
    """The first ``limit`` samples as ``<i>_reward<score>.png`` (images) or ``.mp4`` (videos); their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(min(limit, len(media))):
        stem = os.path.join(folder, f"{i:03d}_reward{scores[i]:.3f}")
        if batch_is_video(media):
            paths.append(write_video(stem + ".mp4", media[i], fps, field=f"sample {i}"))
        else:
            Image.fromarray(_image(media[i])).save(stem + ".png")
            paths.append(stem + ".png")
    return paths


def write_validation(
    folder: str, name: str, media: np.ndarray, prompts: list[str], scores: np.ndarray, fps: float
) -> tuple[Image.Image, Optional[str]]:
    """``<name>.png`` (the grid; a video's first frame) and, for videos, ``<name>.mp4``: (the PNG grid, the video's
    path or None)."""
    os.makedirs(folder, exist_ok=True)
    if not batch_is_video(media):
        grid = validation_grid(np.stack([_image(m) for m in media]), prompts, scores)
        grid.save(os.path.join(folder, f"{name}.png"))
        return grid, None
    frames = np.stack([np.asarray(validation_grid(media[:, t], prompts, scores)) for t in range(media.shape[1])])
    grid = Image.fromarray(frames[0])
    grid.save(os.path.join(folder, f"{name}.png"))
    return grid, write_video(os.path.join(folder, f"{name}.mp4"), frames, fps, field="validation grid")


def validation_grid(
    images: np.ndarray, prompts: list[str], scores: np.ndarray, columns: int = 4, caption_height: int = 36
) -> Image.Image:
    """One image per validation sample with its prompt and reward written under it."""
    n, h, w = images.shape[:3]
    cell_w = max(w, 192)
    rows = -(-n // columns)
    grid = Image.new("RGB", (columns * cell_w, rows * (h + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = (i % columns) * cell_w, (i // columns) * (h + caption_height)
        grid.paste(Image.fromarray(images[i]), (x, y))
        draw.text((x + 2, y + h + 2), prompts[i][:32], fill="black")
        draw.text((x + 2, y + h + 18), f"reward {scores[i]:.3f}", fill="black")
    return grid


def _image(sample: np.ndarray) -> np.ndarray:
    """``[H, W, 3]``, or a one-frame ``[1, H, W, 3]`` sample as ``[H, W, 3]``."""
    return sample[0] if sample.ndim == 4 else sample
