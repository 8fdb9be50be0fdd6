"""Code that runs inside vllm-omni's diffusion worker process (loaded there by qualified name).

- :class:`VllmOmniRLPipeline`: the vllm-omni custom pipeline wrapping our diffusers RL pipeline;
- :class:`VllmOmniRLWorkerExtension`: mixed into vllm-omni's worker; its methods are ``collective_rpc`` targets.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import traceback
from collections import deque
from collections.abc import Mapping
from typing import Any, Optional

import torch

from verl_omni.config.base import build
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.checksum import tensors_checksum
from verl_omni.core.dtypes import resolve_dtype, use_tf32_for_float32_matmuls
from verl_omni.core.outputs import slice_batch
from verl_omni.core.workarounds import (
    CuMemWeightPool,
    allow_autograd_through_rope,
    empty_cuda_cache,
    inductor_multi_kernel,
    reload_custom_pipeline,
)
from verl_omni.models.lora import LoRASpec, get_lora_state_dict, set_lora_state_dict
from verl_omni.pipelines.loading import load_rl_pipeline
from verl_omni.pipelines.registry import get_family
from verl_omni.rollout.engines.vllm_omni.wire import (
    ACTOR_ERROR_FILE,
    EXTRA_KEY,
    actor_error,
    decode_request,
    plain,
    row_prompts,
    to_diffusion_output,
)

logger = logging.getLogger(__name__)


def resolve_flash_attention() -> Optional[Any]:
    """vllm-omni's flash-attention function for diffusion models (FA3 via fa3-fwd, else FA2), or None when it has
    none or the user chose SDPA with vllm-omni's ``DIFFUSION_ATTENTION_BACKEND=TORCH_SDPA``."""
    import os

    if os.environ.get("DIFFUSION_ATTENTION_BACKEND", "").upper() == "TORCH_SDPA" or not torch.cuda.is_available():
        return None
    try:
        from vllm_omni.diffusion.attention.backends.utils import fa
    except ImportError:
        return None
    return fa.flash_attn_func


def family_options(opts: Mapping[str, Any]) -> Optional[Any]:
    """The family's own options section (``actor_rollout_ref.model.<pipeline>``, sent as ``family_options``) rebuilt
    from the engine's pipeline options; None for a family without one."""
    family = get_family(opts["pipeline"])
    if family.options_class is None:
        return None
    return build(family.options_class, dict(opts.get("family_options") or {}))


def attention_options(opts: Mapping[str, Any]) -> dict[str, Any]:
    """``use_attention_function``'s keyword options from the engine's pipeline options: the family's options
    section names them through its ``attention_options()``; a family without one takes the pipeline's defaults."""
    to_kwargs = getattr(family_options(opts), "attention_options", None)
    return to_kwargs() if to_kwargs is not None else {}


class VllmOmniRLPipeline(torch.nn.Module):
    """vllm-omni custom pipeline wrapping a verl_omni RL pipeline.

    Its diffusers components (transformer, vae, text_encoder) are registered as child modules so vllm-omni's
    ``.to(device)``, CuMem sleep pool and regional ``torch.compile`` of ``transformer`` apply to them.
    """

    supports_request_batch = True

    def __init__(self, *, od_config: Any, **_: Any):
        super().__init__()
        self.od_config = od_config
        self.opts = dict((getattr(od_config, "custom_pipeline_args", None) or {}).get(EXTRA_KEY) or {})
        lora = LoRASpec(**self.opts["lora"]) if self.opts.get("lora") else None
        dtype = od_config.dtype if isinstance(od_config.dtype, torch.dtype) else resolve_dtype(str(od_config.dtype))
        pipe = load_rl_pipeline(
            od_config.model,
            self.opts["pipeline"],
            dtype,
            lora,
            gelu_epilogue=bool(self.opts.get("gelu_epilogue", False)),
            family_options=family_options(self.opts),
        )
        use_tf32_for_float32_matmuls()
        flash = resolve_flash_attention() if hasattr(pipe, "use_attention_function") else None
        if flash is not None:
            options = attention_options(self.opts)
            blocks = pipe.use_attention_function(flash, **options)
            logger.info(
                "verl_omni pipeline: %d attention modules use vllm-omni's flash attention (%s)%s",
                blocks,
                getattr(flash, "__module__", flash),
                "".join(f", {name}={'on' if on else 'off'}" for name, on in options.items()),
            )
        self.inductor_multi_kernel = bool(self.opts.get("inductor_multi_kernel", False))
        self.rl_batch_sizes: deque[int] = deque(maxlen=1024)  # samples per rl_generate call (batching stats)
        object.__setattr__(self, "pipe", pipe)  # not a Module: keep it out of the module tree
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                setattr(self, name, component)

    def __setattr__(self, name: str, value: Any) -> None:
        # The runner may swap ``transformer`` (regional compile returns the same module, but be safe).
        super().__setattr__(name, value)
        pipe = self.__dict__.get("pipe")
        if pipe is not None and isinstance(value, torch.nn.Module) and name in getattr(pipe, "components", {}):
            setattr(pipe, name, value)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def load_weights(self, weights: Any) -> None:
        """Weights came with ``from_pretrained``; drain vllm-omni's (empty) iterator. None = no strict check."""
        for _ in weights:
            pass
        return None

    def forward(self, batch: Any) -> list:
        from vllm_omni.diffusion.data import DiffusionOutput

        requests = list(getattr(batch, "requests", None) or [batch])
        # Requests of the same prompt(s) and params share one pipeline call; rows with prompts of their own (a
        # ``generate_rows`` request) keep them, in order.
        groups: dict[tuple[Any, str], list[tuple[int, list[int], DiffusionSamplingParams, list[str]]]] = {}
        for index, req in enumerate(requests):
            prompt, seeds, params = decode_request(req)
            rows = row_prompts(req)
            key = (prompt if rows is None else tuple(rows), json.dumps(plain(params.to_dict()), sort_keys=True))
            groups.setdefault(key, []).append((index, seeds, params, rows or [prompt] * len(seeds)))
        outputs: list[Any] = [None] * len(requests)
        for (prompts, _), members in groups.items():
            all_seeds = [s for _, seeds, _, _ in members for s in seeds]
            params = members[0][2]
            with self.rollout_compile_options():
                if isinstance(prompts, str):
                    result = self.pipe.rl_generate(prompts, all_seeds, params)
                else:
                    result = self.pipe.rl_generate_rows([p for *_, rows in members for p in rows], all_seeds, params)
            self.rl_batch_sizes.append(len(all_seeds))
            start = 0
            for index, seeds, _, _ in members:
                part = slice_batch(result, start, start + len(seeds))
                start += len(seeds)
                outputs[index] = to_diffusion_output(
                    part, DiffusionOutput, self.od_config.model_class_name, one_prompt=isinstance(prompts, str)
                )
        return outputs

    def rollout_compile_options(self) -> contextlib.AbstractContextManager:
        """Inductor settings for what compiles during a rollout (vllm-omni compiles the blocks lazily, in the first
        forward of each shape): ``model.inductor_multi_kernel``. Scoped to the rollout because in the hybrid engine
        the actor trains through the same compiled blocks in this process, and its training graphs keep inductor's
        defaults. A graph keeps the settings it was compiled with (dynamo does not guard on inductor's config)."""
        if not self.inductor_multi_kernel:
            return contextlib.nullcontext()
        return inductor_multi_kernel()  # without the FX graph cache (core/workarounds.py)

    # ------------------------------------------------------------------ LoRA (called from the worker extension)
    def update_lora(self, tensors: dict[str, torch.Tensor]) -> str:
        set_lora_state_dict(self.pipe.lora_module, tensors)
        return tensors_checksum(get_lora_state_dict(self.pipe.lora_module))

    def lora_checksum(self) -> Optional[str]:
        if not self.opts.get("lora"):
            return None
        return tensors_checksum(get_lora_state_dict(self.pipe.lora_module))


