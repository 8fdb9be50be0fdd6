"""Every workaround for a behaviour of the pinned libraries, with the condition under which it can go.

The pins: vllm-omni 0.24.0 and vllm 0.24.0 (the GPU extra), torch 2.11 on the GPU machines (2.13 on CPU), verl
0.9.1. On an upgrade, read this module first. Each entry: what it works around (library), who calls it, when it
can go.

- :func:`update_sdpa_backends` (vllm 0.24; torch 2.11 with cuDNN 9): the actor's update. Goes when vllm stops
  switching cuDNN's SDPA off at import; FLUX's exception when cuDNN's backward runs its shapes.
- :func:`allow_autograd_through_rope` (vllm-omni 0.24): the vllm-omni worker, before the actor rank starts. Goes
  when vllm-omni runs custom pipelines under ``no_grad``.
- :func:`reload_custom_pipeline` (vllm-omni 0.24): the vllm-omni worker extension's ``re_init_pipeline``. Goes when
  vllm-omni composes worker extensions.
- :func:`dummy_run_sampling` (vllm-omni 0.24): the vllm-omni worker's request decoding. Goes when a custom pipeline
  can skip or shape vllm-omni's dummy run.
- :class:`CuMemWeightPool` (vllm-omni 0.24 over vllm's CuMem allocator): the text encoders' offload in the vllm-omni
  worker. Goes when vllm-omni can offload one component of a pipeline itself.
- :func:`inductor_multi_kernel` (torch 2.11 and its Triton): the vllm-omni worker's rollouts with
  ``model.inductor_multi_kernel``. Its FX-graph-cache override goes when the pinned torch loads multi-kernel graphs
  from that cache.
- :func:`quiet_accelerator_warnings_on_cpu` (verl 0.9.1): the trainer and the agent loop workers. Goes when verl
  stops warning on CPU-only machines.

Settings elsewhere that exist for the same pins: ``TRAINING_CUDNN_ATTENTION = False`` on FLUX.1-dev's pipeline class
(read by :func:`update_sdpa_backends`), and the FLUX preset's ``actor.use_torch_compile=false`` (inductor fails to
compile FLUX's blocks for the update with torch 2.11; ``configs/flux_flowgrpo_ocr_lora.yaml``).

Nothing here imports vllm-omni; :class:`CuMemWeightPool` imports vllm's allocator lazily, where it exists.
"""

from __future__ import annotations

import gc
import logging
from contextlib import AbstractContextManager
from typing import Any, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


# ------------------------------------------------------------------------------------------ vllm 0.24 / torch 2.11
def update_sdpa_backends(pipe: Any) -> AbstractContextManager:
    """The SDPA backends the update's forwards and backwards may use (PyTorch's own priority order picks among
    them), whatever this process switched off: every backend, less cuDNN's for a family whose pipeline class says
    ``TRAINING_CUDNN_ATTENTION = False`` (FLUX.1-dev: cuDNN's SDPA backward, torch 2.11 with cuDNN 9 on an H100,
    fails with an illegal memory access on its training shapes; flash serves its update).

    Why: vllm 0.24 disables cuDNN's SDPA for its whole process when it is imported (``vllm/platforms/cuda.py``, a
    torch 2.5 crash of some diffusers models). In the vllm-omni worker, where the hybrid engine's actor trains, the
    actor's attention would then fall back to flash or the memory-efficient kernel, both slower than cuDNN for its
    shapes (``docs/benchmarks/attention_backends_h200.json``). The flags are global, so the backward (on CUDA's
    autograd thread) sees them too; they are restored on exit.
    Remove when vllm stops switching cuDNN's SDPA off at import (``tests/gpu/test_actor_sdpa_backend_gpu.py`` keeps
    the cause visible), and FLUX's flag when cuDNN's backward runs its shapes."""
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if getattr(pipe, "TRAINING_CUDNN_ATTENTION", True):
        backends.insert(0, SDPBackend.CUDNN_ATTENTION)
    return sdpa_kernel(backends)


# ------------------------------------------------------------------------------------------ vllm-omni 0.24
def allow_autograd_through_rope(transformer: torch.nn.Module) -> None:
    """Let the actor train through a transformer that vllm-omni also runs under ``torch.inference_mode``.

    diffusers caches Qwen-Image's RoPE frequencies (``lru_cache`` on the RoPE module); the cache fills during a
    rollout, under inference mode, and autograd refuses inference tensors. A forward hook hands training calls
    normal copies (a few KB). The same hook sits on every family's ``pos_embed`` (FLUX's RoPE returns a pair, SD3's
    patch embedding one tensor; neither caches, so it copies nothing there). Idempotent.
    Remove when vllm-omni runs custom pipelines under ``no_grad`` instead.
    """
    rope = getattr(transformer, "pos_embed", None)
    if rope is None or getattr(rope, "_verl_omni_autograd_hook", False):
        return

    def normal(t: Any) -> Any:
        return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t

    def normal_outputs(module, args, output):
        if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
            return None
        if isinstance(output, torch.Tensor):
            return normal(output)
        return type(output)(normal(t) for t in output)

    rope.register_forward_hook(normal_outputs)
    rope._verl_omni_autograd_hook = True


