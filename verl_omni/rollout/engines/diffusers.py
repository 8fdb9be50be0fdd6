"""In-process diffusers engine: the CPU default and the baseline the GPU benchmark compares against.

It loads our RL pipeline class (the same class the vllm-omni engine loads) and runs one ``rl_generate``
call per request, so a request with N seeds is one batch-N forward per denoising step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Optional

import torch

from verl_omni.config.actor import ActorConfig
from verl_omni.config.model import ModelConfig
from verl_omni.config.rollout import RolloutConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.checksum import tensors_checksum
from verl_omni.core.dtypes import use_tf32_for_float32_matmuls
from verl_omni.core.outputs import RLBatchOutput
from verl_omni.models.lora import get_lora_state_dict, set_lora_state_dict
from verl_omni.pipelines.loading import load_rl_pipeline
from verl_omni.rollout.engines.base import DiffusionEngine

logger = logging.getLogger(__name__)


class DiffusersEngine(DiffusionEngine):
    def __init__(self, model: ModelConfig, rollout: RolloutConfig):
        super().__init__(model, rollout)
        self.pipe = load_rl_pipeline(
            model.path,
            model.pipeline,
            rollout.dtype,
            model.lora,
            gelu_epilogue=model.gelu_epilogue,
            family_options=model.family_options,
        )
        self.pipe.to(rollout.device)
        if rollout.on_cuda:
            use_tf32_for_float32_matmuls()
        self._asleep = False
        self._running: set[Optional[str]] = set()  # request ids inside rl_generate (or waiting for the lock)
        self._aborted: set[Optional[str]] = set()  # ... of which these stop at their next denoising step
        # One pipeline, one forward at a time: concurrent requests queue here instead of interleaving.
        self._lock = threading.Lock()

    def _locked(self, fn, *args):
        """Run ``fn`` holding the pipeline lock, in a worker thread: a long forward holding the lock must
        never block the server's event loop (health checks, abort, stats)."""

        def run():
            with self._lock:
                if self.pipe is None:
                    raise RuntimeError("engine is shut down")
                return fn(*args)

        return asyncio.to_thread(run)

    def _generate_sync(self, run, request_id: Optional[str]) -> RLBatchOutput:
        """``run(interrupt)``: one of the pipeline's generate calls, stopped between steps once this request is
        aborted."""
        if self._asleep:
            raise RuntimeError("engine is asleep: call wake_up() before generate()")
        try:
            return run(lambda: request_id in self._aborted)
        finally:  # here, not in the coroutine: a cancelled caller does not stop this thread, the abort flag does
            self._running.discard(request_id)
            self._aborted.discard(request_id)

    async def generate(
        self, prompt: str, seeds: list[int], params: DiffusionSamplingParams, request_id: Optional[str] = None
    ) -> RLBatchOutput:
        def run(stop):
            return self.pipe.rl_generate(prompt, seeds, params, interrupt=stop)

        return await self._request(request_id, run)

    async def generate_rows(
        self, prompts: list[str], seeds: list[int], params: DiffusionSamplingParams, request_id: Optional[str] = None
    ) -> RLBatchOutput:
        rows = list(prompts)

        def run(stop):
            return self.pipe.rl_generate_rows(rows, seeds, params, interrupt=stop)

        return await self._request(request_id, run)

    async def _request(self, request_id: Optional[str], run) -> RLBatchOutput:
        self._running.add(request_id)
        return await self._locked(self._generate_sync, run, request_id)

    async def abort(self, request_id: Optional[str] = None) -> None:
        # The forward runs in a thread; it stops at its next denoising step and releases the pipeline lock.
        self._aborted.update(self._running if request_id is None else {request_id} & self._running)

    def _update_lora_sync(self, tensors: dict[str, torch.Tensor]) -> str:
        set_lora_state_dict(self.pipe.lora_module, tensors)
        return tensors_checksum(get_lora_state_dict(self.pipe.lora_module))

    async def update_lora(self, tensors: dict[str, torch.Tensor]) -> str:
        if self.model.lora is None:
            raise ValueError("update_lora needs an engine built with a LoRA (actor_rollout_ref.model.lora_rank >= 1)")
        return await self._locked(self._update_lora_sync, tensors)

    async def lora_checksum(self) -> Optional[str]:
        if self.model.lora is None:
            return None
        return await self._locked(lambda: tensors_checksum(get_lora_state_dict(self.pipe.lora_module)))

    def _sleep_sync(self) -> None:
        if self.rollout.on_cuda:
            self.pipe.to("cpu")
            torch.cuda.empty_cache()
        self._asleep = True

    def _wake_sync(self) -> None:
        if self.rollout.on_cuda:
            torch.cuda.empty_cache()  # free cached blocks first: waking on a fragmented cache OOMs
            self.pipe.to(self.rollout.device)
        self._asleep = False

    async def sleep(self, level: int = 1) -> None:
        await self._locked(self._sleep_sync)

    async def wake_up(self) -> None:
        await self._locked(self._wake_sync)

    # ------------------------------------------------------------------ the hybrid engine
    async def init_actor(
        self,
        actor: ActorConfig,
        rank: int,
        world_size: int,
        address: Optional[tuple[str, int]],
        lora_seed: int,
        algorithm: Any = None,
    ) -> None:
        from verl_omni.workers.colocated import ColocatedActorRank

        def build():
            device = "cuda:0" if self.rollout.on_cuda else "cpu"  # Ray shows this actor its one GPU as cuda:0
            self._actor = ColocatedActorRank(
                self.pipe, self.model, actor, self.rollout, rank, world_size, address, device, lora_seed, algorithm
            )

        await self._locked(build)

    async def actor_call(self, verb: str, *args: Any) -> Any:
        if getattr(self, "_actor", None) is None:
            raise RuntimeError("actor_call before init_actor: this engine hosts no actor rank")
        return await self._locked(self._actor.call, verb, *args)

    async def shutdown(self) -> None:
        def drop():
            self.pipe = None

        await self._locked(drop)
