"""The actor of the hybrid engine, seen from the driver: one rank beside each replica's engine.

``actor_rollout_ref.hybrid_engine=true``: replica k's process (the diffusers server actor, or vllm-omni's worker)
also hosts actor rank k, training the engine's own adapter on the engine's own weights — so every GPU rolls out,
then every GPU trains, and the frozen base weights exist once per GPU. The driver splits each step's rows into
W shards of about equal transitions, the ranks all-reduce their LoRA gradients, and every rank takes the same
optimizer step; the engines then serve the new adapter as it is. This class has the interface the trainer uses
on ``DiffusionLoRAActor`` (update, LoRA and optimizer state).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import ray
import torch

from verl_omni.config.actor import ActorConfig
from verl_omni.config.algorithm import make_algorithm
from verl_omni.core.errors import assert_finite
from verl_omni.pipelines import get_pipeline_class
from verl_omni.rollout.server_manager import DiffusionServerManager
from verl_omni.trainer.checkpoint import SHARD_FILES
from verl_omni.workers.full_weights import is_shard_state
from verl_omni.workers.rank_group import OptimizerHandle, gather_ranks
from verl_omni.workers.train_batch import TrainBatch

# Each rank's own figure for these (the rest of the update's metrics are all-reduced): the actor's metric name ->
# the step's metric name, "/rank<k>" appended.
_PER_RANK_METRICS = {
    "busy_s": "timing/update_busy_s",
    "compute_s": "timing/update_compute_s",
    "gc_s": "timing/update_gc_s",
    "cuda_mallocs": "perf/update_cuda_mallocs",
    "gc_frozen_objects": "perf/update_gc_frozen_objects",
    "sm_clock_mhz": "perf/update_sm_clock_mhz",
    "sm_clock_min_mhz": "perf/update_sm_clock_min_mhz",
    "peak_allocated_gb": "perf/update_peak_allocated_gb",
    "peak_reserved_gb": "perf/update_peak_reserved_gb",
    "rollout_peak_allocated_gb": "perf/rollout_peak_allocated_gb",
    "rollout_peak_reserved_gb": "perf/rollout_peak_reserved_gb",
    "text_encoder_offload_s": "timing/update_text_encoder_offload_s",
    "text_encoder_offloaded_gb": "perf/update_text_encoder_offloaded_gb",
    "text_encoder_kept_gb": "perf/update_text_encoder_kept_gb",
}


class ColocatedActorGroup:
    def __init__(
        self,
        servers: DiffusionServerManager,
        actor: ActorConfig,
        lora_seed: int,
        algorithm: Any = None,
        *,
        pipeline: str,
        full_weights: bool = False,
    ):
        """``algorithm``: the ``algorithm`` config section (None: the default algorithm); every rank builds its own.
        ``pipeline``: the model's family (``actor_rollout_ref.model.pipeline``; the driver's copy of the algorithm
        resolves its settings alike)."""
        self.servers = [replica.server_handle for replica in servers.replicas]
        self.algorithm = make_algorithm(algorithm, actor=actor, pipeline=get_pipeline_class(pipeline))
        self.world_size = len(self.servers)
        self.full_weights = full_weights  # model.lora_rank=0: each rank holds its own optimizer shard
        address = ray.get(self.servers[0].rendezvous_address.remote()) if self.world_size > 1 else None
        # Every rank at once: each waits in the rendezvous for the others.
        gather_ranks(
            [
                s.init_actor.remote(actor, rank, self.world_size, address, lora_seed, algorithm)
                for rank, s in enumerate(self.servers)
            ]
        )
        self.optimizer = OptimizerHandle(self)

    def _all(self, verb: str, *args: Any) -> list:
        return gather_ranks([s.actor_call.remote(verb, *args) for s in self.servers])

    def update(self, data: Any, advantages: torch.Tensor) -> dict[str, float]:
        batch = TrainBatch.from_data_proto(data, advantages)
        # Data checks here, before any rank starts: they name the batch's rows, and no rank is left waiting in the
        # all-reduce for one that refused its shard. (Non-finite model outputs are agreed on inside the all-reduce.)
        for name in self.algorithm.checked_fields:
            assert_finite(name, batch.tensors[name])
        batch.row_settings()  # every row carries one set of sampling settings (ValueError naming the field)
        num_terms = self.algorithm.num_terms(batch)
        refs = [
            s.actor_call.remote("update", shard.as_dict(), num_terms)
            for s, shard in zip(self.servers, batch.shards(self.world_size), strict=True)
        ]
        per_rank = gather_ranks(refs)
        metrics = dict(per_rank[0])  # all-reduced: the same on every rank, but for each rank's own busy time
        # Per rank: busy = compute + waiting for the slowest rank; the garbage collector's seconds, the allocator's
        # cudaMalloc calls, the GPU's SM clock and the allocator's peaks (workers/update_probe.py).
        for name, step_name in _PER_RANK_METRICS.items():
            metrics.pop(f"actor/{name}", None)
            metrics.update({f"{step_name}/rank{k}": m[f"actor/{name}"] for k, m in enumerate(per_rank)})
        return metrics

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return ray.get(self.servers[0].actor_call.remote("lora_state_dict"))

    def load_lora_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self._all("load_lora_state_dict", tensors)

    def optimizer_state_dict(self) -> dict:
        state = ray.get(self.servers[0].actor_call.remote("optimizer_state_dict"))
        if is_shard_state(state):  # full fine-tuning: each rank holds its own shard of the AdamW state
            rest = gather_ranks([s.actor_call.remote("optimizer_state_dict") for s in self.servers[1:]])
            return {"full_weights_shards": [state, *rest]}
        return state

    def write_optimizer_shards(self, folder: str) -> Optional[list[str]]:
        """Full fine-tuning: every rank writes its optimizer shard into ``folder``; the file names (else None)."""
        if not self.full_weights:
            return None
        names = [f"optim_shard_rank{k}.pt" for k in range(self.world_size)]
        gather_ranks(
            [
                s.actor_call.remote("save_optimizer_shard", os.path.join(folder, n))
                for s, n in zip(self.servers, names, strict=True)
            ]
        )
        return names

    # Full fine-tuning's weights: a file rank 0 writes and every rank reads, in the (shared) checkpoint directory.
    def write_weights_file(self, path: str) -> tuple[str, int]:
        """Rank 0 writes the weights into ``path``; only (sha256, size in bytes) comes back to the driver."""
        return ray.get(self.servers[0].actor_call.remote("save_weights_file", path))

    def load_weights_file(self, path: str) -> None:
        """Every rank reads the (verified) weights file itself."""
        self._all("load_weights_file", path)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes a checkpoint's weights must have, by name (no weights cross to the driver)."""
        return ray.get(self.servers[0].actor_call.remote("weight_shapes"))

    def load_optimizer_state_dict(self, state: dict) -> None:
        if SHARD_FILES in state:  # a checkpoint's shard files, verified: each rank reads its own
            self._load_shards("load_optimizer_shard", state[SHARD_FILES])
            return
        shards = state.get("full_weights_shards")
        if shards is None:
            self._all("load_optimizer_state_dict", state)
            return
        self._load_shards("load_optimizer_state_dict", shards)

    def _load_shards(self, verb: str, shards: list) -> None:
        if len(shards) != self.world_size:
            raise ValueError(
                f"the checkpoint's optimizer state is sharded over {len(shards)} ranks, this run has "
                f"{self.world_size}: resume full fine-tuning with the same trainer.n_gpus_per_node x trainer.nnodes"
            )
        pairs = zip(self.servers, shards, strict=True)
        gather_ranks([s.actor_call.remote(verb, shard) for s, shard in pairs])

    def lora_checksums(self) -> list[str]:
        """The adapter each rank trains (= the one its engine serves)."""
        return self._all("lora_checksum")

    def lora_matches_rank0(self) -> list[bool]:
        """Per rank: whether the adapter it trains (= the one its engine serves) is bitwise rank 0's."""
        return self._all("lora_matches_rank0")

    # The policy EMA: every rank swaps it into the adapter its engine serves, and back.
    def swap_in_ema(self) -> None:
        self._all("swap_in_ema")

    def swap_out_ema(self) -> None:
        self._all("swap_out_ema")

    def ema_state_dict(self) -> dict:
        if self.full_weights:  # each rank holds a shard of the EMA: every rank swaps it in, rank 0 returns it
            return self._all("ema_state_dict")[0]
        return ray.get(self.servers[0].actor_call.remote("ema_state_dict"))

    def load_ema_state_dict(self, state: dict) -> None:
        self._all("load_ema_state_dict", state)

    def ema_checksums(self) -> list[str]:
        return self._all("ema_checksum")

    # The algorithm's rollout weights: every rank swaps them into the adapter its engine serves, and back.
    def swap_in_rollout_weights(self) -> None:
        self._all("swap_in_rollout_weights")

    def swap_out_rollout_weights(self) -> None:
        self._all("swap_out_rollout_weights")

    def shutdown(self) -> None:
        """The ranks live in the replicas: they go with them."""
