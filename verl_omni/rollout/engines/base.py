"""The engine seam: what a diffusion engine must offer the server actor.

Above this seam code talks about prompts, seeds and per-sample outputs only. Two engines implement it:
``DiffusersEngine`` (in-process, CPU default and benchmark baseline) and ``VllmOmniEngine`` (GPU; the only
module that imports ``vllm_omni``). Engines are looked up by name in ``ENGINE_REGISTRY``.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.rollout.outputs import RLBatchOutput


@dataclass
class EngineConfig:
    """How to build an engine. ``model_path`` is a diffusers pipeline directory."""

    model_path: str
    pipeline: str = "qwen_image"  # key of verl_omni.pipelines.PIPELINE_REGISTRY
    device: str = "cpu"
    dtype: str = "float32"
    lora_rank: int = 0
    lora_alpha: float = 0.0
    lora_target_modules: tuple[str, ...] = ()
    # vllm-omni only: let the engine batch concurrent requests itself (max_num_seqs), compile, etc.
    max_num_seqs: int = 1
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.9
    # Seconds one engine call may take before the server reports the engine as hung.
    request_timeout_s: float = 600.0


class DiffusionEngine(abc.ABC):
    """One loaded pipeline that turns (prompt, seeds, params) into a batched RL output."""

    #: True when one call with N seeds runs as a single batch-N forward (the batched rollout path).
    supports_batched: bool = True

    def __init__(self, config: EngineConfig):
        self.config = config

    @abc.abstractmethod
    async def generate(self, prompt: str, seeds: list[int], params: DiffusionSamplingParams,
                       request_id: Optional[str] = None) -> RLBatchOutput:
        """Run ONE engine call producing ``len(seeds)`` images of ``prompt``; ``abort(request_id)`` may cancel it."""

    @abc.abstractmethod
    async def update_lora(self, tensors: dict[str, torch.Tensor]) -> str:
        """Load LoRA weights from in-memory tensors (peft state-dict names); return their checksum."""

    @abc.abstractmethod
    async def lora_checksum(self) -> Optional[str]:
        """Checksum of the adapter the engine is serving (None when no adapter is loaded)."""

    @abc.abstractmethod
    async def sleep(self, level: int = 1) -> None:
        """Free accelerator memory (weights offloaded); the adapter must survive."""

    @abc.abstractmethod
    async def wake_up(self) -> None:
        """Restore what ``sleep`` freed."""

    async def abort(self, request_id: Optional[str] = None) -> None:
        """Abort in-flight work (no-op for engines that run requests synchronously)."""

    async def shutdown(self) -> None:
        """Release everything; the engine is unusable afterwards."""

    @property
    def vae_scale_factor(self) -> Optional[int]:
        return None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype={name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def vae_scale_factor_of(model_path: str) -> Optional[int]:
    """The pipeline's VAE factor from ``vae/config.json`` (Qwen-Image: 2 ** len(temperal_downsample))."""
    path = os.path.join(model_path, "vae", "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        cfg = json.load(f)
    for key in ("temperal_downsample", "temporal_downsample"):
        if key in cfg:
            return 2 ** len(cfg[key])
    if "block_out_channels" in cfg:  # SD3-style AutoencoderKL
        return 2 ** (len(cfg["block_out_channels"]) - 1)
    return None


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """Order-independent sha256 over names, shapes, dtypes and float32 values of LoRA tensors.

    Both sides (actor and engine) compute this over the same peft names so a sync can be verified.
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


ENGINE_REGISTRY: dict[str, Callable[[], type[DiffusionEngine]]] = {}


def register_engine(name: str, loader: Callable[[], type[DiffusionEngine]]) -> None:
    ENGINE_REGISTRY[name] = loader


def get_engine_class(name: str) -> type[DiffusionEngine]:
    if name not in ENGINE_REGISTRY:
        raise ValueError(f"unknown engine {name!r}; allowed: {sorted(ENGINE_REGISTRY)}")
    return ENGINE_REGISTRY[name]()


def _load_diffusers() -> type[DiffusionEngine]:
    from verl_omni.rollout.engines.diffusers import DiffusersEngine

    return DiffusersEngine


def _load_vllm_omni() -> type[DiffusionEngine]:
    from verl_omni.rollout.engines.vllm_omni import VllmOmniEngine

    return VllmOmniEngine


register_engine("diffusers", _load_diffusers)
register_engine("vllm_omni", _load_vllm_omni)
