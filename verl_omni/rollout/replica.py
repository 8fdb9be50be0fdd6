"""Rollout replicas registered in verl's ``RolloutReplicaRegistry`` as ``vllm_omni`` and ``diffusers``.

A replica is one engine server (one Ray actor, one device). verl's own replicas place their servers on GPU
resource pools; a diffusion replica places its server actor itself (a GPU when the rollout device is
cuda, none on CPU) so the same code runs on a laptop and on a GPU node.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import ray
from verl.workers.rollout.replica import RolloutMode, RolloutReplica

from verl_omni.config.base import build
from verl_omni.config.model import ModelConfig
from verl_omni.config.rollout import RolloutConfig
from verl_omni.rewards.model_actor import COLOCATED_GPU_SHARE
from verl_omni.rollout.server import DiffusionHttpServer

logger = logging.getLogger(__name__)


class DiffusionReplica(RolloutReplica):
    """One diffusion engine server. ``engine_name`` picks the engine behind the seam."""

    engine_name = "diffusers"

    def __init__(
        self,
        replica_rank: int,
        config: Any,
        model_config: Any,
        gpus_per_node: int = 1,
        is_reward_model: bool = False,
        is_teacher_model: bool = False,
        name_suffix: str = "",
    ) -> None:
        # verl's base __init__ converts ``config`` into its LLM RolloutConfig; ours is a diffusion config.
        self.replica_rank = replica_rank
        self.config = build(RolloutConfig, config)
        self.model_config = build(ModelConfig, model_config)
        self.world_size = 1
        self.gpus_per_node = gpus_per_node
        self.gpus_per_replica_node = 1
        self.nnodes = 1
        self.is_reward_model = is_reward_model
        self.is_teacher_model = is_teacher_model
        self.name_suffix = f"_{name_suffix}" if name_suffix else ""
        self.rollout_mode: Optional[RolloutMode] = None
        self.workers = []
        self.resource_pool = None
        self.bundle_indices = []
        self.servers = []
        self._server_address = None
        self._server_handle = None
        self.placement = None  # (placement group, bundle index) of this replica's GPU, set by the server manager

    async def init_standalone(self):
        self.rollout_mode = RolloutMode.STANDALONE
        await self.launch_servers()

    async def init_colocated(self, resource_pool=None):
        # Same process layout as standalone: the trainer sleeps/wakes the engine around each update.
        self.rollout_mode = RolloutMode.COLOCATED
        await self.launch_servers()

    async def init_hybrid(self, worker_group):
        raise NotImplementedError(
            f"rollout.name={self.engine_name!r} runs its engine in its own server actor; "
            "use the FlowGRPO trainer (verl_omni.trainer.main_flowgrpo), which launches replicas standalone"
        )

    def rollout_worker_use_gpu(self) -> bool:
        return self.config.on_cuda

    async def launch_servers(self):
        options = {
            "name": f"verl_omni_{self.engine_name}_server_{self.replica_rank}{self.name_suffix}_{id(self):x}",
            "max_concurrency": self.max_concurrency,
            # Engines run in-process threads: the actor reserves a GPU if it uses one, no CPU slot
            # (a 2-core machine would otherwise deadlock trainer + servers + agent workers).
            "num_cpus": 0,
            "num_gpus": 1 if self.rollout_worker_use_gpu() else 0,
        }
        if self.placement is not None:
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            # The rest of the bundle's GPU is for reward models colocated on this card (Ray still gives the
            # replica the bundle's GPU: CUDA_VISIBLE_DEVICES is set for fractional requests too).
            options["num_gpus"] = 1 - COLOCATED_GPU_SHARE if options["num_gpus"] else 0
            group, bundle = self.placement
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=bundle
            )
        if self.config.name != self.engine_name:
            raise ValueError(
                f"actor_rollout_ref.rollout.name={self.config.name!r} given to the {self.engine_name!r} replica class"
            )
        server = (
            ray.remote(DiffusionHttpServer)
            .options(**options)
            .remote(model=self.model_config, rollout=self.config, replica_rank=self.replica_rank)
        )
        host, port = await server.launch_server.remote()
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"{host}:{port}"

    @property
    def max_concurrency(self) -> int:
        return 64

    # ---- verbs beyond verl's base replica (which already fans out sleep / wake_up / abort)
    async def update_lora(self, tensors: dict) -> str:
        return await self._server_handle.update_lora.remote(tensors)

    async def lora_checksum(self) -> Optional[str]:
        return await self._server_handle.lora_checksum.remote()

    async def get_stats(self) -> dict:
        return await self._server_handle.get_stats.remote()

    async def shutdown(self) -> None:
        for server in self.servers:
            try:
                await server.shutdown.remote()
            finally:
                ray.kill(server)
        self.servers = []


class VllmOmniReplica(DiffusionReplica):
    engine_name = "vllm_omni"


class DiffusersReplica(DiffusionReplica):
    engine_name = "diffusers"
