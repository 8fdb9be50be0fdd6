"""Per-request diffusion sampling parameters.

One dataclass travels from the agent loop through the server actor to the engine and the pipeline, so
every layer validates the same fields the same way. Unknown keys are rejected, never ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from verl_omni.schedulers.flow_match_sde import SDE_TYPES

AUTO = "auto"
BatchCfg = Union[bool, Literal["auto"]]  # how CFG's two branches meet the transformer (pipelines/model_inputs.py)


def check_batch_cfg(key: str, value: Any) -> None:
    """Raise ``ValueError`` naming ``key`` unless ``value`` is true, false or "auto"."""
    if not (isinstance(value, bool) or value == AUTO):
        raise ValueError(f"{key}={value!r} must be true, false or {AUTO!r}")


@dataclass
class DiffusionSamplingParams:
    """What one generate call needs besides the prompt and the seeds.

    The SDE window: when ``sde_window_size > 0`` only ``sde_window_size`` consecutive steps starting at
    ``window_start`` are stochastic (and carry log-probs); all other steps are ODE steps. ``window_start``
    is chosen per prompt group by the caller (see ``verl_omni.schedulers.flow_match_sde.choose_window``)
    so all n samples of a group share it. ``sde_window_size == 0`` means every step is an SDE step.
    """

    num_inference_steps: int = 10
    height: int = 64
    width: int = 64
    # Qwen-Image: true CFG (norm-rescaled); SD3: classic CFG. 1.0 disables guidance.
    guidance_scale: float = 1.0
    # CFG's conditional and unconditional branches in one transformer forward of 2B rows (the shorter text padded
    # and masked) instead of two forwards of B rows: same result within float rounding. "auto": batched unless that
    # needs a mask the engine's fused attention kernel cannot take (pipelines/model_inputs.py says why).
    batch_cfg: BatchCfg = AUTO
    negative_prompt: Optional[str] = None
    max_sequence_length: int = 64
    noise_level: float = 0.7
    sde_type: str = "sde"
    sde_window_size: int = 0
    sde_window_range: Optional[tuple[int, int]] = None
    window_start: Optional[int] = None
    # Keep the latents of the trajectory (needed for training); off for validation / benchmarks that only need images.
    return_trajectory: bool = True
    # Of the trajectory, keep only the latents the SDE window's transitions read: x_s for every window step s and
    # the one after the last (W+1 of the T+1 latents, with their positions in ``latent_steps``). The training
    # rollout asks for this: at 512x512 the full trajectory is 2.9 MB per image, most of a rollout batch's bytes.
    trajectory_window_only: bool = False
    # Trajectory positions to keep besides the window's (0 = x_T, num_inference_steps = x_0; negative ones count from
    # the end, -1 = x_0): an algorithm that trains on the final clean latent asks for (-1,). None: nothing extra (and,
    # without ``trajectory_window_only``, the whole trajectory).
    keep_latent_steps: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if self.sde_window_range is not None:
            self.sde_window_range = tuple(int(x) for x in self.sde_window_range)
        if self.keep_latent_steps is not None and not isinstance(self.keep_latent_steps, tuple):
            self.keep_latent_steps = tuple(self.keep_latent_steps)

    # ---------------------------------------------------------------- validation
    def validate(self, vae_scale_factor: Optional[int] = None) -> DiffusionSamplingParams:
        """Raise ``ValueError`` naming the offending field; return self for chaining."""
        _require_int("num_inference_steps", self.num_inference_steps, minimum=1)
        _require_int("height", self.height, minimum=1)
        _require_int("width", self.width, minimum=1)
        _require_int("max_sequence_length", self.max_sequence_length, minimum=1)
        if vae_scale_factor is not None:
            multiple = vae_scale_factor * 2  # VAE downsampling x 2x2 patchify
            for name in ("height", "width"):
                value = getattr(self, name)
                if value % multiple:
                    raise ValueError(f"{name}={value} must be a multiple of {multiple} (VAE factor x patch size)")
        if not isinstance(self.guidance_scale, (int, float)) or self.guidance_scale < 1.0:
            raise ValueError(f"guidance_scale={self.guidance_scale!r} must be a number >= 1.0 (1.0 = no guidance)")
        check_batch_cfg("batch_cfg", self.batch_cfg)
        for name in ("return_trajectory", "trajectory_window_only"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false")
        if self.keep_latent_steps is not None:
            last = self.num_inference_steps
            for position in self.keep_latent_steps:
                if isinstance(position, bool) or not isinstance(position, int) or not -(last + 1) <= position <= last:
                    raise ValueError(
                        f"keep_latent_steps={list(self.keep_latent_steps)!r} must hold trajectory positions, ints in "
                        f"[-{last + 1}, {last}] (num_inference_steps={last}; -1 = x_0)"
                    )
        if not isinstance(self.noise_level, (int, float)) or self.noise_level < 0:
            raise ValueError(f"noise_level={self.noise_level!r} must be a number >= 0")
        if self.sde_type not in SDE_TYPES:
            raise ValueError(f"sde_type={self.sde_type!r} is not one of {SDE_TYPES}")
        _require_int("sde_window_size", self.sde_window_size, minimum=0)
        if self.sde_window_size > self.num_inference_steps:
            raise ValueError(
                f"sde_window_size={self.sde_window_size} exceeds num_inference_steps={self.num_inference_steps}"
            )
        if self.sde_window_range is not None:
            if len(self.sde_window_range) != 2:
                raise ValueError(f"sde_window_range={self.sde_window_range!r} must be (lo, hi)")
            lo, hi = self.sde_window_range
            if not (0 <= lo <= hi <= self.num_inference_steps - max(self.sde_window_size, 1)):
                raise ValueError(
                    f"sde_window_range={self.sde_window_range!r} must satisfy 0 <= lo <= hi <= "
                    f"num_inference_steps - sde_window_size = {self.num_inference_steps - max(self.sde_window_size, 1)}"
                )
        if self.window_start is not None:
            _require_int("window_start", self.window_start, minimum=0)
            if self.window_start + max(self.sde_window_size, 1) > self.num_inference_steps:
                raise ValueError(
                    f"window_start={self.window_start} + sde_window_size={self.sde_window_size} exceeds "
                    f"num_inference_steps={self.num_inference_steps}"
                )
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None, got {type(self.negative_prompt).__name__}")
        return self

    def window_steps(self) -> tuple[int, int]:
        """[start, end) of the stochastic steps for this request."""
        if self.sde_window_size == 0:
            return 0, self.num_inference_steps
        start = self.window_start if self.window_start is not None else 0
        return start, start + self.sde_window_size

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Optional[dict[str, Any]]) -> DiffusionSamplingParams:
        """Build from a plain dict, rejecting unknown keys (a typo must not silently use a default)."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sampling_params keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> DiffusionSamplingParams:
        return dataclasses.replace(self, **changes)


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")


__all__ = ["DiffusionSamplingParams", "SDE_TYPES"]
