"""DiffusionNFT math: the forward-process objective with implicit positive / negative policies. No model code.

DiffusionNFT (Zheng et al., arXiv 2509.16117) trains on the forward (noising) process instead of the sampler's
transitions: a rollout keeps only each image's clean latent x0; the update noises it again at a few of the
sampler's timesteps, x_t = (1 - t) x0 + t eps, and regresses two velocity predictions built from the policy v and
a frozen "old" policy v_old:

    v+ = beta v + (1 - beta) v_old          (implicit positive policy)
    v- = (1 + beta) v_old - beta v          (implicit negative policy)

towards x0 (as x0-predictions x_t - t v, each squared error divided by its own detached mean absolute error), mixed
by r in [0, 1], the clipped advantage mapped to the unit interval: ``r * L+ / beta + (1 - r) * L- / beta``. The
"old" policy samples the rollouts and moves towards the trained one after every update by a decay schedule.

Reference: NVlabs/DiffusionNFT at 24af555 — scripts/train_nft_sd3.py (``return_decay``, the training loop's loss and
the old adapter's update), config/base.py and config/nft.py (defaults), flow_grpo/stat_tracking.py (advantages).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch

from verl_omni.core.errors import assert_finite

# adv_mode of the original's config: how the clipped advantage is shaped before it becomes r.
ADV_MODES = ("all", "positive_only", "negative_only", "one_only", "binary")

# decay_type -> (flat, uprate, uphold) of the original's ``return_decay``: the old policy copies the trained one
# outright for ``flat`` steps, then keeps min((step - flat) * uprate, uphold) of itself.
DECAY_SCHEDULES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}

# The adaptive weights' floor (the original's ``.clip(min=0.00001)``).
WEIGHT_FLOOR = 1e-5


def old_policy_decay(step: int, decay_type: int) -> float:
    """How much of itself the old policy keeps after optimizer step ``step`` (the count of steps taken so far)."""
    if decay_type not in DECAY_SCHEDULES:
        raise ValueError(f"algorithm.diffusion_nft.decay_type={decay_type!r} is not one of {sorted(DECAY_SCHEDULES)}")
    flat, uprate, uphold = DECAY_SCHEDULES[decay_type]
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


@torch.no_grad()
def update_old_policy(old: Iterable[torch.Tensor], current: Iterable[torch.Tensor], decay: float) -> None:
    """old <- decay * old + (1 - decay) * current, in place (the original's loop after each epoch)."""
    old, current = list(old), list(current)
    if len(old) != len(current):
        raise ValueError(f"old policy has {len(old)} tensors, the trained one {len(current)}")
    for o, c in zip(old, current, strict=True):
        o.copy_(o * decay + c.detach().to(o.dtype) * (1.0 - decay))


def num_train_timesteps(num_steps: int, timestep_fraction: float) -> int:
    """How many of the sampler's timesteps each row trains on: int(num_steps * fraction), as the original."""
    count = int(num_steps * timestep_fraction)
    if count < 1:
        raise ValueError(
            f"algorithm.diffusion_nft.timestep_fraction={timestep_fraction} leaves no training timestep out of "
            f"{num_steps} sampling steps (int(steps * fraction) must be >= 1)"
        )
    return count


def train_timestep_indices(
    num_rows: int, num_steps: int, count: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """[num_rows, count] indices into each row's sampling timesteps: a fresh random permutation per row, its first
    ``count`` entries (the original permutes every row's timesteps and trains on the first int(T * fraction))."""
    if not 1 <= count <= num_steps:
        raise ValueError(f"count={count} must be in [1, num_steps={num_steps}]")
    perms = [torch.randperm(num_steps, generator=generator) for _ in range(num_rows)]
    if not perms:
        return torch.zeros((0, count), dtype=torch.long)
    return torch.stack(perms)[:, :count]


def noised_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, ``t`` in [0, 1] per row ([B]) or a scalar."""
    t = _per_row(t, x0)
    return (1 - t) * x0 + t * noise


def reward_weight(advantages: torch.Tensor, adv_clip_max: float, adv_mode: str = "all") -> torch.Tensor:
    """r in [0, 1] from advantages: clamp to +-adv_clip_max, shape by ``adv_mode``, map [-c, c] onto [0, 1]."""
    if adv_mode not in ADV_MODES:
        raise ValueError(f"algorithm.diffusion_nft.adv_mode={adv_mode!r} is not one of {list(ADV_MODES)}")
    if adv_clip_max <= 0:
        raise ValueError(f"actor_rollout_ref.actor.adv_clip_max={adv_clip_max} must be > 0 for DiffusionNFT")
    a = advantages.clamp(-adv_clip_max, adv_clip_max)
    if adv_mode == "positive_only":
        a = a.clamp(0, adv_clip_max)
    elif adv_mode == "negative_only":
        a = a.clamp(-adv_clip_max, 0)
    elif adv_mode == "one_only":
        a = torch.where(a > 0, torch.ones_like(a), torch.zeros_like(a))
    elif adv_mode == "binary":
        a = torch.sign(a)
    return ((a / adv_clip_max) / 2.0 + 0.5).clamp(0, 1)


def nft_loss(
    velocity: torch.Tensor,
    old_velocity: torch.Tensor,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    adv_clip_max: float,
    *,
    ref_velocity: Optional[torch.Tensor] = None,
    kl_coef: float = 0.0,
    check_finite: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DiffusionNFT loss of one forward-process term over a micro-batch, and its metrics (detached tensors).

    ``velocity``: the policy's prediction at (x_t, t) (with gradient); ``old_velocity``: the old policy's; ``x0``:
    the rollouts' clean latents; ``t`` [B] in [0, 1]; ``r`` [B] from ``reward_weight``; ``beta``: the implicit
    policies' mixing (algorithm.diffusion_nft.beta). ``ref_velocity`` (adapter off) adds
    ``kl_coef * mean((v - v_ref)^2)`` to the loss when kl_coef > 0 (reported either way).
    The loss is ``mean(r L+ / beta + (1 - r) L- / beta) * adv_clip_max`` as the original (float64 weights promote
    it to float64).
    """
    if beta <= 0:
        raise ValueError(f"algorithm.diffusion_nft.beta={beta} must be > 0")
    if check_finite:
        for name, value in (("velocity", velocity), ("old_velocity", old_velocity), ("x0", x0), ("r", r)):
            assert_finite(name, value)
    dims = tuple(range(1, x0.ndim))
    t = _per_row(t, x0)
    old_velocity = old_velocity.detach()
    positive = beta * velocity + (1 - beta) * old_velocity
    negative = (1.0 + beta) * old_velocity - beta * velocity
    positive_loss = _adaptive_x0_loss(xt - t * positive, x0, dims)
    negative_loss = _adaptive_x0_loss(xt - t * negative, x0, dims)
    unweighted = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    policy_loss = (unweighted * adv_clip_max).mean()
    loss = policy_loss
    with torch.no_grad():
        metrics = {
            "policy_loss": policy_loss.detach(),
            "unweighted_policy_loss": unweighted.mean().detach(),
            "old_deviate": (velocity - old_velocity).pow(2).mean().detach(),
        }
    if ref_velocity is not None:
        ref_velocity = ref_velocity.detach()
        kl = (velocity - ref_velocity).pow(2).mean(dim=dims).mean()
        metrics["kl_div"] = kl.detach()
        metrics["old_kl_div"] = (old_velocity - ref_velocity).pow(2).mean(dim=dims).mean().detach()
        if kl_coef > 0:
            loss = loss + kl_coef * kl
    metrics["loss"] = loss.detach()
    return loss, metrics


def _adaptive_x0_loss(x0_pred: torch.Tensor, x0: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Per-row squared error of an x0-prediction divided by its detached mean absolute error (float64, floored)."""
    with torch.no_grad():
        weight = (x0_pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clip(min=WEIGHT_FLOOR)
    return ((x0_pred - x0) ** 2 / weight).mean(dim=dims)


def _per_row(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` ([B] or scalar) shaped to broadcast over ``like`` [B, ...]."""
    t = torch.as_tensor(t, device=like.device)
    if t.ndim == 0:
        return t
    if t.shape != like.shape[:1]:
        raise ValueError(f"t has shape {tuple(t.shape)}, expected ({like.shape[0]},) or a scalar")
    return t.view(-1, *([1] * (like.ndim - 1)))
