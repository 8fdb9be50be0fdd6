"""A pool of Ray reward workers: score each rollout group as soon as it exists, off the driver.

Each worker holds a ``RewardManager`` built from the ``reward`` config dict, so a group scored by the pool gets
exactly the scores (and errors) the manager gives in the driver. Model rewards (``pickscore``, ``clipscore``) are
loaded once, in a ``RewardModelActor`` per entry that may hold a GPU; workers call it (see model_actor.py).

    pool = RewardPool(reward_config, num_workers=default_num_reward_workers(os.cpu_count(), num_replicas=1,
                                                                           agent_loop_workers=1))
    futures = [pool.submit(images, prompts, metadata, sample_ids=rows) for each group as it returns]
    result = RewardPool.gather(futures)   # a RewardResult for all groups, in submission order
    pool.shutdown()

``submit`` returns a ``RewardFuture`` at once (``.result()`` blocks; ``await future`` inside an event loop, e.g. in
an agent-loop worker). A group is cut into up to ``num_workers`` pieces, each sent to the worker with the fewest
pieces in flight (round-robin on ties): the last group of a rollout is then scored by all workers together.
A raising reward raises ``RewardComputationError`` naming the reward, the sample (its ``sample_ids`` label, default
its index in the submitted group) and its prompt; a worker that dies raises ``RewardWorkerDiedError`` naming its
samples and prompts -- never a silent 0. Ray restarts a dead worker (``max_restarts``) and runs a group whose
worker died once more on the restarted one (``task_retries``; rewards are functions of their inputs, so a retry
cannot double-count): a passing kill costs time, not the step, while a group that kills its worker every time
fails with the error above.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import ray

from verl_omni.rewards.model_actor import (
    RemoteModelReward,
    colocated_options,
    free_resource,
    is_model_entry,
    start_reward_model_actor,
)
from verl_omni.rewards.registry import RewardComputationError, RewardManager, RewardResult

_OCR_THREADS_ENV = "VERL_OMNI_OCR_THREADS"  # read by verl_omni.rewards.ocr when it creates its engine


def default_num_reward_workers(
    cpu_cores: int, *, num_replicas: int, agent_loop_workers: int, cores_per_replica: int = 1, driver_cores: int = 1
) -> int:
    """Reward workers for a node: its cores minus those already busy, at least 1.

    Busy: ``cores_per_replica`` per rollout replica (a GPU replica's host process feeds its card: ~1 core; a CPU
    replica's engine wants several, pass them), one per agent-loop worker (they pack/unpack samples) and
    ``driver_cores`` for the trainer process. Ray requests of those actors are 0 CPUs, so this is not what
    ``ray.available_resources()`` shows: it is counted here from the numbers the config sets.
    """
    for key, value in (
        ("cpu_cores", cpu_cores),
        ("num_replicas", num_replicas),
        ("agent_loop_workers", agent_loop_workers),
        ("cores_per_replica", cores_per_replica),
        ("driver_cores", driver_cores),
    ):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"default_num_reward_workers: {key}={value!r} must be an int >= 0")
    return max(1, cpu_cores - num_replicas * cores_per_replica - agent_loop_workers - driver_cores)


def resolve_num_reward_workers(configured: Any, **node: int) -> int:
    """``reward.num_workers``: an int >= 1, or None / "auto" for :func:`default_num_reward_workers` (``node``)."""
    if configured is None or configured == "auto":
        return default_num_reward_workers(**node)
    if isinstance(configured, bool) or not isinstance(configured, int) or configured < 1:
        raise ValueError(
            f"reward.num_workers={configured!r} must be an int >= 1, or null / 'auto' for the node's free cores"
        )
    return configured


def split_bounds(size: int, pieces: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of at most ``pieces`` near-equal consecutive pieces: (16, 6) -> sizes 3, 3, 3, 3, 2, 2."""
    count = max(1, min(size, pieces))
    base, extra = divmod(size, count)
    bounds, start = [], 0
    for k in range(count):
        stop = start + base + (k < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


class RewardWorkerDiedError(RewardComputationError):
    """The worker process scoring a group died (killed, out of memory, a crash inside a native library)."""


class RewardWorker:
    """One Ray actor: a RewardManager, model rewards replaced by clients of their shared actors."""

    def __init__(self, reward_config: Mapping[str, Any], model_handles: Mapping[str, Any], threads: int):
        # Before any OCR engine exists: onnxruntime's default takes every core, and N workers would fight for them.
        os.environ[_OCR_THREADS_ENV] = str(threads)
        clients = {name: RemoteModelReward(name, handle) for name, handle in model_handles.items()}
        self.manager = RewardManager(reward_config, reward_fns=clients)

    def ready(self) -> int:
        return os.getpid()

    def score(self, images: list, prompts: list[str], metadata: list[dict], sample_ids: list) -> RewardResult:
        return self.manager(images, prompts, metadata, sample_ids=sample_ids)


@dataclass
class _Piece:
    """Consecutive samples of one group, sent to one worker."""

    ref: Any  # ray.ObjectRef of a RewardResult
    worker_index: int
    sample_ids: list
    prompts: list[str]


class RewardFuture:
    """The pending scores of one submitted group (possibly split over workers); errors name its samples."""

    def __init__(self, pieces: Sequence[_Piece]):
        self.pieces = list(pieces)

    @property
    def worker_indices(self) -> list[int]:
        return [piece.worker_index for piece in self.pieces]

    def done(self) -> bool:
        refs = [piece.ref for piece in self.pieces]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        return len(ready) == len(refs)

    def result(self, timeout: Optional[float] = None) -> RewardResult:
        results = []
        for piece in self.pieces:
            try:
                results.append(ray.get(piece.ref, timeout=timeout))
            except Exception as exc:
                raise _explain(exc, piece) from exc
        return RewardResult.concat(results)

    def __await__(self):
        return self._await().__await__()

    async def _await(self) -> RewardResult:
        results = []
        for piece in self.pieces:
            try:
                results.append(await piece.ref)
            except Exception as exc:
                raise _explain(exc, piece) from exc
        return RewardResult.concat(results)


def _explain(exc: Exception, piece: _Piece) -> Exception:
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, Exception):
        return exc.cause  # the manager's own error: it already names the reward, sample and prompt
    if isinstance(exc, ray.exceptions.RayActorError):
        prompts = "; ".join(repr(p[:60]) for p in piece.prompts[:3]) + (" ..." if len(piece.prompts) > 3 else "")
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return RewardWorkerDiedError(
            f"reward worker {piece.worker_index} died while scoring samples "
            f"{piece.sample_ids} (prompts {prompts}): {type(exc).__name__}: {first_line}"
        )
    return exc


class RewardPool:
    """``num_workers`` Ray actors scoring groups with the rewards of ``reward_config`` (see the module docstring).

    ``split_groups``: a group is cut into up to ``num_workers`` pieces of consecutive samples, each sent to the
    least-busy worker, so the rollout's last group is scored by every worker at once (whole, it would keep one
    worker busy for group_size x the per-image time after the rollout ends). Set False for a custom reward that
    must see a whole group in one call. Default (None): split when a reward runs in the workers; a config of
    model rewards only sends whole groups, because its workers only forward to the model actor, and one-image
    pieces become one-image GPU calls, many times slower than whole batches (``docs/benchmarks/rewards_scale.json``).
    ``threads_per_worker``: onnxruntime threads of each worker's OCR engine;
    keep ``num_workers x threads`` at or below the free cores. ``num_cpus_per_worker``: what each worker asks Ray
    for. ``max_restarts`` / ``task_retries``: Ray's restarts of a dead worker and re-runs of the piece it scored.
    ``model_actor_options``: extra Ray ``.options()`` of the reward-model actors (a placement-group strategy).
    ``colocate_models_with``: the replicas' GPU placement group (hybrid engine): model entries without ``num_gpus``
    sit in its bundles (entry k in bundle k mod bundles), beside the replicas; an entry with ``num_gpus`` asks Ray
    for GPUs of its own.
    """

    def __init__(
        self,
        reward_config: Mapping[str, Any],
        num_workers: int,
        *,
        split_groups: Optional[bool] = None,
        threads_per_worker: int = 1,
        num_cpus_per_worker: float = 1,
        max_restarts: int = 3,
        task_retries: int = 1,
        model_actor_options: Optional[Mapping[str, Any]] = None,
        colocate_models_with: Any = None,
    ):
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"reward.num_workers={num_workers!r} must be an int >= 1")
        if not isinstance(threads_per_worker, int) or threads_per_worker < 1:
            raise ValueError(f"threads_per_worker={threads_per_worker!r} must be an int >= 1")
        config = dict(reward_config)
        model_entries = [e for e in config.get("rewards") or [] if is_model_entry(e)]
        # Check the whole config here, in the driver, before starting anything (models are not loaded for this).
        checked = RewardManager(config, reward_fns={e["name"]: _not_called for e in model_entries})
        cpus = ray.cluster_resources().get("CPU", 0)
        if num_workers * num_cpus_per_worker > cpus:
            raise ValueError(
                f"reward.num_workers={num_workers} x {num_cpus_per_worker} CPU exceeds the Ray cluster's "
                f"{cpus:g} CPUs: lower reward.num_workers or start Ray with more CPUs"
            )
        # What is free now, model actors included: Ray would otherwise leave an actor pending, and the pool would
        # wait for it without a word.
        actor_options = [
            self._model_options(e, k, model_actor_options, colocate_models_with) for k, e in enumerate(model_entries)
        ]
        # In a placement group a model actor's CPU comes from its bundle, already reserved.
        model_cpus = sum(0 if "scheduling_strategy" in o else float(o.get("num_cpus", 1)) for o in actor_options)
        needed = num_workers * num_cpus_per_worker + model_cpus
        free = free_resource("CPU", needed)
        if needed > free:
            raise ValueError(
                f"the reward pool needs {needed:g} CPUs (reward.num_workers={num_workers} x {num_cpus_per_worker} "
                f"+ {model_cpus:g} for {len(model_entries)} reward model actor(s)) but the Ray cluster has {free:g} "
                f"of {cpus:g} free: lower reward.num_workers, or free the CPUs other actors hold"
            )
        self.model_actors, self.workers = {}, []
        try:  # a start that fails leaves nothing running
            for entry, options in zip(model_entries, actor_options, strict=True):
                self.model_actors[entry["name"]] = start_reward_model_actor(entry, **options)
            worker_class = ray.remote(RewardWorker).options(
                num_cpus=num_cpus_per_worker, max_restarts=max_restarts, max_task_retries=task_retries
            )
            self.workers = [
                worker_class.remote(config, self.model_actors, threads_per_worker) for _ in range(num_workers)
            ]
            ray.get([w.ready.remote() for w in self.workers])  # a worker that cannot start fails the pool now
        except BaseException:
            self.shutdown()
            raise
        self._in_flight: list[list] = [[] for _ in self.workers]
        self._next = 0
        self.split_groups = (len(model_entries) < len(checked.specs)) if split_groups is None else split_groups

    @staticmethod
    def _model_options(entry, index: int, options: Optional[Mapping[str, Any]], placement_group) -> dict[str, Any]:
        if placement_group is None or entry.get("num_gpus") is not None:
            return dict(options or {})
        return {**dict(options or {}), **colocated_options(placement_group, index % placement_group.bundle_count)}

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def submit(
        self,
        images: Sequence,
        prompts: Sequence[str],
        metadata: Optional[Sequence[dict]] = None,
        *,
        sample_ids: Optional[Sequence] = None,
    ) -> RewardFuture:
        """Queue one group (uint8 HxWx3 images, their prompts and per-sample metadata) on the least-busy workers.

        ``sample_ids`` name the samples in errors (e.g. their rows in the step's batch); default 0..len-1.
        """
        images, prompts = list(images), list(prompts)
        metadata = list(metadata) if metadata is not None else [{} for _ in images]
        sample_ids = list(sample_ids) if sample_ids is not None else list(range(len(images)))
        if not (len(images) == len(prompts) == len(metadata) == len(sample_ids)):
            raise ValueError(
                f"images ({len(images)}), prompts ({len(prompts)}), metadata ({len(metadata)}) and "
                f"sample_ids ({len(sample_ids)}) differ in length"
            )
        pieces = []
        for start, stop in self._piece_bounds(len(images)):
            index = self._least_busy()
            ref = self.workers[index].score.remote(
                images[start:stop], prompts[start:stop], metadata[start:stop], sample_ids[start:stop]
            )
            self._in_flight[index].append(ref)
            pieces.append(_Piece(ref, index, sample_ids[start:stop], prompts[start:stop]))
        return RewardFuture(pieces)

    def _piece_bounds(self, size: int) -> list[tuple[int, int]]:
        return split_bounds(size, self.num_workers if self.split_groups else 1)

    def _least_busy(self) -> int:
        pending = [ref for refs in self._in_flight for ref in refs]
        if pending:
            finished, _ = ray.wait(pending, num_returns=len(pending), timeout=0, fetch_local=False)
            finished = set(finished)
            self._in_flight = [[r for r in refs if r not in finished] for refs in self._in_flight]
        loads = [len(refs) for refs in self._in_flight]
        order = [(self._next + k) % len(loads) for k in range(len(loads))]
        index = min(order, key=lambda i: loads[i])  # min keeps the first of equals: round-robin on ties
        self._next = (index + 1) % len(loads)
        return index

    @staticmethod
    def gather(futures: Sequence[RewardFuture]) -> RewardResult:
        """All futures' results as one RewardResult, in the order given (per-reward seconds summed)."""
        return RewardResult.concat([f.result() for f in futures])

    def score_groups(
        self, images: Sequence, prompts: Sequence[str], metadata: Optional[Sequence[dict]] = None, *, group_size: int
    ) -> RewardResult:
        """Submit a batch as consecutive groups of ``group_size`` and gather them (sample ids = batch rows)."""
        metadata = list(metadata) if metadata is not None else [{} for _ in images]
        futures = [
            self.submit(
                images[s : s + group_size],
                prompts[s : s + group_size],
                metadata[s : s + group_size],
                sample_ids=list(range(s, min(s + group_size, len(images)))),
            )
            for s in range(0, len(images), group_size)
        ]
        return self.gather(futures)

    def offload_models(self) -> None:
        """Move every reward model to the CPU (before the actor trains on the GPU they share)."""
        ray.get([h.offload.remote() for h in self.model_actors.values()])

    def onload_models(self) -> None:
        ray.get([h.onload.remote() for h in self.model_actors.values()])

    def shutdown(self) -> None:
        for actor in [*self.workers, *self.model_actors.values()]:
            ray.kill(actor)
        self.workers, self.model_actors, self._in_flight = [], {}, []

    def __getstate__(self):
        # A copy shipped to another process (an agent-loop worker) shares the actors but not this one's in-flight
        # list: ObjectRefs are owned by the process that submitted them.
        return {**self.__dict__, "_in_flight": [[] for _ in self.workers], "_next": 0}


def _not_called(images, prompts, metadata):  # stands in for a model while the driver checks the config
    raise AssertionError("placeholder reward called")
