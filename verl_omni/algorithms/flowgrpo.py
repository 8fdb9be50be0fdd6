"""FlowGRPO: group-normalised advantages, the clipped policy loss over SDE-window transitions, the KL term, and
GRPO-Guard's ratio normalisation as an option.

``FlowGRPO`` is the algorithm behind the seam (``algorithm.name=flowgrpo``, section ``algorithm.flowgrpo``); the
functions above it are its math, with no model code.

References (tests/test_flowgrpo_parity.py compares with transcriptions of them):
- yifan123/flow_grpo at ac4c86e: flow_grpo/stat_tracking.py (``PerPromptStatTracker.update``) for advantages,
  scripts/train_sd3.py (the inner training loop) for the loss, its metrics and the KL term;
- scripts/train_sd3_GRPO_Guard.py (flow_grpo's GRPO-Guard trainer, read at zhtmike/flow_grpo 2e2f712, the commit
  that adds it) for the ratio normalisation and the gradient reweighting.

Where flow_grpo's trainers differ per model family (detaching CFG's unconditional branch, dropping rows with
advantage 0) the setting is ``null`` by default and resolves to what the family's reference trainer does; each
pipeline declares that in ``REFERENCE_TRAINER_DEFAULTS`` (``verl_omni/pipelines``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import torch

from verl_omni.algorithms.base import Algorithm, AlgorithmSection, Loss
from verl_omni.algorithms.registry import register_algorithm
from verl_omni.core.errors import assert_finite
from verl_omni.core.section import require_bool, require_number
from verl_omni.schedulers.flow_match_sde import choose_window, sde_step_with_logprob

logger = logging.getLogger(__name__)

# flow_grpo's PerPromptStatTracker adds this to the std (per group, or of the batch with global_std).
STD_FLOOR = 1e-4


def checked_rewards(
    rewards: Union[torch.Tensor, np.ndarray], group_ids: Union[Sequence, np.ndarray, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(rewards as a tensor, their float64 host copy, the group ids as an array), after checking that the rewards
    are a finite 1-D [B] and that there is one group id per reward."""
    rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B], got shape {tuple(rewards.shape)}")
    if isinstance(group_ids, torch.Tensor):
        group_ids = group_ids.cpu().numpy()
    group_ids = np.asarray(group_ids)
    if group_ids.shape != (rewards.shape[0],):
        raise ValueError(f"group_ids must have shape ({rewards.shape[0]},), got {group_ids.shape}")
    assert_finite("rewards", rewards)
    return rewards, rewards.detach().to(device="cpu", dtype=torch.float64), group_ids


def compute_group_advantages(
    rewards: torch.Tensor,
    group_ids: Union[Sequence, np.ndarray, torch.Tensor],
    *,
    global_std: bool = False,
    eps: float = STD_FLOOR,
    clip: Optional[float] = None,
) -> torch.Tensor:
    """(r - mean_group) / (std + eps) per prompt group, as flow_grpo's ``PerPromptStatTracker.update`` ('grpo').

    std is the population std (numpy's default, as flow_grpo) of the group, or of the whole batch when
    ``global_std``; ``eps`` is flow_grpo's floor, 1e-4 (a near-constant group's advantages stay bounded by its
    spread / 1e-4 before the clip). Computed in float64. A group whose rewards are all equal (or a group of one)
    gets exactly 0: each group is centred on its first reward before its mean is taken, so equal rewards leave
    exact zeros (a float mean of equal values need not equal them). ``clip`` clamps to [-clip, clip] (flow_grpo
    does that in the loss with ``adv_clip_max``). Groups are the ids given (flow_grpo groups by prompt text).
    """
    rewards, values, group_ids = checked_rewards(rewards, group_ids)
    _, first, inverse = np.unique(group_ids, return_index=True, return_inverse=True)
    inverse = torch.as_tensor(inverse.reshape(-1), dtype=torch.long)
    num_groups = len(first)

    shifted = values - values[torch.as_tensor(first, dtype=torch.long)][inverse]  # 0 exactly where equal to the first
    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(values))
    means = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, shifted) / counts
    centered = shifted - means[inverse]
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


class GuardTerms(NamedTuple):
    """What GRPO-Guard's ratio normalisation needs of one step (flow_grpo's ``config.rationorm``): the policy's SDE
    mean, the rollout policy's, the step's ``std_dev_t`` and ``sqrt(-dt)`` (both scalars or broadcastable)."""

    prev_sample_mean: torch.Tensor
    old_prev_sample_mean: torch.Tensor
    std_dev_t: torch.Tensor
    sqrt_dt: torch.Tensor


