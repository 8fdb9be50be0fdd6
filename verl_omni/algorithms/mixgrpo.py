"""MixGRPO math: the sliding SDE window, the compressed ODE tail of MixGRPO-Flash and the advantages. No model code.

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

from collections.abc import Sequence
from typing import Union

import numpy as np
import torch

from verl_omni.core.errors import assert_finite

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
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if isinstance(group_ids, torch.Tensor):
        group_ids = group_ids.cpu().numpy()
    group_ids = np.asarray(group_ids)
    if group_ids.shape != (rewards.shape[0],):
        raise ValueError(f"group_ids must have shape ({rewards.shape[0]},), got {group_ids.shape}")
    assert_finite("rewards", rewards)
    values = rewards.detach().to(device="cpu", dtype=torch.float64)
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


__all__ = ["WINDOW_STRATEGIES", "group_advantages", "window_start", "window_steps"]
