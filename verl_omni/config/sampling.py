"""Per-request diffusion sampling parameters.

One dataclass travels from the agent loop through the server actor to the engine and the pipeline, so
every layer validates the same fields the same way. Unknown keys are rejected, never ignored.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch

from verl_omni.schedulers.dpm_solver import MAX_ORDER, ODE_SOLVERS, SOLVER_TYPES
from verl_omni.schedulers.flow_match_sde import SDE_TYPES

AUTO = "auto"
# The largest noise_level per sde_type. cps scales its noise by sin(noise_level * pi / 2), which peaks at 1 (larger
# values repeat smaller ones); sde's noise grows without bound, and its latents overflow float32 well before 100
# (the tiny Qwen-Image: finite at 10, NaN at 100). Shipped recipes use 0.7-1.5.
MAX_NOISE_LEVEL = {"sde": 10.0, "cps": 1.0}
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
    # The ODE steps after the SDE window: "euler" on the schedule's own steps, or "dpmsolver++" (multistep
    # DPM-Solver++ of order ``ode_solver_order``, ``ode_solver_type`` for order 2) on a compressed schedule of
    # ``tail_points(T, window end, ode_compress_ratio)`` points from the window's end to sigma 0 (MixGRPO-Flash).
    # The steps before the window stay Euler steps; the returned sigmas / timesteps are the full T-step schedule's.
    ode_solver: str = "euler"
    ode_solver_order: int = 2
    ode_solver_type: str = "midpoint"
    ode_compress_ratio: float = 0.4
    # Trajectory positions to keep besides the window's (0 = x_T, num_inference_steps = x_0; negative ones count from
    # the end, -1 = x_0): an algorithm that trains on the final clean latent asks for (-1,). None: nothing extra (and,
    # without ``trajectory_window_only``, the whole trajectory).
    keep_latent_steps: Optional[tuple[int, ...]] = None
    # Rows per VAE decode call; 0: every row of the call in one decode. The decode's activations grow with its rows
    # (SD3.5's VAE holds ~0.4 GB per 512x512 image in bfloat16 at its peak), so decoding a large group at once can set
    # the rollout's memory peak; fewer rows per call cap it at the cost of more, smaller decodes.
    vae_decode_batch: int = 0

    def __post_init__(self) -> None:
        if self.sde_window_range is not None:
            value = self.sde_window_range
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"sde_window_range={value!r} must be a pair of ints [lo, hi] or null")
            self.sde_window_range = tuple(
                int(x) if isinstance(x, numbers.Integral) and not isinstance(x, bool) else x for x in value
            )
        if self.keep_latent_steps is not None:
            value = self.keep_latent_steps
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise ValueError(f"keep_latent_steps={value!r} must be a list of trajectory positions or null")
            self.keep_latent_steps = tuple(value)

    # ---------------------------------------------------------------- validation
    def validate(self, vae_scale_factor: Optional[int] = None) -> DiffusionSamplingParams:
        """Raise ``ValueError`` naming the offending field; return self for chaining."""
        _require_int("num_inference_steps", self.num_inference_steps, minimum=1)
        _require_int("height", self.height, minimum=1)
        _require_int("width", self.width, minimum=1)
        _require_int("max_sequence_length", self.max_sequence_length, minimum=1)
        _require_int("vae_decode_batch", self.vae_decode_batch, minimum=0)
        if vae_scale_factor is not None:
            multiple = vae_scale_factor * 2  # VAE downsampling x 2x2 patchify
            for name in ("height", "width"):
                value = getattr(self, name)
                if value % multiple:
                    raise ValueError(f"{name}={value} must be a multiple of {multiple} (VAE factor x patch size)")
        if not _is_finite_number(self.guidance_scale) or self.guidance_scale < 1.0:
            raise ValueError(
                f"guidance_scale={self.guidance_scale!r} must be a finite number >= 1.0 (1.0 = no guidance)"
            )
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
        if not isinstance(self.sde_type, str) or self.sde_type not in SDE_TYPES:
            raise ValueError(f"sde_type={self.sde_type!r} is not one of {SDE_TYPES}")
        top = MAX_NOISE_LEVEL[self.sde_type]
        if not _is_finite_number(self.noise_level) or not 0 <= self.noise_level <= top:
            raise ValueError(
                f"noise_level={self.noise_level!r} must be a finite number in [0, {top}] for sde_type="
                f"{self.sde_type!r} (allowed: {', '.join(f'{k} [0, {v}]' for k, v in MAX_NOISE_LEVEL.items())})"
            )
        _require_int("sde_window_size", self.sde_window_size, minimum=0)
        if self.sde_window_size > self.num_inference_steps:
            raise ValueError(
                f"sde_window_size={self.sde_window_size} exceeds num_inference_steps={self.num_inference_steps}"
            )
        if self.sde_window_range is not None:
            if len(self.sde_window_range) != 2 or not all(_is_int(x) for x in self.sde_window_range):
                raise ValueError(f"sde_window_range={self.sde_window_range!r} must be a pair of ints (lo, hi)")
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
        self._validate_ode_solver()
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string or None, got {type(self.negative_prompt).__name__}")
        return self

    def _validate_ode_solver(self) -> None:
        if self.ode_solver not in ODE_SOLVERS:
            raise ValueError(f"ode_solver={self.ode_solver!r} is not one of {ODE_SOLVERS}")
        _require_int("ode_solver_order", self.ode_solver_order, minimum=1)
        if self.ode_solver_order > MAX_ORDER:
            raise ValueError(f"ode_solver_order={self.ode_solver_order} must be in [1, {MAX_ORDER}]")
        if self.ode_solver_type not in SOLVER_TYPES:
            raise ValueError(f"ode_solver_type={self.ode_solver_type!r} is not one of {SOLVER_TYPES}")
        ratio = self.ode_compress_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ValueError(f"ode_compress_ratio={ratio!r} must be a number in (0, 1]")
        if self.ode_solver == "euler":
            return
        # The solver runs from the SDE window's end: there must be a window, ending before the last step.
        if not self.noise_level > 0 or self.sde_window_size == 0:
            raise ValueError(
                f"ode_solver={self.ode_solver!r} runs after the SDE window: it needs noise_level > 0 and "
                f"sde_window_size > 0 (got noise_level={self.noise_level}, sde_window_size={self.sde_window_size})"
            )
        if self.window_steps()[1] > self.num_inference_steps - 1:
            raise ValueError(
                f"ode_solver={self.ode_solver!r} needs the SDE window to end before the last step: window_start + "
                f"sde_window_size = {self.window_steps()[1]} must be <= num_inference_steps - 1 = "
                f"{self.num_inference_steps - 1}"
            )
        if self.return_trajectory and not self.trajectory_window_only:
            raise ValueError(
                f"ode_solver={self.ode_solver!r} walks a compressed schedule after the window, so only the window's "
                "latents exist: set trajectory_window_only=true (or return_trajectory=false)"
            )

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
        if data is not None and not isinstance(data, Mapping):
            raise ValueError(
                f"sampling_params must be an object of named fields (a dict) or null, got {type(data).__name__}"
            )
        data = dict(data or {})
        if not all(isinstance(k, str) for k in data):
            raise ValueError(f"sampling_params keys must be strings, got {sorted(map(repr, data))}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown sampling_params keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> DiffusionSamplingParams:
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------ the rows' settings
# The sampling settings every rollout row carries (``DataProto`` tensors of these names, one value per row): what
# the actor recomputes the rows' log-probs with. The SDE window is the row's ``window_mask``.
ROW_SETTINGS = ("noise_level", "sde_type", "guidance_scale", "num_inference_steps")
# The settings no row may set for itself (the agent loop's ROW_OVERRIDABLE lets a row choose its steps).
ROLLOUT_WIDE_SETTINGS = ("noise_level", "sde_type", "guidance_scale")
# Where the actor's own config sets each (the rows win; a difference is logged, never silent).
ROW_SETTINGS_CONFIG_KEYS = {
    "noise_level": "actor_rollout_ref.rollout.algo.noise_level",
    "sde_type": "actor_rollout_ref.rollout.algo.sde_type",
    "guidance_scale": "actor_rollout_ref.rollout.pipeline.true_cfg_scale",
    "num_inference_steps": "actor_rollout_ref.rollout.pipeline.num_inference_steps",
}


def row_settings_tensors(sampling: Optional[Mapping[str, Any]], rows: int) -> dict[str, torch.Tensor]:
    """The per-row tensors of ``ROW_SETTINGS`` for ``rows`` rows sampled with ``sampling`` (a
    ``DiffusionSamplingParams`` or its dict): float64 noise_level / guidance_scale (a Python float round-trips
    exactly, so the actor's step equals the sampler's), int64 num_inference_steps and sde_type (its index in
    ``SDE_TYPES``)."""
    if sampling is None:
        raise ValueError(
            "the rollout record carries no sampling settings (RLBatchOutput.sampling): the actor could not "
            "recompute its log-probs"
        )
    params = sampling if isinstance(sampling, DiffusionSamplingParams) else DiffusionSamplingParams.from_dict(sampling)
    if params.sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type={params.sde_type!r} is not one of {SDE_TYPES}")
    return {
        "noise_level": torch.full((rows,), float(params.noise_level), dtype=torch.float64),
        "sde_type": torch.full((rows,), SDE_TYPES.index(params.sde_type), dtype=torch.int64),
        "guidance_scale": torch.full((rows,), float(params.guidance_scale), dtype=torch.float64),
        "num_inference_steps": torch.full((rows,), int(params.num_inference_steps), dtype=torch.int64),
    }


@dataclass(frozen=True)
class RowSettings:
    """The sampling settings of an update's rows, one value each: the actor trains with them."""

    noise_level: float
    sde_type: str
    guidance_scale: float
    num_inference_steps: int

    @classmethod
    def of_rows(cls, tensors: Mapping[str, torch.Tensor]) -> Optional[RowSettings]:
        """The settings every row of ``tensors`` (a rollout batch's) shares; None for a batch without rows. Raises
        ``ValueError`` naming the field when it is missing, invalid, or differs between rows (a batch whose rows
        were sampled differently cannot be trained as one: each row must be recomputed as it was sampled)."""
        values = {}
        for name in ROW_SETTINGS:
            if name not in tensors:
                raise ValueError(
                    f"the rollout batch has no {name!r} tensor: every row must carry the sampling settings it was "
                    f"produced with ({list(ROW_SETTINGS)}; agent_loop.records_to_data_proto writes them)"
                )
            column = tensors[name].reshape(-1)
            if column.numel() == 0:
                return None
            found = torch.unique(column.detach().cpu())
            if found.numel() != 1:
                raise ValueError(
                    f"the rollout batch mixes rows sampled with different {name} ({found.tolist()}); one update "
                    f"trains rows of one {name} (the batch's {ROW_SETTINGS_CONFIG_KEYS[name]})"
                )
            values[name] = found.item()
        code = int(values["sde_type"])
        if not 0 <= code < len(SDE_TYPES):
            raise ValueError(f"the rollout batch's sde_type {code} is not an index into {SDE_TYPES}")
        settings = cls(
            noise_level=float(values["noise_level"]),
            sde_type=SDE_TYPES[code],
            guidance_scale=float(values["guidance_scale"]),
            num_inference_steps=int(values["num_inference_steps"]),
        )
        if not math.isfinite(settings.noise_level) or settings.noise_level < 0:
            raise ValueError(f"the rollout batch's noise_level={settings.noise_level} must be a finite number >= 0")
        if not math.isfinite(settings.guidance_scale) or settings.guidance_scale < 1.0:
            raise ValueError(f"the rollout batch's guidance_scale={settings.guidance_scale} must be finite and >= 1.0")
        return settings

    def differences(
        self, expected: DiffusionSamplingParams, names: tuple[str, ...] = ROLLOUT_WIDE_SETTINGS
    ) -> dict[str, tuple[Any, Any]]:
        """``{field: (rows' value, expected value)}`` of ``names`` where ``expected`` (what a config would sample)
        differs; by default the rollout-wide settings (a row may set its own number of steps)."""
        out = {}
        for name in names:
            mine, theirs = getattr(self, name), getattr(expected, name)
            same = mine == theirs if isinstance(mine, (str, int)) else math.isclose(mine, float(theirs), rel_tol=1e-6)
            if not same:
                out[name] = (mine, theirs)
        return out


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")


__all__ = [
    "MAX_NOISE_LEVEL",
    "ROW_SETTINGS",
    "DiffusionSamplingParams",
    "ODE_SOLVERS",
    "RowSettings",
    "SDE_TYPES",
    "row_settings_tensors",
]
