"""The engine seam: what a diffusion engine must offer the server actor.

Above this seam code talks about prompts, seeds and per-sample outputs only. Two engines implement it:
``DiffusersEngine`` (in-process, CPU default and benchmark baseline) and ``VllmOmniEngine`` (GPU; the
``vllm_omni`` package next to this file is the only code that imports ``vllm_omni``). Engines are looked up by
name in ``verl_omni.rollout.engines`` (the registry). Requests reach an engine already validated by the server.
"""

from __future__ import annotations

import abc
from typing import Any, Optional

import torch

from verl_omni.config.actor import ActorConfig
from verl_omni.config.model import ModelConfig
from verl_omni.config.rollout import RolloutConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.outputs import RLBatchOutput


class DiffusionEngine(abc.ABC):
    """One loaded pipeline that turns (prompt, seeds, params) into a batched RL output."""

    def __init__(self, model: ModelConfig, rollout: RolloutConfig):
        self.model = model
        self.rollout = rollout

    @abc.abstractmethod
    async def generate(
        self, prompt: str, seeds: list[int], params: DiffusionSamplingParams, request_id: Optional[str] = None
    ) -> RLBatchOutput:
        """Run ONE engine call producing ``len(seeds)`` images of ``prompt``; ``abort(request_id)`` may cancel it."""

    async def generate_rows(
        self, prompts: list[str], seeds: list[int], params: DiffusionSamplingParams, request_id: Optional[str] = None
    ) -> RLBatchOutput:
        """Run ONE engine call of ``len(seeds)`` rows, row i an image of ``prompts[i]`` from ``seeds[i]`` (several
        prompts in one batch; the pipeline's ``rl_generate_rows``). The default serves one prompt for every row
        through :meth:`generate`; an engine that batches several prompts overrides it."""
        if len(prompts) != len(seeds):
            raise ValueError(f"generate_rows needs one prompt per seed, got {len(prompts)} prompts and {len(seeds)}")
        if len(set(prompts)) != 1:
            raise NotImplementedError(f"{type(self).__name__} cannot batch several prompts in one call")
        return await self.generate(prompts[0], seeds, params, request_id)

    @abc.abstractmethod
    async def update_lora(self, tensors: dict[str, torch.Tensor]) -> str:
        """Load LoRA weights from in-memory tensors (peft state-dict names); return the served adapter's checksum."""

    @abc.abstractmethod
    async def lora_checksum(self) -> Optional[str]:
        """Checksum of the adapter the engine is serving (None when no adapter is loaded)."""

    @abc.abstractmethod
    async def sleep(self, level: int = 1) -> None:
        """Free accelerator memory (weights offloaded); the adapter must survive."""

    @abc.abstractmethod
    async def wake_up(self) -> None:
        """Restore what ``sleep`` freed."""

    async def abort(self, request_id: Optional[str] = None) -> None:  # noqa: B027 (optional verb, no-op by default)
        """Abort in-flight work (no-op for engines that run requests synchronously)."""

    async def shutdown(self) -> None:  # noqa: B027 (optional verb, no-op by default)
        """Release everything; the engine is unusable afterwards."""

    # ------------------------------------------------------------------ the hybrid engine: an actor rank here
    @abc.abstractmethod
    async def init_actor(
        self,
        actor: ActorConfig,
        rank: int,
        world_size: int,
        address: Optional[tuple[str, int]],
        lora_seed: int,
        algorithm: Any = None,
    ) -> None:
        """Start actor rank ``rank`` of ``world_size`` in the process that holds this engine's weights, training the
        engine's own adapter (``verl_omni.workers.colocated.ColocatedActorRank``); ``address`` is rank 0's
        rendezvous (host, port) for the gradient all-reduce; every rank initialises the adapter from ``lora_seed``;
        ``algorithm``: the ``algorithm`` config section (None: the default algorithm)."""

    @abc.abstractmethod
    async def actor_call(self, verb: str, *args: Any) -> Any:
        """Run one of ``ColocatedActorRank``'s verbs (``workers.colocated.ACTOR_VERBS``); never during a rollout."""
