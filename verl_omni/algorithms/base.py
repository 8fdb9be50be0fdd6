"""The algorithm seam: what an RL algorithm declares and implements, and what the rest of verl_omni calls.

An algorithm is one module under ``verl_omni/algorithms/`` holding an ``Algorithm`` subclass registered with
``@register_algorithm(name)`` (``registry.py``); ``algorithm.name`` in the YAML picks it and ``algorithm.<name>.*``
is its typed section (the ``Config`` dataclass it declares). Who calls what:

- start-up (``config/trainer.py``): ``check_config(cfg)`` — checks that span the run's sections; every process
  that holds an instance then calls ``bind_pipeline(pipeline)`` (the RL pipeline, or its class on the driver);
- the agent loop, per prompt group: ``sampling(params, step=, group_seed=, validate=)`` — that group's sampling
  settings (the SDE window, ODE steps, CFG ...);
- the trainer (driver), per step: ``advantages(rewards, group_ids)``;
- the actor (every rank), per update: ``num_terms`` / ``units`` (which forward passes the update makes),
  ``micro_tensors`` (what a micro-batch indexes), ``update_constants``, ``loss(ctx, micro)`` (through an
  ``UpdateContext``: the policy's velocity, the reference with the adapter disabled, the staged tensors, and
  ``ctx.settings``: the sampling settings the rows carry, never this process's copy of the rollout config), and
  ``after_optimizer_step(actor, step)``.

The actor keeps all that is not algorithm math: planning and staging, micro-batching, CFG layout, checkpointing,
compile, backward, the gradient all-reduce, clipping, the optimizer, OOM retry, metric reduction (sums of device
tensors read once per epoch) and the non-finite check. Nothing outside ``algorithms/`` names an algorithm.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, Optional

import torch

from verl_omni.core.section import Section


@dataclasses.dataclass
class AlgorithmSection(Section):
    """Base of an algorithm's typed config section ``algorithm.<name>.*`` (a frozen dataclass that checks itself in
    ``__post_init__`` with messages naming ``self.key(field)``). Set ``_prefix = "algorithm.<name>"``."""


class Loss(NamedTuple):
    """What ``Algorithm.loss`` returns for one micro-batch.

    ``loss``: the mean over the micro-batch's rows (the actor weights it by rows / the update's terms);
    ``metrics``: detached 0-dim device tensors (the actor sums them and reads them once per epoch);
    ``bad``: a 0-dim device count of non-finite values seen (the actor refuses the step when it is > 0)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    bad: torch.Tensor