class VllmOmniRLWorkerExtension:
    """Mixed into vllm-omni's diffusion worker (``worker_extension_cls``); its methods are collective_rpc targets."""

    def re_init_pipeline(self, custom_pipeline_args: dict[str, Any]) -> None:
        """Loads our pipeline by its qualified name, without vllm-omni's LoRA manager (``reload_custom_pipeline``)."""
        reload_custom_pipeline(self, custom_pipeline_args)

    def verl_omni_update_lora(self, tensors: dict[str, torch.Tensor]) -> str:
        with torch.no_grad():
            return self.model_runner.pipeline.update_lora(tensors)

    def verl_omni_lora_checksum(self) -> Optional[str]:
        return self.model_runner.pipeline.lora_checksum()

    def verl_omni_take_batch_sizes(self) -> dict[str, list[int]]:
        pipeline = self.model_runner.pipeline
        sizes = list(pipeline.rl_batch_sizes)
        pipeline.rl_batch_sizes.clear()
        return {"sizes": sizes}  # a dict, so the engine's unwrapping of stage/rank lists stops at it

    # ------------------------------------------------------------------ the hybrid engine: the actor rank lives here
    def verl_omni_init_actor(self, payload: dict[str, Any]) -> bool:
        from verl_omni.workers.colocated import ColocatedActorRank

        pipeline = self.model_runner.pipeline
        for denoiser in pipeline.pipe.denoisers.values():
            allow_autograd_through_rope(denoiser)
        address = payload["address"]
        self._verl_omni_actor = ColocatedActorRank(
            pipeline.pipe,
            payload["model"],
            payload["actor"],
            payload["rollout"],
            payload["rank"],
            payload["world_size"],
            None if address is None else tuple(address),
            str(pipeline.device),
            payload["lora_seed"],
            payload.get("algorithm"),
            weight_pool=CuMemWeightPool.of_this_process(),
        )
        return True

    def verl_omni_actor_call(self, verb: str, path_in: str, path_out: str) -> bool:
        actor = getattr(self, "_verl_omni_actor", None)
        if actor is None:
            raise RuntimeError("verl_omni_actor_call before verl_omni_init_actor")
        try:
            args = torch.load(path_in, weights_only=True)
            torch.save(actor.call(verb, *args), path_out)
        except Exception as exc:  # the engine raises it in the caller (collective_rpc only logs a worker's error)
            error = actor_error(exc, traceback.format_exc())
            torch.save(error, os.path.join(os.path.dirname(path_out), ACTOR_ERROR_FILE))
            logger.error("the actor rank failed in %r: %s: %s", verb, error["type"], error["message"])
            return False
        return True

    def verl_omni_empty_cache(self) -> bool:
        gc.collect()
        empty_cuda_cache()
        return True

    def verl_omni_memory_info(self) -> dict[str, float]:
        gib = float(1 << 30)
        if not torch.cuda.is_available():
            return {}
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        return {
            "free_gib": free / gib,
            "total_gib": total / gib,
            "used_gib": (total - free) / gib,
            "torch_allocated_gib": torch.cuda.memory_allocated() / gib,
            "torch_reserved_gib": torch.cuda.memory_reserved() / gib,
        }
