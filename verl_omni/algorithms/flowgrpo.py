"""FlowGRPO math: group-normalised advantages, the clipped policy loss and the KL term. No model code.

Reference: yifan123/flow_grpo — flow_grpo/stat_tracking.py (``PerPromptStatTracker.update``) for advantages,
scripts/train_sd3.py (the inner training loop) for the loss, its metrics and the KL term.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

from verl_omni.core.errors import assert_finite


def compute_group_advantages(
    rewards: torch.Tensor,
    group_ids: Union[Sequence, np.ndarray, torch.Tensor],
    *,
    global_std: bool = False,
    eps: float = 1e-6,
    clip: Optional[float] = None,
) -> torch.Tensor:
    """(r - mean_group) / (std + eps) per prompt group, as FlowGRPO's PerPromptStatTracker ('grpo').

    std is the population std (numpy default, as FlowGRPO) of the group, or of the whole batch when
    ``global_std``. A group whose rewards are all equal (or a group of one) gets advantage 0: its numerator
    is exactly 0. ``clip`` clamps to [-clip, clip] (FlowGRPO does that in the loss with ``adv_clip_max``).
    """
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
    _, inverse = np.unique(group_ids, return_inverse=True)
    inverse = torch.as_tensor(inverse.reshape(-1), dtype=torch.long)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0

    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(values))
    means = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, values) / counts
    centered = values - means[inverse]
    if global_std:
        std = values.std(unbiased=False)
    else:
        group_var = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, centered**2) / counts
        std = group_var.sqrt()[inverse]
    advantages = centered / (std + eps)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return advantages.to(device=rewards.device, dtype=out_dtype)


def flowgrpo_kl(prev_mean: torch.Tensor, prev_mean_ref: torch.Tensor, std_dev_t) -> torch.Tensor:
    """Per-sample KL [B] between the Gaussian SDE steps of the policy and the reference (shared std).

    FlowGRPO: ``((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(non-batch dims) / (2 * std_dev_t ** 2)``.
    ``std_dev_t`` is a scalar, or per sample ([B] or [B, 1, ...]).
    """
    if prev_mean.shape != prev_mean_ref.shape:
        raise ValueError(f"prev_mean {tuple(prev_mean.shape)} and prev_mean_ref {tuple(prev_mean_ref.shape)} differ")
    batch = prev_mean.shape[0]
    mse = (prev_mean - prev_mean_ref).pow(2).reshape(batch, -1).mean(dim=1)
    std = torch.as_tensor(std_dev_t, dtype=mse.dtype, device=mse.device)
    if std.numel() == batch and batch != 1:
        std = std.reshape(batch)
    elif std.numel() == 1:
        std = std.reshape(())
    else:
        raise ValueError(f"std_dev_t must be a scalar or hold one value per sample, got shape {tuple(std.shape)}")
    return mse / (2 * std**2)


def flowgrpo_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_ratio: float,
    *,
    adv_clip_max: Optional[float] = None,
    kl: Optional[torch.Tensor] = None,
    kl_beta: float = 0.0,
    check_finite: bool = True,
    as_tensors: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-style clipped loss of one denoising step, as FlowGRPO's train loop.

    ratio = exp(log_prob - old_log_prob); loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c)))
    with A clamped to [-adv_clip_max, adv_clip_max]; plus ``kl_beta * kl.mean()`` when ``kl`` (from
    ``flowgrpo_kl``) is given and ``kl_beta > 0`` (given with beta 0 it is only reported).
    All inputs are [B]; metrics are detached floats, or detached 0-dim tensors with ``as_tensors`` (a training
    loop that must not wait for the device on every micro-batch sums them and syncs once; it then passes
    ``check_finite=False`` and checks once too).
    """
    if check_finite:
        assert_finite("log_prob", log_prob)
        assert_finite("old_log_prob", old_log_prob)
        assert_finite("advantages", advantages)
    if adv_clip_max is not None:
        advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    loss = policy_loss

    with torch.no_grad():
        metrics = {
            "policy_loss": policy_loss.detach(),
            # FlowGRPO's approx_kl is 0.5 * E[(log pi - log pi_old)^2]
            "approx_kl": 0.5 * log_ratio.detach().pow(2).mean(),
            "clip_frac": ((ratio - 1.0).abs() > clip_ratio).float().mean(),
            "clip_frac_high": ((ratio - 1.0) > clip_ratio).float().mean(),
            "clip_frac_low": ((1.0 - ratio) > clip_ratio).float().mean(),
            "ratio_mean": ratio.detach().mean(),
            "ratio_min": ratio.detach().min(),
            "ratio_max": ratio.detach().max(),
        }
    if kl is not None:
        if check_finite:
            assert_finite("kl", kl)
        kl_loss = kl.mean()
        metrics["kl_loss"] = kl_loss.detach()
        if kl_beta > 0:  # FlowGRPO skips the reference forward entirely when beta == 0
            loss = policy_loss + kl_beta * kl_loss
    metrics["loss"] = loss.detach()
    if not as_tensors:
        metrics = {name: value.item() for name, value in metrics.items()}
    return loss, metrics