def flowgrpo_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_ratio: float,
    *,
    adv_clip_max: Optional[float] = None,
    kl: Optional[torch.Tensor] = None,
    kl_beta: float = 0.0,
    guard: Optional[GuardTerms] = None,
    check_finite: bool = True,
    as_tensors: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-style clipped loss of one denoising step, as flow_grpo's train loop.

    ratio = exp(log_prob - old_log_prob); loss = mean(max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c)))
    with A clamped to [-adv_clip_max, adv_clip_max]; plus ``kl_beta * kl.mean()`` when ``kl`` (from
    ``flowgrpo_kl``) is given and ``kl_beta > 0`` (given with beta 0 it is only reported).

    ``guard``: GRPO-Guard. With s = mean(sqrt_dt) * mean(std_dev_t) (the step's noise scale) the ratio becomes
    exp((log_prob - old_log_prob + b) * s), b = mean((mu - mu_old)^2) / (2 s^2) per row — the log-ratio's bias
    removed and its scale made the same at every step — and the policy loss is divided by mean(sqrt_dt)^2 (its
    gradient reweighting across steps). The KL term is unchanged.

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
    if guard is not None:
        sqrt_dt = guard.sqrt_dt.mean()
        scale = sqrt_dt * guard.std_dev_t.mean()
        mean_diff = guard.prev_sample_mean - guard.old_prev_sample_mean
        bias = mean_diff.pow(2).mean(dim=tuple(range(1, mean_diff.ndim))) / (2 * scale**2)
        ratio = torch.exp((log_ratio + bias) * scale)
    else:
        ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    if guard is not None:
        policy_loss = policy_loss / sqrt_dt**2
    loss = policy_loss

    with torch.no_grad():
        metrics = {
            "policy_loss": policy_loss.detach(),
            # flow_grpo's approx_kl is 0.5 * E[(log pi - log pi_old)^2] (the raw log-ratio, also under GRPO-Guard)
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
        if kl_beta > 0:  # flow_grpo skips the reference forward entirely when beta == 0
            loss = policy_loss + kl_beta * kl_loss
    metrics["loss"] = loss.detach()
    if not as_tensors:
        metrics = {name: value.item() for name, value in metrics.items()}
    return loss, metrics


# ----------------------------------------------------------------------------------------------- the algorithm
@dataclasses.dataclass
class FlowGRPOSection(AlgorithmSection):
    """``algorithm.flowgrpo``. Shared keys keep verl's names: ``actor_rollout_ref.actor.{clip_ratio, kl_coef,
    adv_clip_max, ppo_epochs}``; the SDE sampler is ``actor_rollout_ref.rollout.algo.*``. ``null`` settings take
    the value flow_grpo's own trainer uses for the model family (the pipeline's ``REFERENCE_TRAINER_DEFAULTS``)."""

    _prefix = "algorithm.flowgrpo"

    # std over the whole batch instead of per prompt group (advantages are clipped by actor.adv_clip_max)
    global_std: bool = False
    # added to the std before dividing (flow_grpo's PerPromptStatTracker: 1e-4)
    adv_std_eps: float = STD_FLOOR
    # no gradient through CFG's unconditional branch in the update (null: the family's flow_grpo trainer; SD3 true,
    # Qwen-Image false)
    detach_unconditional: Optional[bool] = None
    # leave rows whose advantage is exactly 0 (all-equal groups) out of the update and its average (null: the
    # family's flow_grpo trainer; SD3 true, Qwen-Image false)
    drop_zero_advantage: Optional[bool] = None
    # GRPO-Guard (flow_grpo scripts/train_sd3_GRPO_Guard.py, config.rationorm): the log-ratio's bias removed and its
    # scale normalised per step, and the policy loss reweighted by 1 / (sigma - sigma_next)
    grpo_guard: bool = False

    def __post_init__(self) -> None:
        require_bool(self.key("global_std"), self.global_std)
        require_number(self.key("adv_std_eps"), self.adv_std_eps, 0, strict=True)
        for name in ("detach_unconditional", "drop_zero_advantage"):
            if getattr(self, name) is not None:
                require_bool(self.key(name) + " (or null: the model family's flow_grpo default)", getattr(self, name))
        require_bool(self.key("grpo_guard"), self.grpo_guard)


@register_algorithm("flowgrpo")
class FlowGRPO(Algorithm):
    """FlowGRPO: an SDE window drawn per prompt group, group-normalised advantages, PPO's clipped loss over the
    window's (step, rows) transitions with log-probs recomputed through the scheduler's ``sde_step_with_logprob``,
    and an optional KL to the reference (the adapter disabled); GRPO-Guard as an option."""

    Config = FlowGRPOSection
    needs_log_probs = True
    staged_fields = ("latents", "timesteps", "sigmas", "old_log_probs", "advantages")
    checked_fields = ("advantages", "old_log_probs", "latents")

    def __init__(self, config: Optional[FlowGRPOSection] = None, *, actor: Any = None, rollout: Any = None):
        super().__init__(config, actor=actor, rollout=rollout)
        self.family_defaults: dict[str, Any] = {}

    def bind_pipeline(self, pipeline: Any) -> None:
        super().bind_pipeline(pipeline)
        self.family_defaults = dict(getattr(pipeline, "REFERENCE_TRAINER_DEFAULTS", {}).get(self.name, {}))
        logger.info(
            "algorithm.flowgrpo for %s: detach_unconditional=%s, drop_zero_advantage=%s",
            self.pipeline_name,
            self.detach_unconditional,
            self.drop_zero_advantage,
        )

    def _resolved(self, name: str) -> bool:
        value = getattr(self.config, name)
        return bool(self.family_defaults.get(name, False)) if value is None else value

    @property
    def detach_unconditional(self) -> bool:
        return self._resolved("detach_unconditional")

    @property
    def drop_zero_advantage(self) -> bool:
        return self._resolved("drop_zero_advantage")

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        ref = cfg.actor_rollout_ref
        rollout, actor = ref.rollout, ref.actor
        prefix = "actor_rollout_ref.rollout"
        if rollout.n < 2:
            raise ValueError(
                f"{prefix}.n={rollout.n} must be >= 2: FlowGRPO's advantages are normalised within the "
                "n samples of a prompt, so a group of one has advantage 0 and nothing is learned"
            )
        if not rollout.algo.noise_level > 0:
            raise ValueError(
                f"{prefix}.algo.noise_level={rollout.algo.noise_level!r} must be > 0 for training "
                "(0 is the deterministic sampler: no log-probs to train on; use it in val_kwargs)"
            )
        steps, size = rollout.pipeline.num_inference_steps, rollout.algo.sde_window_size
        last_start = steps - size if rollout.algo.sde_window_range is None else rollout.algo.sde_window_range[1]
        window_reaches_end = size == 0 or last_start + size >= steps
        if rollout.algo.sde_type == "cps" and actor.kl_coef > 0 and window_reaches_end:
            raise ValueError(
                f"{prefix}.algo.sde_type='cps' with actor_rollout_ref.actor.kl_coef>0 needs an SDE window that ends "
                f"before the last step (cps has zero noise there, so the KL divides by 0): set {prefix}.algo."
                "sde_window_size / sde_window_range, or kl_coef=0"
            )

    # ------------------------------------------------------------------ rollout
    def sampling(self, params: Any, *, step: int, group_seed: int, validate: bool) -> Any:
        """The SDE window's start, drawn per prompt group (all n samples share it); validation samples as given."""
        if validate or params.sde_window_size <= 0:
            return params
        start = choose_window(group_seed, params.num_inference_steps, params.sde_window_size, params.sde_window_range)
        return params.replace(window_start=start)

    # ------------------------------------------------------------------ advantages
    def advantages(self, rewards, group_ids) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        advantages = compute_group_advantages(
            torch.as_tensor(rewards), group_ids, global_std=cfg.global_std, eps=cfg.adv_std_eps
        )
        return advantages, {"advantages/zero_frac": float((advantages == 0).double().mean())}

    # ------------------------------------------------------------------ the update: (window step, rows) transitions
    def _trained_rows(self, batch: Any) -> torch.Tensor:
        """bool [B]: the rows the update trains on (all, or those with a non-zero advantage)."""
        if not self.drop_zero_advantage:
            return torch.ones(len(batch), dtype=torch.bool)
        return batch.tensors["advantages"] != 0

    def num_terms(self, batch: Any) -> int:
        return int((batch.window & self._trained_rows(batch)[:, None]).sum())

    def units(self, batch: Any) -> list[tuple[int, torch.Tensor]]:
        window = batch.window & self._trained_rows(batch)[:, None]
        out = []
        for step in range(window.shape[1]):
            rows = torch.nonzero(window[:, step]).flatten()
            if rows.numel():  # a step outside every row's SDE window has nothing to train on
                out.append((step, rows))
        return out

    def micro_tensors(self, batch: Any, step: int, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        # where x_step sits in each row's stored latents (x_{step+1} is the next column)
        return {"columns": batch.latent_columns(rows, step)}

    def update_constants(self, batch: Any) -> dict[str, Any]:
        return {"sigma_max": batch.sigma_max if len(batch) else 0.0}  # a rank without rows plans no micro-batch

    def no_terms_message(self, batch: Any) -> Optional[str]:
        if len(batch) == 0 or (self.drop_zero_advantage and int(batch.window.sum()) > 0):
            return None  # every row's advantage is 0 (or this rank has none): no step, nothing to learn
        return (
            "no SDE-window steps in the batch: nothing to train on (check "
            "actor_rollout_ref.rollout.algo.noise_level > 0 and .sde_window_size)"
        )

    def log_probs(self, ctx: Any, micro: Any):
        """(log_prob [b], prev_sample_mean, std_dev_t) of transition ``micro.step`` for ``micro.rows`` under the
        current weights, through the scheduler's step — the one formula the rollout used, with the noise level and
        SDE type the rows were sampled with (``ctx.settings``)."""
        t, rows, step = ctx.tensors, micro.rows, micro.step
        columns = micro.tensors["columns"]
        sample, prev_sample = t["latents"][rows, columns], t["latents"][rows, columns + 1]
        velocity = ctx.velocity(
            sample, t["timesteps"][rows, step], micro, detach_unconditional=self.detach_unconditional
        )
        sigmas = t["sigmas"][rows]
        sde = ctx.settings  # what the rows were sampled with (the batch's, not this process's rollout config)
        return sde_step_with_logprob(
            velocity.float(),
            sample.float(),
            sigmas[:, step],
            sigmas[:, step + 1],
            noise_level=sde.noise_level,
            sde_type=sde.sde_type,
            sigma_max=ctx.constants["sigma_max"],
            prev_sample=prev_sample.float(),
        )

    def loss(self, ctx: Any, micro: Any) -> Loss:
        cfg = self.actor
        out = self.log_probs(ctx, micro)
        kl = None
        if cfg.kl_coef > 0:
            with torch.no_grad(), ctx.reference():
                ref = self.log_probs(ctx, micro)
            kl = flowgrpo_kl(out.prev_sample_mean, ref.prev_sample_mean, _per_sample(out.std_dev_t, len(micro.rows)))
        bad = (~torch.isfinite(out.log_prob.detach())).sum()
        if kl is not None:
            bad = bad + (~torch.isfinite(kl)).sum()
        rows, step = micro.rows, micro.step
        loss, metrics = flowgrpo_policy_loss(
            out.log_prob,
            ctx.tensors["old_log_probs"][rows, step],
            ctx.tensors["advantages"][rows],
            cfg.clip_ratio,
            adv_clip_max=cfg.adv_clip_max,
            kl=kl,
            kl_beta=cfg.kl_coef,
            guard=self._guard_terms(ctx, micro, out) if self.config.grpo_guard else None,
            check_finite=False,
            as_tensors=True,
        )
        return Loss(loss, metrics, bad)

    @staticmethod
    def _guard_terms(ctx: Any, micro: Any, out: Any) -> GuardTerms:
        """GRPO-Guard's inputs for ``micro``. The rollout policy's SDE mean is the policy's own in the first epoch
        (no optimizer step has happened yet in this update: the policy is the one that sampled, as the ratio of 1
        shows), recorded then and reused by later epochs; flow_grpo's trainer stores it from the sampling pass."""
        old_mean = ctx.cache.get(id(micro))
        if old_mean is None:
            old_mean = ctx.cache[id(micro)] = out.prev_sample_mean.detach()
        sigmas = ctx.tensors["sigmas"][micro.rows]
        sqrt_dt = (sigmas[:, micro.step] - sigmas[:, micro.step + 1]).float().sqrt()
        return GuardTerms(out.prev_sample_mean, old_mean, out.std_dev_t, sqrt_dt)


def _per_sample(std: torch.Tensor, batch: int) -> torch.Tensor:
    """The SDE std as [batch] (the scheduler may return it broadcastable, e.g. [B, 1, 1])."""
    flat = std.reshape(-1)
    return flat if flat.numel() == batch else flat[:1].expand(batch)