def empty_cuda_cache() -> None:
    """``torch.cuda.empty_cache()`` where there is a GPU."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reload_custom_pipeline(worker: Any, custom_pipeline_args: dict[str, Any]) -> None:
    """What vllm-omni 0.24's ``CustomPipelineWorkerExtension.re_init_pipeline`` does, without starting vllm-omni's
    LoRA manager (which cannot serve a peft adapter): drop the worker's pipeline, then load the custom one by its
    qualified name. Setting ``worker_extension_cls`` replaces that extension, so ours runs these steps itself.
    Remove when vllm-omni composes worker extensions."""
    if getattr(worker.model_runner, "pipeline", None) is not None:
        worker.model_runner.pipeline = None
        gc.collect()
        empty_cuda_cache()
    worker.load_model(load_format="custom_pipeline", custom_pipeline_name=custom_pipeline_args["pipeline_class"])


def dummy_run_sampling(sampling_params: Any) -> tuple[list[int], dict[str, Any]]:
    """(seeds, ``DiffusionSamplingParams`` fields) for a request that did not come from our engine: vllm-omni 0.24's
    start-up dummy run (1 step at 512x512). Served as plain ODE sampling with at least 2 steps (a 1-step Qwen-Image
    schedule with ``shift_terminal`` is NaN), its size and output count as asked.
    Remove when vllm-omni lets a custom pipeline skip or shape its dummy run."""
    sp = sampling_params
    n = max(1, int(getattr(sp, "num_outputs_per_prompt", 1) or 1))
    seed0 = int(sp.seed) if getattr(sp, "seed", None) is not None else 0
    fields = {
        "num_inference_steps": max(2, int(sp.num_inference_steps or 2)),
        "height": int(sp.height or 512),
        "width": int(sp.width or 512),
        "noise_level": 0.0,
        "return_trajectory": False,
    }
    return [seed0 + i for i in range(n)], fields


class CuMemWeightPool:
    """vllm's CuMem allocator (vllm-omni's sleep mode: the pipeline's weights load under its ``weights`` tag) as the
    ``PoolSegments`` of ``workers/text_encoder_offload.py``. A tensor freed in that pool stays cached in it, out of
    the reach of the update's allocations and of ``torch.cuda.empty_cache``; so the text encoders leave it as vllm's
    own ``sleep`` / ``wake_up`` move weights, by allocation: the physical memory of a segment is unmapped and mapped
    back at the same addresses, and PyTorch's allocator sees no change (its counters keep the segment allocated,
    ``cudaMemGetInfo`` shows it free). Remove when vllm-omni can offload one component of a pipeline itself."""

    TAG = "weights"

    def __init__(self, allocator: Any, unmap_and_release: Any, create_and_map: Any, snapshot: Any = None) -> None:
        """``allocator``: vllm's ``CuMemAllocator`` (its ``pointer_to_data``: segment address -> allocation with
        ``tag`` and ``handle``); ``unmap_and_release`` / ``create_and_map``: vllm's, on a handle; ``snapshot``: the
        allocator's segments with their blocks (default ``torch.cuda.memory_snapshot``)."""
        self.allocator = allocator
        self._unmap_and_release, self._create_and_map = unmap_and_release, create_and_map
        self._snapshot = snapshot or torch.cuda.memory_snapshot

    @classmethod
    def of_this_process(cls) -> Optional[CuMemWeightPool]:
        """The pool when this process loaded weights into it (sleep mode on), else None."""
        try:
            from vllm.device_allocator.cumem import CuMemAllocator, create_and_map, unmap_and_release
        except ImportError:
            return None
        allocator = CuMemAllocator.instance
        if allocator is None or not any(d.tag == cls.TAG for d in allocator.pointer_to_data.values()):
            return None
        return cls(allocator, unmap_and_release, create_and_map)

    def segments(self) -> list[tuple[int, int, list[int]]]:
        mine = {ptr: data for ptr, data in self.allocator.pointer_to_data.items() if data.tag == self.TAG}
        live: dict[int, list[int]] = {ptr: [] for ptr in mine}
        for segment in self._snapshot():
            if segment["address"] in live:
                live[segment["address"]] = [b["address"] for b in segment["blocks"] if b["state"] != "inactive"]
        return [(ptr, int(data.handle[1]), live[ptr]) for ptr, data in mine.items()]

    def unmap(self, address: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # nothing queued may still read the segment
        self._unmap_and_release(self.allocator.pointer_to_data[address].handle)

    def map(self, address: int) -> None:
        self._create_and_map(self.allocator.pointer_to_data[address].handle)


# ------------------------------------------------------------------------------------------ torch 2.11 + Triton
def inductor_multi_kernel() -> AbstractContextManager:
    """Inductor's settings for graphs compiled inside its scope (``model.inductor_multi_kernel``): its multi-kernel
    on, and the FX graph cache (which also turns off AOTAutograd's) off. With torch 2.11 and its Triton a
    multi-kernel graph loaded from that cache fails (``MultiKernelCall.cache_file_path`` reads the reloaded
    JITFunction's ``cache_key``, whose ``_hash_lock`` is None: "'NoneType' object does not support the context
    manager protocol"; seen on a GPU on a second compile of the same blocks), so these graphs compile afresh at each
    engine start. Remove the cache override when the pinned torch loads them."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch({"triton.multi_kernel": 1, "fx_graph_cache": False})


# ------------------------------------------------------------------------------------------ verl 0.9.1
def quiet_accelerator_warnings_on_cpu() -> None:
    """verl 0.9.1 warns once per process that it found no accelerator (``verl/plugin/platform/platform_manager.py``),
    which is the expected state of a CPU run. Raise that one logger's level when there is no GPU. Its module sets the
    level on import, so it is imported first. Remove when verl stops warning on CPU-only machines."""
    if torch.cuda.is_available():
        return
    import verl.plugin.platform.platform_manager as platform_manager

    logging.getLogger(platform_manager.__name__).setLevel(logging.ERROR)


__all__ = [
    "CuMemWeightPool",
    "allow_autograd_through_rope",
    "dummy_run_sampling",
    "empty_cuda_cache",
    "inductor_multi_kernel",
    "quiet_accelerator_warnings_on_cpu",
    "reload_custom_pipeline",
    "update_sdpa_backends",
]
