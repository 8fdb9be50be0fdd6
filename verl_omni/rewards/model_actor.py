"""Reward models (pickscore, clipscore, ...) served once per entry from a Ray actor that may hold a GPU.

A RewardPool starts one ``RewardModelActor`` per model entry of ``reward.rewards`` and hands its CPU workers a
``RemoteModelReward`` client instead of the model, so N workers share one copy of the weights, and the actor
merges the pieces they send at the same time into one batched call. The actor asks Ray
for the entry's ``num_gpus``: a fraction to sit beside other GPU work on one card (Ray packs fractional requests
onto one GPU; the other tenants must ask for fractions too), or 1 for its own GPU. ``offload()`` / ``onload()``
move the weights to the CPU and back around the actor's update when they share a card.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, Optional

import ray

from verl_omni.rewards.registry import RewardSampleError, build_reward_fn, get_reward_factory

# A replica placed in a GPU bundle asks Ray for 1 - COLOCATED_GPU_SHARE of it, so that reward models can sit on
# the same card (Ray shares a GPU only among fractional requests). The share is a scheduling label: memory is
# shared as it comes (a CLIP-H scorer needs ~2 GB next to the hybrid engine's ~57 GB on an 80 GB card).
COLOCATED_GPU_SHARE = 0.01


def free_resource(name: str, needed: float, grace_s: float = 10.0) -> float:
    """The Ray cluster's free amount of ``name`` ("CPU", "GPU"), waiting up to ``grace_s`` for ``needed``: Ray frees
    what killed actors held (an earlier pool's, a trainer's that just shut down) a moment after ``ray.kill``."""
    deadline = time.monotonic() + grace_s
    while True:
        free = ray.available_resources().get(name, 0)
        if free >= needed or time.monotonic() > deadline:
            return free
        time.sleep(0.2)


def is_model_entry(entry: Mapping[str, Any]) -> bool:
    factory = get_reward_factory(entry.get("name", ""))
    return bool(factory and factory.model)


class RewardModelActor:
    """Holds the reward function built from one model entry and merges concurrent requests into one call.

    A RewardPool splits groups over its workers, so requests arrive as small pieces from many workers at once;
    scored one by one they would run the GPU at batch 1-2. Requests that are waiting when the model becomes free
    are scored together (the scorer chunks by its ``batch_size``) and the scores handed back to each request. If
    a merged call raises, each request is scored alone so that only the faulty one fails.
    """

    def __init__(self, entry: Mapping[str, Any]):
        self.name = entry["name"]
        self.fn = build_reward_fn(entry)
        self._waiting: list[tuple[list, list, list, asyncio.Future]] = []
        self._model_busy: Optional[asyncio.Lock] = None  # created on the actor's event loop
        self.calls: list[int] = []  # images per call of the model, for tests and metrics

    def ready(self) -> dict:
        return {
            "name": self.name,
            "pid": os.getpid(),
            "device": str(getattr(self.fn, "device", "cpu")),
            "gpu_ids": ray.get_gpu_ids(),
        }

    async def score(self, images: list, prompts: list[str], metadata: list[dict]) -> list[float]:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((list(images), list(prompts), list(metadata), future))
        async with self._lock():
            if self._waiting:  # an earlier holder of the lock may already have scored this request
                requests, self._waiting = self._waiting, []
                await self._score_merged(requests)
        return await future

    async def _score_merged(self, requests) -> None:
        images = [im for r in requests for im in r[0]]
        prompts = [p for r in requests for p in r[1]]
        metadata = [m for r in requests for m in r[2]]
        try:
            scores = await self._call(images, prompts, metadata)
        except Exception:
            if len(requests) == 1:
                raise_into(requests[0][3])
                return
            for request in requests:  # find the faulty request: the others still get their scores
                try:
                    request[3].set_result(await self._call(*request[:3]))
                except Exception:
                    raise_into(request[3])
            return
        start = 0
        for request in requests:
            request[3].set_result(scores[start : start + len(request[0])])
            start += len(request[0])

    async def _call(self, images, prompts, metadata) -> list[float]:
        # In a thread: the event loop keeps accepting requests (to merge into the next call) while the model runs.
        self.calls.append(len(images))
        scores = await asyncio.to_thread(self.fn, images, prompts, metadata)
        return [float(s) for s in scores]

    def _lock(self) -> asyncio.Lock:
        if self._model_busy is None:
            self._model_busy = asyncio.Lock()
        return self._model_busy

    def call_sizes(self) -> list[int]:
        return list(self.calls)

    async def offload(self) -> None:
        async with self._lock():  # never move the weights under a running forward
            self._placement("offload")

    async def onload(self) -> None:
        async with self._lock():
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


def raise_into(future: asyncio.Future) -> None:
    """Hand the exception being handled to ``future`` (the request that owns it)."""
    future.set_exception(sys.exc_info()[1])


def start_reward_model_actor(
    entry: Mapping[str, Any], num_gpus: Optional[float] = None, num_cpus: float = 1, **ray_options: Any
):
    """A ``RewardModelActor`` for ``entry`` with ``entry['num_gpus']`` GPUs (default: 1 if the Ray cluster has a GPU,
    else 0). Returns its handle once the model is loaded (a loading error raises here, not at the first score).

    ``ray_options`` go to ``.options()``: e.g. ``scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)`` to sit
    in a replica's bundle with ``num_gpus=COLOCATED_GPU_SHARE`` (see :func:`colocated_options`)."""
    if num_gpus is None:
        num_gpus = entry.get("num_gpus")
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    if not (isinstance(num_gpus, (int, float)) and 0 <= num_gpus):
        raise ValueError(
            f"reward {entry['name']!r}: num_gpus={num_gpus!r} must be a number >= 0 (a fraction shares a GPU)"
        )
    # Outside a placement group, Ray would leave an actor it cannot place pending, and the pool would wait for it
    # without a word (inside one, the bundle already holds the GPU).
    outside = num_gpus > 0 and "scheduling_strategy" not in ray_options
    free_gpus = free_resource("GPU", num_gpus) if outside else 0
    if outside and num_gpus > free_gpus + 1e-9:
        raise ValueError(
            f"reward {entry['name']!r}: num_gpus={num_gpus:g} but the Ray cluster has {free_gpus:g} GPU(s) free "
            f"(the rollout replicas hold theirs): leave num_gpus unset to share a replica's GPU, or give the "
            f"reward model a GPU of its own outside trainer.n_gpus_per_node"
        )
    if str(entry.get("device", "auto")).startswith("cuda") and num_gpus == 0:
        raise ValueError(f"reward {entry['name']!r}: device={entry['device']!r} needs num_gpus > 0 for its actor")
    handle = (
        ray.remote(RewardModelActor).options(num_gpus=num_gpus, num_cpus=num_cpus, **ray_options).remote(dict(entry))
    )
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
        except ray.exceptions.RayTaskError as exc:  # the scorer raised: its own error, as if it ran here
            if isinstance(exc.cause, Exception):
                raise exc.cause from exc
            raise


def colocated_options(placement_group, bundle_index: int) -> dict[str, Any]:
    """Ray options that put a reward-model actor on the GPU of a replica's bundle, beside the replica."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {
        "num_gpus": COLOCATED_GPU_SHARE,
        "num_cpus": 0,  # the bundles hold GPUs only (and the model's work is on the GPU)
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=bundle_index
        ),
    }
