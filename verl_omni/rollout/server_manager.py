"""Launch diffusion replicas and put them behind verl's global load balancer.

The replica class comes from verl's ``RolloutReplicaRegistry`` by ``rollout.name``; requests are routed by
verl's ``GlobalRequestLoadBalancer`` (least in-flight, sticky by request id), so groups spread over all
replicas exactly as verl spreads LLM requests.
"""

from __future__ import annotations

import asyncio
import logging

import ray
from verl.workers.rollout.replica import RolloutReplicaRegistry
from verl.workers.rollout.router import get_router_handle

from verl_omni.config.model import ModelConfig
from verl_omni.config.rollout import RolloutConfig

logger = logging.getLogger(__name__)


class DiffusionServerManager:
    """The replicas of one run: launched together, reached together (sleep, wake, LoRA, stats, shutdown)."""

    def __init__(self, rollout: RolloutConfig, model: ModelConfig, num_replicas: int):
        self.rollout = rollout
        self.model_config = model
        self.num_replicas = num_replicas
        self.replicas = []
        self.load_balancer = None
        self.placement_group = None  # on GPUs: one bundle per replica (reward models may share them)

    async def start(self) -> DiffusionServerManager:
        replica_cls = RolloutReplicaRegistry.get(self.rollout.name)
        self.replicas = [
            replica_cls(replica_rank=rank, config=self.rollout, model_config=self.model_config)
            for rank in range(self.num_replicas)
        ]
        if self.rollout.on_cuda:
            self.placement_group = _gpu_placement_group(self.num_replicas)
            for rank, replica in enumerate(self.replicas):
                replica.placement = (self.placement_group, rank)
        await asyncio.gather(*[r.init_standalone() for r in self.replicas])
        servers = {r.server_address: r.server_handle for r in self.replicas}
        self.load_balancer = get_router_handle(servers=servers)
        return self

    @property
    def addresses(self) -> list[str]:
        return [r.server_address for r in self.replicas]

    async def update_lora(self, tensors: dict) -> list[str]:
        """Send LoRA tensors to every replica (in memory); returns each replica's checksum."""
        return list(await asyncio.gather(*[r.update_lora(tensors) for r in self.replicas]))

    async def lora_checksums(self) -> list[str]:
        return list(await asyncio.gather(*[r.lora_checksum() for r in self.replicas]))

    async def sleep(self) -> None:
        await asyncio.gather(*[r.sleep() for r in self.replicas])

    async def wake_up(self) -> None:
        await asyncio.gather(*[r.wake_up() for r in self.replicas])

    async def stats(self) -> list[dict]:
        return list(await asyncio.gather(*[r.get_stats() for r in self.replicas]))

    async def reset_stats(self) -> None:
        await asyncio.gather(*[r.server_handle.reset_stats.remote() for r in self.replicas])

    async def shutdown(self) -> None:
        results = await asyncio.gather(*[r.shutdown() for r in self.replicas], return_exceptions=True)
        for replica, result in zip(self.replicas, results, strict=False):
            if isinstance(result, BaseException):  # keep going (the others still shut down), but say so
                logger.warning("replica %d did not shut down cleanly: %r", replica.replica_rank, result)
        if self.load_balancer is not None:
            ray.kill(self.load_balancer)
            self.load_balancer = None
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None


def _gpu_placement_group(num_gpus: int, timeout_s: float = 120.0):
    """One bundle per GPU (replica k on bundle k), packed onto as few nodes as the cluster allows, as verl places
    its workers; fails naming the keys when the Ray cluster cannot hold it."""
    from ray.util.placement_group import placement_group

    pg = placement_group([{"GPU": 1}] * num_gpus, strategy="PACK", name=f"verl_omni_replicas_{id(object()):x}")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(pg)
        raise RuntimeError(
            f"the Ray cluster cannot place {num_gpus} replicas of one GPU each within {timeout_s:.0f} s (it has "
            f"{ray.cluster_resources().get('GPU', 0):g} GPUs): check trainer.n_gpus_per_node x trainer.nnodes "
            "(hybrid engine) or actor_rollout_ref.rollout.num_replicas (split), and that every node joined the cluster"
        )
    return pg
