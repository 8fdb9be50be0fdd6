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
from verl_omni.rollout.engines.base import DiffusionEngine, EngineConfig, tensors_checksum
from verl_omni.rollout.outputs import RLBatchOutput
from verl_omni.workers.lora import add_lora_adapter, get_lora_state_dict, set_lora_state_dict

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


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

    def _generate_sync(self, prompt: str, seeds: list[int], params: DiffusionSamplingParams) -> RLBatchOutput:
        with self._lock:
            if self._asleep:
                raise RuntimeError("engine is asleep: call wake_up() before generate()")
            return self.pipe.rl_generate(prompt, seeds, params)

    async def generate(self, prompt: str, seeds: list[int], params: DiffusionSamplingParams) -> RLBatchOutput:
        # A worker thread keeps the server's event loop free (health checks, abort) during the forward.
        return await asyncio.to_thread(self._generate_sync, prompt, seeds, params)

    async def update_lora(self, tensors: dict[str, torch.Tensor]) -> str:
        if self.config.lora_rank <= 0:
            raise ValueError("update_lora needs an engine built with lora_rank > 0 (actor_rollout_ref.model.lora_rank)")
        with self._lock:
            set_lora_state_dict(self.pipe.transformer, tensors)
            self._lora_checksum = tensors_checksum(get_lora_state_dict(self.pipe.transformer))
        return self._lora_checksum

    async def lora_checksum(self) -> Optional[str]:
        if self.config.lora_rank <= 0:
            return None
        with self._lock:
            return tensors_checksum(get_lora_state_dict(self.pipe.transformer))

    async def sleep(self, level: int = 1) -> None:
        with self._lock:
            if self.config.device != "cpu":
                self.pipe.to("cpu")
                torch.cuda.empty_cache()
            self._asleep = True

    async def wake_up(self) -> None:
        with self._lock:
            if self.config.device != "cpu":
                torch.cuda.empty_cache()  # free cached blocks first: waking on a fragmented cache OOMs
                self.pipe.to(self.config.device)
            self._asleep = False

    async def shutdown(self) -> None:
        with self._lock:
            self.pipe = None
