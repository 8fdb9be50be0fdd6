"""In-process diffusers engine: the CPU default and the baseline the GPU benchmark compares against.

It loads our RL pipeline class (the same class the vllm-omni engine loads) and runs one ``rl_generate``
call per request, so a request with N seeds is one batch-N forward per denoising step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Optional

import torch

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.pipelines import get_pipeline_class
from verl_omni.rollout.engines.base import DiffusionEngine, EngineConfig, resolve_dtype, tensors_checksum
from verl_omni.rollout.outputs import RLBatchOutput
from verl_omni.workers.lora import add_lora_adapter, get_lora_state_dict, set_lora_state_dict

logger = logging.getLogger(__name__)

class DiffusersEngine(DiffusionEngine):
    supports_batched = True

    def __init__(self, config: EngineConfig):
        super().__init__(config)
        pipeline_cls = get_pipeline_class(config.pipeline)
        self.pipe = pipeline_cls.from_pretrained(config.model_path, torch_dtype=resolve_dtype(config.dtype))
        self.pipe.set_progress_bar_config(disable=True)
        if config.lora_rank > 0:
            add_lora_adapter(self.pipe.transformer, config.lora_rank, config.lora_alpha, config.lora_target_modules)
        self.pipe.to(config.device)
        self._lora_checksum: Optional[str] = None
        self._asleep = False
        # One pipeline, one forward at a time: concurrent requests queue here instead of interleaving.
        self._lock = threading.Lock()

    @property
    def vae_scale_factor(self) -> Optional[int]:
        return getattr(self.pipe, "vae_scale_factor", None)

    def _locked(self, fn, *args):
        """Run ``fn`` holding the pipeline lock, in a worker thread: a long forward holding the lock must
        never block the server's event loop (health checks, abort, stats)."""

        def run():
            with self._lock:
                if self.pipe is None:
                    raise RuntimeError("engine is shut down")
                return fn(*args)

        return asyncio.to_thread(run)

    def _generate_sync(self, prompt: str, seeds: list[int], params: DiffusionSamplingParams) -> RLBatchOutput:
        if self._asleep:
            raise RuntimeError("engine is asleep: call wake_up() before generate()")
        return self.pipe.rl_generate(prompt, seeds, params)

    async def generate(self, prompt: str, seeds: list[int], params: DiffusionSamplingParams,
                       request_id: Optional[str] = None) -> RLBatchOutput:
        # In-process calls run to completion: abort() cancels the awaiting request, not the forward.
        return await self._locked(self._generate_sync, prompt, seeds, params)

    def _update_lora_sync(self, tensors: dict[str, torch.Tensor]) -> str:
        set_lora_state_dict(self.pipe.transformer, tensors)
        self._lora_checksum = tensors_checksum(get_lora_state_dict(self.pipe.transformer))
        return self._lora_checksum

    async def update_lora(self, tensors: dict[str, torch.Tensor]) -> str:
        if self.config.lora_rank <= 0:
            raise ValueError("update_lora needs an engine built with lora_rank > 0 (actor_rollout_ref.model.lora_rank)")
        return await self._locked(self._update_lora_sync, tensors)

    async def lora_checksum(self) -> Optional[str]:
        if self.config.lora_rank <= 0:
            return None
        return await self._locked(lambda: tensors_checksum(get_lora_state_dict(self.pipe.transformer)))

    def _sleep_sync(self) -> None:
        if self.config.device != "cpu":
            self.pipe.to("cpu")
            torch.cuda.empty_cache()
        self._asleep = True

    def _wake_sync(self) -> None:
        if self.config.device != "cpu":
            torch.cuda.empty_cache()  # free cached blocks first: waking on a fragmented cache OOMs
            self.pipe.to(self.config.device)
        self._asleep = False

    async def sleep(self, level: int = 1) -> None:
        await self._locked(self._sleep_sync)

    async def wake_up(self) -> None:
        await self._locked(self._wake_sync)

    async def shutdown(self) -> None:
        def drop():
            self.pipe = None

        await self._locked(drop)
