"""``actor_rollout_ref.model.wan``: Wan text-to-video's own options. ``WanRLPipeline.apply_family_options`` takes
them wherever a pipeline is loaded (``pipelines/loading.py``): both engines' pipelines and the actor's, so every
rollout of a run makes clips of the same length."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from verl_omni.core.section import Section, require_int, require_number

DEFAULT_NUM_FRAMES = 81  # WanPipeline.__call__'s num_frames default (5 s at 16 fps)
DEFAULT_FPS = 16.0  # the frame rate Wan2.1 is trained for (diffusers' Wan example exports at 16 fps)
TEMPORAL_FACTOR = 4  # Wan2.1's VAE: 4 frames per latent frame after the first (vae.config.scale_factor_temporal)


@dataclass
class WanOptions(Section):
    _prefix = "actor_rollout_ref.model.wan"

    # Frames per generated clip (WanPipeline's num_frames): 4k + 1 for Wan2.1's VAE (4x temporal compression; the
    # first frame is encoded alone), so 5, 9, ..., 33, ..., 81. Checked against the loaded VAE's factor.
    num_frames: int = DEFAULT_NUM_FRAMES
    # Frames per second of the clips as written (sample and validation MP4s); the rollout does not depend on it.
    fps: float = DEFAULT_FPS
    # Two-expert Wan2.2 (T2V-A14B): the CFG scale of the low-noise expert's steps (WanPipeline's guidance_scale_2);
    # null: the rollout's own scale (rollout.pipeline.true_cfg_scale), as WanPipeline does without it.
    guidance_scale_2: Optional[float] = None

    def __post_init__(self) -> None:
        require_int(self.key("num_frames"), self.num_frames, minimum=1)
        check_num_frames(self.key("num_frames"), self.num_frames, TEMPORAL_FACTOR)
        require_number(self.key("fps"), self.fps, 0, strict=True)
        if not math.isfinite(self.fps):
            raise ValueError(f"{self.key('fps')}={self.fps!r} must be a finite number > 0")
        object.__setattr__(self, "fps", float(self.fps))
        if self.guidance_scale_2 is not None:
            require_number(self.key("guidance_scale_2"), self.guidance_scale_2, 1.0)
            if not math.isfinite(self.guidance_scale_2):
                raise ValueError(f"{self.key('guidance_scale_2')}={self.guidance_scale_2!r} must be finite or null")
            object.__setattr__(self, "guidance_scale_2", float(self.guidance_scale_2))


def check_num_frames(key: str, num_frames: int, temporal_factor: int) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``num_frames`` is ``temporal_factor * k + 1`` (WanPipeline would
    round it silently)."""
    if (num_frames - 1) % temporal_factor:
        below = (num_frames - 1) // temporal_factor * temporal_factor + 1
        raise ValueError(
            f"{key}={num_frames} must be {temporal_factor}k + 1 (the VAE's {temporal_factor}x temporal compression "
            f"after the first frame), e.g. {below} or {below + temporal_factor}"
        )