class Algorithm:
    """One RL algorithm behind the seam. Instances are cheap and stateless unless the algorithm keeps state on the
    actor rank (``after_optimizer_step``); each process builds its own from the config.

    ``config``: this algorithm's section (an instance of ``Config``); ``actor`` / ``rollout``: the shared
    ``actor_rollout_ref.actor`` / ``.rollout`` sections (verl's keys: clip_ratio, kl_coef, adv_clip_max, the SDE
    sampler's settings, the CFG scale)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[AlgorithmSection]] = AlgorithmSection
    # Whether the rollout must return per-step log-probs (and the trajectory's SDE-window transitions).
    needs_log_probs: ClassVar[bool] = True
    # Rollout tensors the update reads on the device (moved there once per update), and those that must be finite.
    staged_fields: ClassVar[tuple[str, ...]] = ("latents", "timesteps", "sigmas", "advantages")
    checked_fields: ClassVar[tuple[str, ...]] = ("advantages", "latents")

    def __init__(self, config: Optional[AlgorithmSection] = None, *, actor: Any = None, rollout: Any = None):
        self.config = self.Config() if config is None else config
        if not isinstance(self.config, self.Config):
            raise TypeError(f"algorithm {self.name!r} takes a {self.Config.__name__}, got {type(self.config).__name__}")
        self.actor, self.rollout = actor, rollout

    # ------------------------------------------------------------------ start-up
    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Start-up checks that span the run's sections (``cfg``: the whole parsed config); raise ``ValueError``
        naming the keys. The section's own checks live in ``Config.__post_init__``."""

    def bind_pipeline(self, pipeline: Any) -> None:
        """The RL pipeline (or its class) this run trains: per-family settings can resolve from its class attributes
        (``REFERENCE_TRAINER_DEFAULTS``). The driver, the agent loops and every actor rank call it alike."""
        self.pipeline_name = type(pipeline).__name__ if not isinstance(pipeline, type) else pipeline.__name__

    # ------------------------------------------------------------------ rollout (agent loop)
    def sampling(self, params: Any, *, step: int, group_seed: int, validate: bool) -> Any:
        """The sampling settings of one prompt group at training step ``step``: ``params`` (the rollout's
        ``DiffusionSamplingParams``) changed as this algorithm needs. ``group_seed`` is deterministic per (run seed,
        step, group): draw from it, never from global state, so all n samples of a group agree."""
        return params

    @property
    def guidance_scale(self) -> float:
        """The CFG scale this algorithm's rollouts sample with (the rollout's by default; a CFG-free algorithm
        returns 1.0). The update's forwards use the scale its rows carry (``config/sampling.RowSettings``)."""
        return float(self.rollout.pipeline.true_cfg_scale)

    # ------------------------------------------------------------------ advantages (driver)
    def advantages(
        self, rewards: torch.Tensor, group_ids: Sequence | torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(advantages [B] float32, metrics) from the rows' total rewards [B] and their prompt-group ids."""
        raise NotImplementedError(f"algorithm {self.name!r} has no advantages()")

    # ------------------------------------------------------------------ the update's units (actor rank)
    def num_terms(self, batch: Any) -> int:
        """How many loss terms (e.g. (row, step) transitions) the update averages over in ``batch`` (a host
        ``TrainBatch``); the actor weights each micro-batch by its rows / this (over all ranks)."""
        raise NotImplementedError

    def units(self, batch: Any) -> list[tuple[int, torch.Tensor]]:
        """The update's forward passes over ``batch`` (host): (step, rows [int64, host]) pairs; the actor splits
        each into micro-batches. ``step`` is the algorithm's (a denoising step, a sampled timestep index ...)."""
        raise NotImplementedError

    def micro_tensors(self, batch: Any, step: int, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Host tensors one micro-batch needs besides its rows (moved to the device when the plan is made)."""
        return {}

    def update_constants(self, batch: Any) -> dict[str, Any]:
        """Update-wide numbers computed once from the host batch (``ctx.constants``); a rank may have no rows."""
        return {}

    def prepare_epoch(self, ctx: Any, plan: Sequence[Any]) -> None:
        """Called on every rank before each epoch's micro-batches, with all of this rank's (``plan``; a rank may
        have none): forwards under other weights than the policy's, done once for the epoch (DiffusionNFT's old
        policy: one swap, which with full fine-tuning is a collective every rank makes once whatever its rows)."""

    def loss(self, ctx: Any, micro: Any) -> Loss:
        """The loss of one micro-batch (``micro.step``, ``micro.rows`` on the device, ``micro.inputs``,
        ``micro.tensors``) under the current policy; ``ctx`` is the actor's ``UpdateContext``."""
        raise NotImplementedError

    def log_probs(self, ctx: Any, micro: Any) -> Any:
        """Per-row log-probs of ``micro``'s unit under the policy (tools and tests; algorithms with log-probs)."""
        raise NotImplementedError(f"algorithm {self.name!r} computes no per-step log-probs")

    def no_terms_message(self, batch: Any) -> Optional[str]:
        """Why an update of ``batch`` (host) with 0 terms over all ranks is an error (raised as ``ValueError``), or
        None where that is expected (the update then takes no optimizer step)."""
        return f"algorithm {self.name!r}: the batch has no terms to train on"

    # ------------------------------------------------------------------ state on the actor rank
    # Whether training rollouts sample from weights of the algorithm's own (``rollout_weights``) rather than from the
    # adapter being trained (the driver reads it: the split placement then pushes those to the engines).
    serves_rollout_weights: ClassVar[bool] = False
    # How many copies of the trained weights the algorithm keeps on the actor rank (``actor.shadow_weights()``, e.g.
    # an old policy). With full fine-tuning each is a float32 copy sharded like the master weights: the start-up
    # memory plan counts them (``trainer/ray_trainer.py``).
    shadow_weight_copies: ClassVar[int] = 0

    def attach(self, actor: Any) -> None:
        """Called on the actor rank once its adapter is initialised, and again whenever the adapter is loaded (a
        resume): build (or rebuild) the state the algorithm keeps beside the adapter (``actor.trainable``)."""

    def after_optimizer_step(self, actor: Any, step: int) -> None:
        """Called on every rank after each optimizer step (``step``: the optimizer steps taken so far)."""

    def rollout_weights(self) -> Optional[Any]:
        """The weights training rollouts sample from instead of the adapter (``ShadowWeights`` of it, e.g. an older
        policy; the actor swaps them in around the rollout), or None: the adapter itself."""
        return None
