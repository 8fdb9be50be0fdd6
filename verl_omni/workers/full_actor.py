"""Full fine-tuning (``actor_rollout_ref.model.lora_rank=0``): the actor trains every weight of the transformer.

The update is the LoRA actor's (the algorithm's units, micro-batches, loss and metrics are the same); what trains
and how it steps differ: every transformer parameter, in its own dtype (the text encoders and the VAE stay frozen),
stepped by ``ShardedAdamW`` (workers/full_weights.py: gradients reduce-scattered over the ranks bucket by
bucket during every backward, float32 master and AdamW state sharded, the new weights all-gathered in place). In
the hybrid engine the parameters are the engine's own, so after each step every engine serves the new weights;
``lora_matches_rank0`` compares them across ranks bitwise. The verbs keep their LoRA names (``lora_state_dict`` and
the rest) so the trainer, the hybrid engine's ranks and the checkpoints drive both actors alike: here they carry the
transformer's weights by name.

No reference policy: it would need a frozen copy of every weight, so ``actor.kl_coef`` must be 0.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from verl_omni.config.actor import ActorConfig
from verl_omni.config.model import ModelConfig
from verl_omni.core.checksum import tensors_checksum
from verl_omni.core.errors import NonFiniteError
from verl_omni.models.ema import EMASchedule, PolicyEMA
from verl_omni.workers.actor import DiffusionLoRAActor, UpdateContext
from verl_omni.workers.full_weights import ShardedAdamW, ShardedShadowWeights


class DiffusionFullActor(DiffusionLoRAActor):
    def _check_model(self, model: ModelConfig, actor: ActorConfig) -> None:
        if model.lora is not None:
            raise ValueError(f"actor_rollout_ref.model.lora_rank={model.lora_rank}: full fine-tuning needs lora_rank=0")
        if actor.kl_coef > 0:
            raise ValueError(
                f"actor_rollout_ref.actor.kl_coef={actor.kl_coef} needs a reference policy, which full fine-tuning "
                "(actor_rollout_ref.model.lora_rank=0) would have to keep as a second copy of every weight: set "
                "kl_coef=0, or train a LoRA (lora_rank >= 1), whose reference is the base model"
            )

    def _trainable_parameters(self, lora_seed: Optional[int]) -> list[torch.nn.Parameter]:
        """Every transformer weight, in place and in its dtype (``lora_seed`` has nothing to draw)."""
        if len(self.pipe.denoisers) > 1:
            raise ValueError(
                f"actor_rollout_ref.model.lora_rank=0 trains one transformer's weights; this pipeline has "
                f"{len(self.pipe.denoisers)} experts ({', '.join(self.pipe.denoisers)}): train a LoRA "
                "(lora_rank >= 1), which wraps every expert"
            )
        trainable = list(self.transformer.parameters())
        for p in trainable:
            p.requires_grad_(True)
        return trainable

    def _make_optimizer(self, actor: ActorConfig) -> ShardedAdamW:
        optim = actor.optim
        self.sync_s = self.step_s = 0.0
        # vllm-omni's worker may run this under inference mode: the gradient shard and master must be normal
        # tensors (every backward adds into the shard, AdamW updates the master).
        with torch.inference_mode(False):
            return ShardedAdamW(
                self.trainable,
                self.grad_sync,
                lr=optim.lr,
                betas=tuple(optim.betas),
                weight_decay=optim.weight_decay,
                offload=actor.optimizer_offload,
                bucket_mb=actor.grad_bucket_mb,
            )

    def _set_up_ema(self) -> None:
        """The policy EMA sharded like the master: each rank moves the float32 average of its shard only."""
        ema = self.config.ema
        if not ema.enable:
            self.ema = None
            return
        weights = ShardedShadowWeights(self.optimizer)
        self.ema = PolicyEMA(self.trainable, EMASchedule(ema.decay, ema.update_interval), weights=weights)

    def shadow_weights(self) -> ShardedShadowWeights:
        """An algorithm's float32 copy of every weight (DiffusionNFT's old policy) sharded like the master: each
        rank keeps its shard (4·P/N bytes, on the host with the offload); swapping it in is a collective."""
        return ShardedShadowWeights(self.optimizer)

    # ------------------------------------------------------------------ the policy EMA, gathered where needed
    def ema_state_dict(self) -> Optional[dict]:
        """The EMA as the transformer's weights by name (swapped in: a collective, every rank calls it); rank 0
        returns them, the other ranks None."""
        with self._ema_in_params():
            tensors = self.lora_state_dict() if self.grad_sync.rank == 0 else None
        return None if tensors is None else {"lora": tensors, "optimizer_steps": self.ema.optimizer_steps}

    def ema_checksum(self) -> Optional[str]:
        """The checksum of the EMA as the transformer's weights, on every rank (a collective)."""
        with self._ema_in_params():
            return tensors_checksum(self.lora_state_dict())

    def load_ema_state_dict(self, state: dict) -> None:
        """Each rank keeps its shard of the EMA weights by name; the live weights and the master stay as they are."""
        ema = self._policy_ema()
        tensors = state["lora"]
        self._check_names(tensors)
        ema.weights.load_full([tensors[name] for name, _ in self.transformer.named_parameters()])
        ema.optimizer_steps = int(state["optimizer_steps"])

    # ------------------------------------------------------------------ weights, by the transformer's names
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().to("cpu", copy=True) for name, p in self.transformer.named_parameters()}

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each weight's shape by name (what a checkpoint must hold), without copying any weight."""
        return {name: tuple(p.shape) for name, p in self.transformer.named_parameters()}

    def load_lora_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        params = self._check_names(tensors)
        with torch.no_grad():
            for name, p in params.items():
                if tensors[name].shape != p.shape:
                    shape = tuple(tensors[name].shape)
                    raise ValueError(f"weight {name}: shape {shape}, the transformer's {tuple(p.shape)}")
                p.copy_(tensors[name])
        self.optimizer.reset_master_from_params()
        self.algorithm.attach(self)

    def _check_names(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.nn.Parameter]:
        params = dict(self.transformer.named_parameters())
        missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"the weights do not match the transformer: missing {missing[:5]}, unexpected {unexpected[:5]} "
                "(a LoRA checkpoint into full fine-tuning, or another model?)"
            )
        return params

    def lora_matches_rank0(self) -> bool:
        """Whether every weight of this rank is bitwise rank 0's (a collective: every rank calls it), one weight
        at a time so the comparison needs no second copy of the model."""
        same = True
        with torch.no_grad():
            for p in self.trainable:
                same &= bool(torch.equal(p, self.grad_sync.broadcast_(p.detach().clone())))
        return same

    # ------------------------------------------------------------------ the step
    def _prepare_grads(self) -> None:
        """Nothing: the weights keep no ``.grad``; each backward reduces theirs into the optimizer's shard."""

    def _backward(self, loss: torch.Tensor) -> None:
        self.optimizer.backward(loss)

    def _backwards_per_step(self, plan: list) -> int:
        """The most micro-batches (backwards) any rank runs per optimizer step: every backward reduce-scatters the
        gradients, so a rank with fewer pads its count with zero gradients. One all-reduce of the counts."""
        if self.grad_sync.world_size == 1:
            return len(plan)
        counts = torch.zeros(self.grad_sync.world_size, dtype=torch.float32, device=self.device)
        counts[self.grad_sync.rank] = len(plan)
        self.grad_sync.all_reduce_(counts)
        return int(counts.max().item())

    def _reduce_and_clip(self, bad: torch.Tensor) -> float:
        self.optimizer.pad_backwards(self._step_backwards)
        norm, bad_count = self.optimizer.reduce_and_clip(bad, self.config.grad_clip)
        if bad_count > 0 or not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(
                f"non-finite log-probs/KL ({int(bad_count)} values) or gradient norm ({norm}); step refused, "
                "weights unchanged"
            )
        return norm

    def _after_optimizer_step(self) -> None:
        self.sync_s += self.optimizer.last_sync_s
        self.step_s += self.optimizer.last_step_s
        super()._after_optimizer_step()

    def _update(self, ctx: UpdateContext, plan: list, num_terms: int) -> dict[str, float]:
        self.sync_s = self.step_s = 0.0
        # The ranks' collectives start here (and go on in every backward): an out-of-memory error past this point
        # cannot be retried by one rank alone.
        self._all_reduce_started = self.grad_sync.world_size > 1
        self._step_backwards = self._backwards_per_step(plan)
        metrics = super()._update(ctx, plan, num_terms)
        # The all-gather of the updated shards into the weights the engine serves, summed over the epochs.
        metrics["actor/weight_sync_s"] = self.sync_s
        # AdamW's step over the shard before it (with the offload: on the host, the pieces' copies included).
        metrics["actor/optimizer_step_s"] = self.step_s
        return metrics


def make_actor(model: ModelConfig, actor: ActorConfig, rollout: Any, **kwargs: Any) -> DiffusionLoRAActor:
    """The actor ``model.lora_rank`` asks for: full fine-tuning at 0, else the LoRA actor."""
    cls = DiffusionFullActor if model.lora is None else DiffusionLoRAActor
    return cls(model, actor, rollout, **kwargs)
