"""An actor rank that lives beside an engine, in the process that holds the engine's weights (the hybrid engine).

Both engines host one: the diffusers engine in its server actor, the vllm-omni engine inside vllm-omni's
diffusion worker. Its verbs take and return plain data (tensors, dicts, numbers) so the vllm-omni engine can
pass them through files; the trained adapter is the one the engine serves, so a weight sync is a comparison
(every rank's adapter against rank 0's), not a copy.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from verl_omni.config.actor import ActorConfig
from verl_omni.config.base import build
from verl_omni.config.model import ModelConfig
from verl_omni.config.rollout import RolloutConfig
from verl_omni.core.weights_file import write_safetensors_file
from verl_omni.workers.full_actor import make_actor
from verl_omni.workers.full_weights import read_shard_file
from verl_omni.workers.grad_sync import LoRAGradSync
from verl_omni.workers.text_encoder_offload import (
    PoolSegments,
    TextEncoderOffload,
    no_offload_metrics,
    offload_enabled,
)
from verl_omni.workers.train_batch import TrainBatch

# What the driver may call on a colocated rank (through ``DiffusionEngine.actor_call``).
ACTOR_VERBS = (
    "update",
    "lora_state_dict",
    "load_lora_state_dict",
    "optimizer_state_dict",
    "load_optimizer_state_dict",
    "save_optimizer_shard",
    "load_optimizer_shard",
    "save_weights_file",
    "load_weights_file",
    "weight_shapes",
    "lora_checksum",
    "lora_matches_rank0",
    "swap_in_ema",
    "swap_out_ema",
    "ema_state_dict",
    "load_ema_state_dict",
    "ema_checksum",
    "swap_in_rollout_weights",
    "swap_out_rollout_weights",
)


class ColocatedActorRank:
    def __init__(
        self,
        pipe: Any,
        model: Any,
        actor: Any,
        rollout: Any,
        rank: int,
        world_size: int,
        address: Optional[tuple[str, int]],
        device: str,
        lora_seed: int,
        algorithm: Any = None,
        weight_pool: Optional[PoolSegments] = None,
    ):
        """``model`` / ``actor`` / ``rollout`` / ``algorithm``: config sections or their plain dicts (they cross
        processes; no ``algorithm``: the default one); ``lora_seed``: every rank starts from the same adapter.
        ``weight_pool``: the engine's own memory pool holding the pipeline's weights, if any (vllm-omni's CuMem
        pool): text encoders offloaded for the update leave it by whole segments."""
        model, actor, rollout = build(ModelConfig, model), build(ActorConfig, actor), build(RolloutConfig, rollout)
        device = torch.device(device)
        if device.type == "cuda":
            if device.index is None:  # torch.cuda.set_device needs an index ("cuda" alone: the current device)
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)
        self.rank = rank
        self.actor = make_actor(  # lora_rank=0: full fine-tuning of the engine's own weights
            model,
            actor,
            rollout,
            pipe=pipe,
            device=str(device),
            lora_seed=lora_seed,
            grad_sync=LoRAGradSync(rank, world_size, address, device),
            algorithm=algorithm,
        )
        encoders = pipe.text_encoder_components() if offload_enabled(model.text_encoder_offload, device) else {}
        for encoder in encoders.values():
            encoder.requires_grad_(False)  # never trained: their host copies stay valid from one update to the next
        self.text_encoders = TextEncoderOffload(encoders, pool=weight_pool) if encoders else None

    def call(self, verb: str, *args: Any) -> Any:
        if verb not in ACTOR_VERBS:
            raise ValueError(f"unknown actor verb {verb!r}; allowed: {ACTOR_VERBS}")
        return getattr(self, verb)(*args)

    def update(self, batch: dict, num_terms: int) -> dict[str, float]:
        """One update; the text encoders (``model.text_encoder_offload``) are off the device during it and back
        when it returns. Adds ``actor/text_encoder_offload_s`` (seconds moving them off and back),
        ``actor/text_encoder_offloaded_gb`` and ``actor/text_encoder_kept_gb`` (what stayed: pool segments shared
        with other weights; both 0 when off)."""
        batch = TrainBatch.from_dict(batch)
        if self.text_encoders is None:
            metrics = self.actor.update_batch(batch, num_terms)
            moved = no_offload_metrics()
        else:
            with self.text_encoders.offloaded_during() as moved:
                metrics = self.actor.update_batch(batch, num_terms)
        return {**metrics, **{f"actor/{name}": value for name, value in moved.items()}}

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return self.actor.lora_state_dict()

    def load_lora_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.actor.load_lora_state_dict(tensors)

    def optimizer_state_dict(self) -> dict:
        return self.actor.optimizer_state_dict()

    def load_optimizer_state_dict(self, state: dict) -> None:
        self.actor.load_optimizer_state_dict(state)

    # Full fine-tuning's checkpoints: each rank writes and reads its own optimizer shard (a file in the checkpoint).
    def save_optimizer_shard(self, path: str) -> None:
        with open(path, "wb") as f:  # Python's open(): a full disk raises OSError(ENOSPC)
            torch.save(self.actor.optimizer_state_dict(), f)

    def load_optimizer_shard(self, path: str) -> None:
        self.actor.load_optimizer_state_dict(read_shard_file(path))

    # ... and rank 0 writes the weights file, which every rank reads back on resume (no weights through the driver).
    def save_weights_file(self, path: str) -> tuple[str, int]:
        """The weights into ``path`` (safetensors); (sha256, size in bytes) for the checkpoint's meta."""
        return write_safetensors_file(path, self.actor.lora_state_dict())

    def load_weights_file(self, path: str) -> None:
        """The weights from ``path`` (a checkpoint's file, verified by the driver before this is called)."""
        from safetensors.torch import load_file

        self.load_lora_state_dict(load_file(path))

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.actor.weight_shapes()

    def lora_checksum(self) -> str:
        return self.actor.lora_checksum()

    def lora_matches_rank0(self) -> bool:
        return self.actor.lora_matches_rank0()

    # The policy EMA: swapped into the adapter the engine serves (validation), saved and restored (checkpoints).
    def swap_in_ema(self) -> None:
        self.actor.swap_in_ema()

    def swap_out_ema(self) -> None:
        self.actor.swap_out_ema()

    def ema_state_dict(self) -> dict:
        return self.actor.ema_state_dict()

    def load_ema_state_dict(self, state: dict) -> None:
        self.actor.load_ema_state_dict(state)

    def ema_checksum(self) -> str:
        return self.actor.ema_checksum()

    # The algorithm's rollout weights (e.g. DiffusionNFT's old policy): in the adapter the engine serves during a
    # training rollout, the trained values back after it.
    def swap_in_rollout_weights(self) -> None:
        self.actor.swap_in_rollout_weights()

    def swap_out_rollout_weights(self) -> None:
        self.actor.swap_out_rollout_weights()
