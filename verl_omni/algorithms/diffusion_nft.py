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

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import torch

from verl_omni.algorithms.base import Algorithm, AlgorithmSection, Loss
from verl_omni.algorithms.flowgrpo import compute_group_advantages
from verl_omni.algorithms.registry import register_algorithm
from verl_omni.core.errors import assert_finite
from verl_omni.core.section import require_bool, require_choice, require_number
from verl_omni.models.ema import ShadowWeights

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


# ----------------------------------------------------------------------------------------------- the algorithm
# The advantages' std floor: PerPromptStatTracker's ``std + 1e-4`` (flow_grpo/stat_tracking.py in the original).
STD_EPS = 1e-4


@dataclasses.dataclass
class DiffusionNFTSection(AlgorithmSection):
    """``algorithm.diffusion_nft``; defaults are the original's (config/base.py, config/nft.py). Shared keys keep
    verl's names: ``actor_rollout_ref.actor.adv_clip_max`` is r's scale (5 there) and ``.kl_coef`` the weight of the
    velocity KL to the reference policy (the original's ``train.beta``, 1e-4)."""

    _prefix = "algorithm.diffusion_nft"

    # The implicit policies' mixing, v+ = beta v + (1 - beta) v_old (the original's ``beta``: 1.0; 0.1 for OCR).
    beta: float = 1.0
    # The old policy's schedule after each optimizer step s (``return_decay``; 2 for OCR): 0 follows the policy;
    # 1 keeps min(0.001 s, 0.5) of itself; 2 follows it for 75 steps, then keeps min(0.0075 (s - 75), 0.999).
    decay_type: int = 1
    # Each row trains on int(num_inference_steps * timestep_fraction) of its sampler's timesteps, drawn per row.
    timestep_fraction: float = 0.99
    # The clipped advantage's shape before it becomes r: all | positive_only | negative_only | one_only | binary.
    adv_mode: str = "all"
    # Advantages (reward - group mean) / (std + 1e-4) with the std of the whole batch, as the original's
    # PerPromptStatTracker(global_std=True); false: the std of each prompt group.
    global_std: bool = True

    def __post_init__(self) -> None:
        require_number(self.key("beta"), self.beta, 0, strict=True)
        require_choice(self.key("decay_type"), self.decay_type, tuple(DECAY_SCHEDULES))
        if not (isinstance(self.timestep_fraction, (int, float)) and 0 < self.timestep_fraction <= 1):
            raise ValueError(f"{self.key('timestep_fraction')}={self.timestep_fraction!r} must be in (0, 1]")
        require_choice(self.key("adv_mode"), self.adv_mode, ADV_MODES)
        require_bool(self.key("global_std"), self.global_std)


