"""MixGRPO: FlowGRPO's update on an SDE window that slides over the denoising steps as training goes.

``MixGRPO`` is the algorithm behind the seam (``algorithm.name=mixgrpo``, section ``algorithm.mixgrpo``); the
functions above it are its math (the window schedule, the advantages), with no model code.

MixGRPO (Tencent-Hunyuan/MixGRPO, arXiv 2507.21802) samples with SDE steps only inside a window of consecutive
denoising steps and ODE steps elsewhere, trains only the window's transitions (FlowGRPO's clipped loss) and moves
the window along the denoising steps as training goes: every ``shift_interval`` training steps it advances by
``stride`` steps, back to the start once it runs past the last trainable step ("progressive"), or it starts at a
random step each training step ("random"). MixGRPO-Flash replaces the ODE steps after the window with fewer,
higher-order DPM-Solver++ steps on a compressed schedule: sampler math, in ``verl_omni.schedulers.dpm_solver``
(``tail_points``, ``dpm_solver_step``) and ``verl_omni.schedulers.flow_match_sde.flow_match_tail_sigmas``, chosen
by the sampling params' ``ode_solver``.

Reference: fastvideo/utils/grpo_states.py (``GRPOTrainingStates``), fastvideo/train_grpo_flux.py
(``train_one_step``: advantages and loss) and fastvideo/utils/sampling_utils.py (``run_sample_step``: the
compressed tail) at commit e5cdd6a.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch

from verl_omni.algorithms.base import AlgorithmSection
from verl_omni.algorithms.flowgrpo import FlowGRPO, checked_rewards
from verl_omni.algorithms.registry import register_algorithm
from verl_omni.core.section import require_bool, require_choice, require_int, require_number
from verl_omni.schedulers.dpm_solver import MAX_ORDER, ODE_SOLVERS, SOLVER_TYPES

WINDOW_STRATEGIES = ("progressive", "random")


def _check_window_args(num_steps: int, window_size: int, shift_interval: int, stride: int, strategy: str) -> None:
    if num_steps < 2:
        raise ValueError(f"num_inference_steps={num_steps} must be >= 2 (the last step is never trained)")
    if not 1 <= window_size <= num_steps - 1:
        raise ValueError(f"window_size={window_size} must be in [1, num_inference_steps - 1 = {num_steps - 1}]")
    if shift_interval < 1:
        raise ValueError(f"shift_interval={shift_interval} must be >= 1")
    if stride < 0:
        raise ValueError(f"stride={stride} must be >= 0 (0 keeps the window at the first step)")
    if strategy not in WINDOW_STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {WINDOW_STRATEGIES}")


def window_start(
    step: int,
    *,
    num_steps: int,
    window_size: int,
    shift_interval: int,
    stride: int,
    strategy: str = "progressive",
    roll_back: bool = True,
    seed: int = 0,
) -> int:
    """First SDE step of the window at training step ``step`` (0 for the first training step).

    "progressive": the start advances by ``stride`` every ``shift_interval`` steps; past the last trainable start
    ``num_steps - 2`` it goes back to 0 (``roll_back``) or stays there. This is ``GRPOTrainingStates``'
    ``cur_timestep`` after ``step`` calls of ``update_iteration`` (``prog_overlap`` on; the original's
    non-overlapping mode is ``stride == window_size``). "random": a start in ``[0, num_steps - 2 - window_size]``
    drawn from ``(seed, step)`` (the original draws from an unseeded generator; the first step starts at 0).
    """
    _check_window_args(num_steps, window_size, shift_interval, stride, strategy)
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    max_start = num_steps - 2  # the original's max_timesteps: the last step is never trained
    if strategy == "random":
        if step == 0:
            return 0
        high = max(max_start - window_size, 0)
        return int(np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step)]).integers(0, high + 1))
    shifts = step // shift_interval
    if stride == 0:
        return 0
    if roll_back:
        return (shifts % (max_start // stride + 1)) * stride
    return min(shifts * stride, max_start)


def window_steps(step: int, *, num_steps: int, window_size: int, **schedule) -> tuple[int, int]:
    """[start, end) of the SDE window at training step ``step`` (``schedule``: the other args of
    :func:`window_start`). The window is cut at step ``num_steps - 1``, which is never trained; the original cuts
    at ``num_steps - 2`` (``range(cur, min(cur + size, max_timesteps))``), which leaves step ``num_steps - 2``
    untrained and the window empty once the start reaches it."""
    start = window_start(step, num_steps=num_steps, window_size=window_size, **schedule)
    return start, min(start + window_size, num_steps - 1)


def group_advantages(
    rewards: Union[torch.Tensor, np.ndarray], group_ids: Union[Sequence, np.ndarray, torch.Tensor]
) -> torch.Tensor:
    """``(r - mean) / (std + 1e-8)`` per prompt group with the sample std (Bessel's correction), as MixGRPO's
    ``train_one_step`` (``multi_reward_mix="reward_aggr"``, no trimming). Computed in float64; a group whose rewards
    are all equal, or a group of one (no sample std), gets exactly 0."""
    rewards, values, group_ids = checked_rewards(rewards, group_ids)
    advantages = torch.zeros_like(values)
    _, inverse = np.unique(group_ids, return_inverse=True)
    inverse = torch.as_tensor(inverse.reshape(-1), dtype=torch.long)
    for group in torch.unique(inverse):
        rows = inverse == group
        group_rewards = values[rows]
        if group_rewards.numel() < 2 or bool((group_rewards == group_rewards[0]).all()):
            continue
        advantages[rows] = (group_rewards - group_rewards.mean()) / (group_rewards.std() + 1e-8)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return advantages.to(device=rewards.device, dtype=out_dtype)


# ----------------------------------------------------------------------------------------------- the algorithm
@dataclasses.dataclass
class MixGRPOSection(AlgorithmSection):
    """``algorithm.mixgrpo``: the sliding SDE window and the ODE solver outside it (defaults: the original's
    scripts), and the options of FlowGRPO's loss. The SDE's noise is ``actor_rollout_ref.rollout.algo.noise_level``
    / ``.sde_type``; the loss's shared keys are ``actor_rollout_ref.actor.{clip_ratio, kl_coef, adv_clip_max}``.
    ``rollout.algo.sde_window_size`` / ``.sde_window_range`` (FlowGRPO's per-group draw) are not used."""

    _prefix = "algorithm.mixgrpo"

    # SDE steps per window (the original's group_size)
    window_size: int = 4
    # training steps between two moves of the window (the original's iters_per_group)
    shift_interval: int = 25
    # denoising steps the window moves by (the original's prog_overlap_step; 0 keeps it at the first step)
    stride: int = 1
    # "progressive": the sliding window; "random": a start drawn per prompt group and step
    strategy: str = "progressive"
    # back to the first step once the window passes the last trainable step (else it stays at the end)
    roll_back: bool = True
    # the ODE steps after the window: "euler", or "dpmsolver++" on a compressed schedule (MixGRPO-Flash)
    ode_solver: str = "euler"
    ode_solver_order: int = 2
    ode_solver_type: str = "midpoint"
    # the compressed schedule after the window keeps this fraction of the steps left (at least one step)
    ode_compress_ratio: float = 0.4
    # FlowGRPO's loss options (see algorithm.flowgrpo), at MixGRPO's original values: the gradient flows through
    # both CFG branches, rows of all-equal groups stay in the update's average, no GRPO-Guard
    detach_unconditional: bool = False
    drop_zero_advantage: bool = False
    grpo_guard: bool = False

    def __post_init__(self) -> None:
        require_int(self.key("window_size"), self.window_size, minimum=1)
        require_int(self.key("shift_interval"), self.shift_interval, minimum=1)
        require_int(self.key("stride"), self.stride, minimum=0)
        require_choice(self.key("strategy"), self.strategy, WINDOW_STRATEGIES)
        require_bool(self.key("roll_back"), self.roll_back)
        require_choice(self.key("ode_solver"), self.ode_solver, ODE_SOLVERS)
        require_choice(self.key("ode_solver_order"), self.ode_solver_order, tuple(range(1, MAX_ORDER + 1)))
        require_choice(self.key("ode_solver_type"), self.ode_solver_type, SOLVER_TYPES)
        require_number(self.key("ode_compress_ratio"), self.ode_compress_ratio, 0.0, strict=True)
        if self.ode_compress_ratio > 1:
            raise ValueError(f"{self.key('ode_compress_ratio')}={self.ode_compress_ratio} must be <= 1")
        for name in ("detach_unconditional", "drop_zero_advantage", "grpo_guard"):
            require_bool(self.key(name), getattr(self, name))


@register_algorithm("mixgrpo")
class MixGRPO(FlowGRPO):
    """MixGRPO: FlowGRPO's update on the transitions of an SDE window that slides with the training step (the
    same window for every prompt group of a step), ODE steps elsewhere, optionally DPM-Solver++ after the window
    (MixGRPO-Flash), and MixGRPO's group advantages (sample std, 1e-8)."""

    Config = MixGRPOSection

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        ref = cfg.actor_rollout_ref
        rollout, section = ref.rollout, cfg.algorithm.mixgrpo
        prefix = "actor_rollout_ref.rollout"
        if rollout.n < 2:
            raise ValueError(
                f"{prefix}.n={rollout.n} must be >= 2: MixGRPO's advantages are normalised within the n samples "
                "of a prompt"
            )
        if not rollout.algo.noise_level > 0:
            raise ValueError(
                f"{prefix}.algo.noise_level={rollout.algo.noise_level!r} must be > 0 for training (the window's SDE "
                "steps carry the log-probs the loss trains on)"
            )
        steps = rollout.pipeline.num_inference_steps
        if not section.window_size <= steps - 1:
            raise ValueError(
                f"algorithm.mixgrpo.window_size={section.window_size} must be <= {prefix}.pipeline."
                f"num_inference_steps - 1 = {steps - 1} (the last step is never trained)"
            )

    def _schedule(self) -> dict[str, Any]:
        c = self.config
        return dict(
            window_size=c.window_size,
            shift_interval=c.shift_interval,
            stride=c.stride,
            strategy=c.strategy,
            roll_back=c.roll_back,
        )

    def sampling(self, params: Any, *, step: int, group_seed: int, validate: bool) -> Any:
        """The window of training step ``step`` (1 = the first; the original's window before any move), the same
        for the n samples of a group; validation samples as given."""
        if validate:
            return params
        start, end = window_steps(
            max(int(step) - 1, 0), num_steps=params.num_inference_steps, seed=group_seed, **self._schedule()
        )
        c = self.config
        return params.replace(
            window_start=start,
            sde_window_size=end - start,
            sde_window_range=None,
            ode_solver=c.ode_solver,
            ode_solver_order=c.ode_solver_order,
            ode_solver_type=c.ode_solver_type,
            ode_compress_ratio=c.ode_compress_ratio,
        )

    def advantages(self, rewards, group_ids) -> tuple[torch.Tensor, dict[str, float]]:
        return group_advantages(torch.as_tensor(rewards), group_ids).float(), {}


__all__ = ["MixGRPO", "MixGRPOSection", "WINDOW_STRATEGIES", "group_advantages", "window_start", "window_steps"]
