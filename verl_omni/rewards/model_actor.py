"""Reward models (pickscore, clipscore, ...) served once per entry from a Ray actor that may hold a GPU.

A RewardPool starts one ``RewardModelActor`` per model entry of ``reward.rewards`` and hands its CPU workers a
``RemoteModelReward`` client instead of the model, so N workers share one copy of the weights. The actor asks Ray
for the entry's ``num_gpus``: a fraction to sit beside other GPU work on one card (Ray packs fractional requests
onto one GPU; the other tenants must ask for fractions too), or 1 for its own GPU. ``offload()`` / ``onload()``
move the weights to the CPU and back around the actor's update when they share a card.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import ray

from verl_omni.rewards.registry import RewardSampleError, build_reward_fn, get_reward_factory


def is_model_entry(entry: Mapping[str, Any]) -> bool:
    factory = get_reward_factory(entry.get("name", ""))
    return bool(factory and factory.model)


class RewardModelActor:
    """Holds the reward function built from one model entry; scores whole groups in one batched call."""

    def __init__(self, entry: Mapping[str, Any]):
        self.name = entry["name"]
        self.fn = build_reward_fn(entry)

    def ready(self) -> dict:
        return {"name": self.name, "pid": os.getpid(), "device": str(getattr(self.fn, "device", "cpu")),
                "gpu_ids": ray.get_gpu_ids()}

    def score(self, images: list, prompts: list[str], metadata: list[dict]) -> list[float]:
        return [float(s) for s in self.fn(images, prompts, metadata)]

    def offload(self) -> None:
        self._placement("offload")

    def onload(self) -> None:
        self._placement("onload")

    def _placement(self, method: str) -> None:
        move = getattr(self.fn, method, None)
        if move is None:
            raise TypeError(f"reward {self.name!r} ({type(self.fn).__name__}) has no {method}()")
        move()
        if method == "offload":
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the freed blocks back to the process that trains next


def start_reward_model_actor(entry: Mapping[str, Any], num_gpus: Optional[float] = None, num_cpus: float = 1):
    """A ``RewardModelActor`` for ``entry`` with ``entry['num_gpus']`` GPUs (default: 1 if the Ray cluster has a GPU,
    else 0). Returns its handle once the model is loaded (a loading error raises here, not at the first score)."""
    if num_gpus is None:
        num_gpus = entry.get("num_gpus")
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    if not (isinstance(num_gpus, (int, float)) and 0 <= num_gpus):
        raise ValueError(f"reward {entry['name']!r}: num_gpus={num_gpus!r} must be a number >= 0 (a fraction shares a GPU)")
    if str(entry.get("device", "auto")).startswith("cuda") and num_gpus == 0:
        raise ValueError(f"reward {entry['name']!r}: device={entry['device']!r} needs num_gpus > 0 for its actor")
    handle = ray.remote(RewardModelActor).options(num_gpus=num_gpus, num_cpus=num_cpus).remote(dict(entry))
    ray.get(handle.ready.remote())
    return handle


class RemoteModelReward:
    """Reward function that forwards a batch to a ``RewardModelActor`` (picklable: a name and an actor handle)."""

    def __init__(self, name: str, handle):
        self.name, self.handle = name, handle

    def __call__(self, images: list, prompts: list[str], metadata: Optional[list[dict]] = None) -> list[float]:
        metadata = metadata if metadata is not None else [{} for _ in images]
        try:
            return ray.get(self.handle.score.remote(list(images), list(prompts), list(metadata)))
        except ray.exceptions.RayActorError as exc:
            # Not the samples' fault: say so for all of them rather than re-scoring one by one against a dead actor.
            raise RewardSampleError(range(len(images)), f"reward model actor {self.name!r} died: {exc}") from exc
        except ray.exceptions.RayTaskError as exc:
            raise exc.cause if isinstance(exc.cause, Exception) else exc