@register_algorithm("diffusion_nft")
class DiffusionNFT(Algorithm):
    """DiffusionNFT: CFG-free ODE rollouts by the old policy that keep only x_0; the update noises x_0 again at
    sampled timesteps ((timestep, rows) units) and regresses the implicit positive / negative policies
    (``nft_loss``); the old policy (shadow weights of the adapter) moves towards the trained one after each
    optimizer step by ``old_policy_decay`` and is what the engines serve for training rollouts."""

    Config = DiffusionNFTSection
    needs_log_probs = False
    serves_rollout_weights = True
    shadow_weight_copies = 1  # the old policy
    staged_fields = ("latents", "timesteps", "sigmas", "advantages")
    checked_fields = ("advantages", "latents")

    def __init__(self, config: Optional[DiffusionNFTSection] = None, *, actor: Any = None, rollout: Any = None):
        super().__init__(config, actor=actor, rollout=rollout)
        # on the actor rank: the old policy (``attach``: the actor's shadow weights, sharded with full fine-tuning)
        self.old: Optional[ShadowWeights] = None
        self._actor: Any = None
        self._timestep_index: Optional[torch.Tensor] = None  # [B, k] of the update being planned
        self._noise_seed = 0
        self._noise: Optional[torch.Generator] = None
        # id(micro-batch) -> (x_t, the old policy's velocity) of the epoch being trained (``prepare_epoch``)
        self._prepared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        rollout, actor = cfg.actor_rollout_ref.rollout, cfg.actor_rollout_ref.actor
        if rollout.n < 2:
            raise ValueError(
                f"actor_rollout_ref.rollout.n={rollout.n} must be >= 2: DiffusionNFT's advantages are centred on "
                "each prompt's mean, so a group of one has advantage 0 and nothing is learned"
            )
        if rollout.pipeline.true_cfg_scale != 1.0:
            raise ValueError(
                f"actor_rollout_ref.rollout.pipeline.true_cfg_scale={rollout.pipeline.true_cfg_scale} must be 1.0: "
                "DiffusionNFT samples, trains and validates without CFG"
            )
        if actor.adv_clip_max is None:
            raise ValueError("actor_rollout_ref.actor.adv_clip_max=null: DiffusionNFT needs it (r's scale, e.g. 5)")
        num_train_timesteps(rollout.pipeline.num_inference_steps, cfg.algorithm.section.timestep_fraction)

    # ------------------------------------------------------------------ rollout
    @property
    def guidance_scale(self) -> float:
        return 1.0

    def sampling(self, params: Any, *, step: int, group_seed: int, validate: bool) -> Any:
        """CFG-free; training rollouts are deterministic ODE samples (no SDE step, no log-probs) that keep x_0."""
        params = params.replace(guidance_scale=1.0, negative_prompt=None)
        if validate:
            return params
        return params.replace(
            noise_level=0.0,
            sde_window_size=0,
            sde_window_range=None,
            window_start=None,
            trajectory_window_only=True,
            keep_latent_steps=(-1,),
        )

    # ------------------------------------------------------------------ advantages
    def advantages(self, rewards, group_ids) -> tuple[torch.Tensor, dict[str, float]]:
        rewards = torch.as_tensor(rewards)
        advantages = compute_group_advantages(rewards, group_ids, global_std=self.config.global_std, eps=STD_EPS)
        return advantages.float(), {}

    # ------------------------------------------------------------------ the update: (sampled timestep, rows) terms
    def _count(self, batch: Any) -> int:
        return num_train_timesteps(int(batch.tensors["timesteps"].shape[1]), self.config.timestep_fraction)

    def num_terms(self, batch: Any) -> int:
        return len(batch) * self._count(batch) if len(batch) else 0

    def units(self, batch: Any) -> list[tuple[int, torch.Tensor]]:
        """Unit j trains every row at its own j-th sampled timestep (a fresh per-row permutation per update)."""
        rows = len(batch)
        if rows == 0:
            return []
        count = self._count(batch)
        # The update's draws (timesteps here, x_t's noise in ``loss``) from (rollout.seed, optimizer steps taken):
        # a run is reproducible and every rank draws alike.
        seed = (int(getattr(self.rollout, "seed", 0)) * 1_000_003 + int(getattr(self._actor, "optimizer_steps", 0))) * 2
        self._noise_seed, self._noise = seed + 1, None
        generator = torch.Generator().manual_seed(seed)
        self._timestep_index = train_timestep_indices(rows, int(batch.tensors["timesteps"].shape[1]), count, generator)
        everyone = torch.arange(rows)
        return [(j, everyone) for j in range(count)]

    def micro_tensors(self, batch: Any, step: int, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"timestep_index": self._timestep_index[rows, step], "x0_column": _x0_columns(batch, rows)}

    def no_terms_message(self, batch: Any) -> Optional[str]:
        return "DiffusionNFT: the batch has no rows to train on"

    @staticmethod
    def _timestep(ctx: Any, micro: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sigma, the transformer's timestep, x_0) of ``micro``'s rows at their sampled timesteps."""
        t, rows = ctx.tensors, micro.rows
        index = micro.tensors["timestep_index"].unsqueeze(1)
        sigma = t["sigmas"][rows].gather(1, index).squeeze(1)  # t in [0, 1] of x_t = (1 - t) x0 + t noise
        model_timestep = t["timesteps"][rows].gather(1, index).squeeze(1)  # what the transformer receives
        return sigma, model_timestep, t["latents"][rows, micro.tensors["x0_column"]].float()

    def prepare_epoch(self, ctx: Any, plan: Sequence[Any]) -> None:
        """x_t of every micro-batch (its noise drawn in the micro-batches' order, as the loss used to) and the old
        policy's velocity there, all under one swap of the old policy into the weights: with full fine-tuning the
        swap all-gathers the sharded old policy, so every rank makes it once an epoch whatever its micro-batches."""
        self._prepared = {}
        with torch.no_grad(), self.old.swapped_in():
            for micro in plan:
                sigma, model_timestep, x0 = self._timestep(ctx, micro)
                xt = noised_latents(x0, self.noise_like(x0), sigma)
                self._prepared[id(micro)] = (xt, ctx.velocity(xt, model_timestep, micro).float())

    def loss(self, ctx: Any, micro: Any) -> Loss:
        t, rows = ctx.tensors, micro.rows
        sigma, model_timestep, x0 = self._timestep(ctx, micro)
        prepared = self._prepared.pop(id(micro), None)
        if prepared is None:
            raise RuntimeError("DiffusionNFT's loss of a micro-batch its epoch's prepare_epoch did not see")
        xt, old_velocity = prepared
        velocity = ctx.velocity(xt, model_timestep, micro).float()
        ref_velocity = None
        if self.actor.kl_coef > 0:
            with torch.no_grad(), ctx.reference():
                ref_velocity = ctx.velocity(xt, model_timestep, micro).float()
        r = reward_weight(t["advantages"][rows], self.actor.adv_clip_max, self.config.adv_mode)
        loss, metrics = nft_loss(
            velocity,
            old_velocity,
            x0,
            xt,
            sigma,
            r,
            self.config.beta,
            self.actor.adv_clip_max,
            ref_velocity=ref_velocity,
            kl_coef=self.actor.kl_coef,
            check_finite=False,
        )
        bad = (~torch.isfinite(velocity.detach())).sum() + (~torch.isfinite(old_velocity)).sum()
        return Loss(loss, metrics, bad)

    def noise_like(self, x0: torch.Tensor) -> torch.Tensor:
        """The next draw of x_t's noise in this update (one generator on x0's device, seeded by ``units``)."""
        if self._noise is None or self._noise.device != x0.device:
            self._noise = torch.Generator(device=x0.device).manual_seed(self._noise_seed)
        return torch.randn(x0.shape, generator=self._noise, device=x0.device, dtype=x0.dtype)

    # ------------------------------------------------------------------ the old policy (actor rank)
    def attach(self, actor: Any) -> None:
        """The old policy starts as (and after a resume restarts from) a copy of the adapter, as the original."""
        self._actor = actor
        self.old = actor.shadow_weights()

    def after_optimizer_step(self, actor: Any, step: int) -> None:
        self.old.update(old_policy_decay(step, self.config.decay_type))

    def rollout_weights(self) -> Optional[ShadowWeights]:
        return self.old


def _x0_columns(batch: Any, rows: torch.Tensor) -> torch.Tensor:
    """int64 [len(rows)]: the column of ``latents`` that holds each row's x_0 (trajectory position T)."""
    last = int(batch.tensors["timesteps"].shape[1])
    positions = batch.tensors.get("latent_steps")
    if positions is None:  # the whole trajectory
        return torch.full((len(rows),), last, dtype=torch.int64)
    positions = positions[rows]
    found = positions == last
    if not bool(found.any(dim=1).all()):
        missing = rows[~found.any(dim=1)].tolist()
        raise ValueError(
            f"rollout rows {missing} lack the final latent x_0 (trajectory position {last}) DiffusionNFT trains "
            "on: the rollout must keep it (sampling keep_latent_steps=(-1,))"
        )
    return found.int().argmax(dim=1)
