"""The vllm-omni engine: THE ONLY module of verl_omni that imports ``vllm_omni`` (always lazily, inside functions).

How our RL pipeline runs inside vllm-omni 0.24.0 (read from its source, ``vllm_omni/diffusion``):

- ``AsyncOmni(model=<pipeline dir>, custom_pipeline_args={"pipeline_class": "<qualified name>", ...})`` makes the
  diffusion worker build ``load_format="custom_pipeline"``: it resolves the class by qualified name and constructs
  it as ``cls(od_config=...)`` on CPU, calls ``load_weights(iterator)``, then ``.to(device)`` inside the CuMem
  "weights" pool (so ``sleep(level=1)`` can offload it). :class:`VllmOmniRLPipeline` is that class: an
  ``nn.Module`` wrapping our diffusers RL pipeline (``verl_omni.pipelines``), whose components become its child
  modules. The model runner calls ``forward(DiffusionRequestBatch)`` under ``torch.inference_mode()`` and expects
  one ``DiffusionOutput`` per request.
- Per-step tensors travel in ``DiffusionOutput.trajectory_latents / trajectory_timesteps / trajectory_log_probs``
  (as bagel fills them) and everything else in ``custom_output`` (-> ``OmniRequestOutput._custom_output``).
- Per-sample seeds and our sampling params travel in ``OmniDiffusionSamplingParams.extra_args["verl_omni"]``:
  one request with ``num_outputs_per_prompt=len(seeds)`` is one batch-N ``rl_generate`` call.
- Engine-side request batching (``max_num_seqs > 1``): the pipeline declares ``supports_request_batch``; requests
  of the same prompt and params in one batch are merged into ONE ``rl_generate`` call and split back.
- LoRA: vllm-omni's own LoRA manager replaces vLLM ``LinearBase`` layers of its native transformers and loads
  adapters from disk; our pipeline is diffusers + peft. So the adapter is peft's (the same
  ``verl_omni.workers.lora`` functions the diffusers engine and the actor use), added at load time, and
  ``update_lora`` sets its tensors in the worker through ``collective_rpc`` on a worker extension
  (:class:`VllmOmniRLWorkerExtension`, installed with ``worker_extension_cls``): in memory, no files.
- Attention: the pipeline's joint attention calls the flash kernel vllm-omni resolves for its own diffusion models
  (FA3 from ``fa3-fwd`` on Hopper) when there is no text padding mask, see :func:`resolve_flash_attention`;
  ``DIFFUSION_ATTENTION_BACKEND=TORCH_SDPA`` (vllm-omni's own switch) keeps diffusers' SDPA.
- The diffusers engine keeps diffusers' stock modules (SDPA, eager): it is the baseline.
- Output transfer: the prompt embeddings of one request are the same row repeated, so the worker sends one row
  and :func:`request_output_to_batch` repeats it (B copies of [L, D] would cross two process hops).
- ``model_class_name`` is set to :data:`MODEL_CLASS_NAME`, a name vllm-omni does not know, so it applies no
  Qwen-Image specific pre/post-processing to our output (its Qwen post-process expects [-1, 1] NCHW floats).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import uuid
from collections import deque
from typing import Any, Optional, Sequence

import numpy as np
import torch

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.rollout.engines.base import (
    DiffusionEngine,
    EngineConfig,
    resolve_dtype,
    tensors_checksum,
    vae_scale_factor_of,
)
from verl_omni.pipelines.common import check_request
from verl_omni.rollout.outputs import _PER_SAMPLE, _SHARED, RLBatchOutput

logger = logging.getLogger(__name__)

PIPELINE_CLASS = "verl_omni.rollout.engines.vllm_omni.VllmOmniRLPipeline"
WORKER_EXTENSION_CLASS = "verl_omni.rollout.engines.vllm_omni.VllmOmniRLWorkerExtension"
MODEL_CLASS_NAME = "VerlOmniRLPipeline"
EXTRA_KEY = "verl_omni"  # key in custom_pipeline_args, extra_args and custom_output
SHARED_ROWS_KEY = "shared_rows"  # custom_output fields sent as one row for all samples of the request

def _load_vllm_omni() -> tuple[Any, Any]:
    """Import vllm_omni here and only here; returns (AsyncOmni, OmniDiffusionSamplingParams)."""
    try:
        import vllm_omni
        from vllm_omni.inputs.data import OmniDiffusionSamplingParams
    except ImportError as exc:  # pragma: no cover - message only
        raise ImportError(
            "rollout engine 'vllm_omni' needs vllm-omni==0.24.0 and vllm==0.24.0 on a GPU machine "
            "(pip install 'verl_omni[vllm-omni]'); use engine 'diffusers' on CPU"
        ) from exc
    return vllm_omni.AsyncOmni, OmniDiffusionSamplingParams


def resolve_flash_attention() -> Optional[Any]:
    """vllm-omni's flash-attention function for diffusion models (FA3 via fa3-fwd, else FA2), or None when it has
    none or the user chose SDPA with vllm-omni's ``DIFFUSION_ATTENTION_BACKEND=TORCH_SDPA``."""
    if os.environ.get("DIFFUSION_ATTENTION_BACKEND", "").upper() == "TORCH_SDPA" or not torch.cuda.is_available():
        return None
    try:
        from vllm_omni.diffusion.attention.backends.utils import fa
    except ImportError:
        return None
    return fa.flash_attn_func


def _empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _unwrap(result: Any) -> Any:
    """collective_rpc returns one entry per stage, each possibly a per-rank list: take stage 0, rank 0."""
    while isinstance(result, (list, tuple)) and result:
        result = result[0]
    return result


# ============================================================================ engine (server-actor side)
class VllmOmniEngine(DiffusionEngine):
    """Runs our RL pipeline inside vllm-omni's diffusion worker, driven through ``AsyncOmni``."""

    supports_batched = True

    def __init__(self, config: EngineConfig, **engine_kwargs: Any):
        super().__init__(config)
        async_omni_cls, self._sampling_params_cls = _load_vllm_omni()
        self._vae_scale_factor = vae_scale_factor_of(config.model_path)
        self.engine_kwargs = self.build_engine_kwargs(config, **engine_kwargs)
        self._omni = async_omni_cls(model=config.model_path, **self.engine_kwargs)
        self._inflight: dict[str, Optional[str]] = {}  # engine request id -> caller's request id
        self._asleep = False

    # ------------------------------------------------------------------ construction
    @staticmethod
    def build_engine_kwargs(config: EngineConfig, **overrides: Any) -> dict[str, Any]:
        """AsyncOmni keyword arguments for ``config`` (plain values only: vllm-omni puts them in OmegaConf)."""
        resolve_dtype(config.dtype)  # a bad dtype fails here, naming the allowed values
        pipeline_opts = {
            "pipeline": config.pipeline,
            "lora_rank": int(config.lora_rank),
            "lora_alpha": float(config.lora_alpha),
            "lora_target_modules": list(config.lora_target_modules),
        }
        kwargs: dict[str, Any] = {
            "dtype": config.dtype,
            "custom_pipeline_args": {"pipeline_class": PIPELINE_CLASS, EXTRA_KEY: pipeline_opts},
            "worker_extension_cls": WORKER_EXTENSION_CLASS,
            "model_class_name": MODEL_CLASS_NAME,
            "max_num_seqs": int(config.max_num_seqs),
            # Let concurrent requests land before the scheduler forms a batch (only with engine-side batching).
            "request_batch_max_wait_ms": 50.0 if config.max_num_seqs > 1 else 0.0,
            "enforce_eager": bool(config.enforce_eager),
            "gpu_memory_utilization": float(config.gpu_memory_utilization),
            "enable_sleep_mode": True,
        }
        kwargs.update(overrides)
        return kwargs

    @property
    def vae_scale_factor(self) -> Optional[int]:
        return self._vae_scale_factor

    # ------------------------------------------------------------------ generation
    def build_sampling_params(self, seeds: Sequence[int], params: DiffusionSamplingParams) -> Any:
        """ONE request: ``num_outputs_per_prompt = len(seeds)``, our params and seeds in ``extra_args``."""
        extra = {"seeds": [int(s) for s in seeds], "params": _plain(params.to_dict())}
        kwargs: dict[str, Any] = dict(
            num_inference_steps=params.num_inference_steps,
            height=params.height,
            width=params.width,
            num_outputs_per_prompt=len(seeds),
            seed=int(seeds[0]),
            max_sequence_length=params.max_sequence_length,
            return_trajectory_latents=params.return_trajectory,
            extra_args={EXTRA_KEY: extra},
        )
        if params.guidance_scale > 1.0:  # Qwen-Image true CFG; the request-batch key includes it
            kwargs["true_cfg_scale"] = float(params.guidance_scale)
            kwargs["guidance_scale"] = float(params.guidance_scale)
        return self._sampling_params_cls(**kwargs)

    async def generate(self, prompt: str, seeds: list[int], params: DiffusionSamplingParams,
                       request_id: Optional[str] = None) -> RLBatchOutput:
        seeds = check_request(prompt, seeds)
        params.validate(self._vae_scale_factor)
        if self._asleep:
            raise RuntimeError("engine is asleep: call wake_up() before generate()")
        sampling_params = self.build_sampling_params(seeds, params)
        # vllm-omni needs a unique id per request; the caller's id maps to it so abort(caller_id) reaches it.
        engine_id = f"verl-omni-{uuid.uuid4().hex[:12]}"
        self._inflight[engine_id] = request_id
        final = None
        try:
            async for out in self._omni.generate(prompt, request_id=engine_id, sampling_params_list=[sampling_params]):
                final = out
        finally:
            self._inflight.pop(engine_id, None)
        request_id = engine_id
        if final is None:
            raise RuntimeError(f"vllm-omni returned no output for request {request_id}")
        if getattr(final, "error", None):
            raise RuntimeError(f"vllm-omni request {request_id} failed: {final.error}")
        return request_output_to_batch(final, seeds)

    # ------------------------------------------------------------------ LoRA
    async def update_lora(self, tensors: dict[str, torch.Tensor]) -> str:
        if self.config.lora_rank <= 0:
            raise ValueError("update_lora needs an engine built with lora_rank > 0 (actor_rollout_ref.model.lora_rank)")
        payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        expected = tensors_checksum(payload)
        served = _unwrap(await self._omni.collective_rpc("verl_omni_update_lora", args=(payload,)))
        if served != expected:
            raise RuntimeError(f"LoRA sync failed: engine serves checksum {served}, actor sent {expected}")
        return served

    async def lora_checksum(self) -> Optional[str]:
        if self.config.lora_rank <= 0:
            return None
        return _unwrap(await self._omni.collective_rpc("verl_omni_lora_checksum"))

    async def take_batch_sizes(self) -> list[int]:
        """Samples per pipeline call since the last ask (shows how engine-side batching grouped requests)."""
        return _unwrap(await self._omni.collective_rpc("verl_omni_take_batch_sizes"))["sizes"]

    async def memory_info(self) -> dict[str, float]:
        """GPU memory as the worker sees it (GiB): free / total / allocated by torch / reserved by torch."""
        return _unwrap(await self._omni.collective_rpc("verl_omni_memory_info"))

    # ------------------------------------------------------------------ lifecycle
    async def sleep(self, level: int = 1) -> None:
        # vllm-omni 0.24 cannot wake from level 2 (weights discarded); level 1 offloads them to CPU RAM.
        if level != 1:
            raise ValueError(f"sleep level {level} is not supported by vllm-omni 0.24 wake_up; use level=1")
        acks = await self._omni.sleep(level=level)
        _check_acks("sleep", acks)
        self._asleep = True

    async def wake_up(self) -> None:
        # Empty the CUDA caches first (here and in the worker): waking on top of cached blocks OOMs when colocated.
        _empty_cuda_cache()
        await self._omni.collective_rpc("verl_omni_empty_cache")
        acks = await self._omni.wake_up()
        _check_acks("wake_up", acks)
        self._asleep = False

    async def abort(self, request_id: Optional[str] = None) -> None:
        if request_id is None:
            ids = sorted(self._inflight)
        else:  # the caller's id (as the server passes it), or an engine id
            ids = sorted(eid for eid, cid in self._inflight.items() if request_id in (cid, eid)) or [request_id]
        if ids:
            await self._omni.abort(ids)

    async def shutdown(self) -> None:
        omni, self._omni = self._omni, None
        if omni is not None:
            omni.shutdown()


def _check_acks(verb: str, acks: Any) -> None:
    for ack in acks or []:
        status = getattr(ack, "status", "SUCCESS")
        if status != "SUCCESS":
            raise RuntimeError(f"vllm-omni {verb} failed: {getattr(ack, 'error_msg', None) or ack}")


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively (the request crosses process boundaries; keep it JSON-like)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _images_to_uint8(images: Any) -> torch.Tensor:
    """OmniRequestOutput.images -> uint8 [B, H, W, 3]: a [B,H,W,3] tensor, a list of them, or PIL images."""
    if isinstance(images, torch.Tensor):
        images = [images]
    tensors = []
    for img in images:
        if isinstance(img, torch.Tensor):
            t = img.detach().to("cpu")
        else:  # PIL
            t = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
        if t.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images from the RL pipeline, got {t.dtype}")
        tensors.append(t if t.ndim == 4 else t.unsqueeze(0))
    if not tensors:
        raise ValueError("vllm-omni returned no images")
    return torch.cat(tensors, dim=0)


def request_output_to_batch(out: Any, seeds: Sequence[int]) -> RLBatchOutput:
    """Assemble our RLBatchOutput from one vllm-omni ``OmniRequestOutput`` produced by VllmOmniRLPipeline."""
    custom = getattr(out, "custom_output", None) or getattr(out, "_custom_output", None) or {}
    extra = custom.get(EXTRA_KEY)
    if extra is None:
        raise RuntimeError(
            "vllm-omni output has no verl_omni payload in custom_output: was the engine started with "
            f"custom_pipeline_args.pipeline_class={PIPELINE_CLASS}?"
        )
    images = extra.get("images")
    images = _images_to_uint8(images if images is not None else out.images)
    fields: dict[str, Any] = {k: v for k, v in extra.items() if k not in ("images", "seeds", SHARED_ROWS_KEY)}
    for name in extra.get(SHARED_ROWS_KEY, ()):  # one row sent for the whole request: repeat it per sample
        fields[name] = fields[name].expand(len(seeds), *fields[name].shape[1:]).clone()
    fields["latents"] = out.trajectory_latents
    fields["log_probs"] = out.trajectory_log_probs
    fields["timesteps"] = out.trajectory_timesteps
    for name in ("latents", "log_probs", "timesteps"):
        if fields[name] is None:
            raise RuntimeError(f"vllm-omni output lacks trajectory field for {name}")
    returned_seeds = [int(s) for s in extra.get("seeds", [])]
    if returned_seeds != [int(s) for s in seeds]:
        raise RuntimeError(f"engine returned seeds {returned_seeds}, asked for {list(seeds)}")
    batch = RLBatchOutput(images=images, seeds=returned_seeds, **fields)
    if batch.batch_size != len(seeds) or batch.log_probs.shape[0] != len(seeds):
        raise RuntimeError(
            f"engine returned {batch.batch_size} images / {batch.log_probs.shape[0]} log-prob rows for {len(seeds)} seeds"
        )
    return batch


# ============================================================================ worker side (vllm-omni processes)
_PROMPT_FIELDS = tuple(name for name in _PER_SAMPLE if "prompt_embeds" in name)


def _slice_batch(batch: RLBatchOutput, start: int, stop: int) -> RLBatchOutput:
    kwargs: dict[str, Any] = {}
    for name in _PER_SAMPLE:
        value = getattr(batch, name)
        kwargs[name] = None if value is None else value[start:stop]
    for name in _SHARED:
        kwargs[name] = getattr(batch, name)
    return RLBatchOutput(seeds=list(batch.seeds[start:stop]), **kwargs)


class VllmOmniRLPipeline(torch.nn.Module):
    """vllm-omni custom pipeline wrapping a verl_omni RL pipeline (loaded by qualified name in the worker).

    Its diffusers components (transformer, vae, text_encoder) are registered as child modules so vllm-omni's
    ``.to(device)``, CuMem sleep pool and regional ``torch.compile`` of ``transformer`` apply to them.
    """

    supports_request_batch = True

    def __init__(self, *, od_config: Any, **_: Any):
        super().__init__()
        from verl_omni.pipelines import get_pipeline_class
        from verl_omni.workers.lora import add_lora_adapter

        self.od_config = od_config
        opts = dict((getattr(od_config, "custom_pipeline_args", None) or {}).get(EXTRA_KEY) or {})
        self.opts = opts
        dtype = od_config.dtype if isinstance(od_config.dtype, torch.dtype) else resolve_dtype(str(od_config.dtype))
        pipeline_cls = get_pipeline_class(opts.get("pipeline", "qwen_image"))
        pipe = pipeline_cls.from_pretrained(od_config.model, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        if int(opts.get("lora_rank", 0)) > 0:
            add_lora_adapter(
                pipe.transformer, int(opts["lora_rank"]), float(opts.get("lora_alpha", 0.0)),
                tuple(opts.get("lora_target_modules") or ()),
            )
        flash = resolve_flash_attention() if hasattr(pipe, "use_attention_function") else None
        if flash is not None:
            blocks = pipe.use_attention_function(flash)
            logger.info("verl_omni pipeline: %d attention blocks use vllm-omni's flash attention (%s)",
                        blocks, getattr(flash, "__module__", flash))
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

    # ------------------------------------------------------------------ requests
    def _decode_request(self, req: Any) -> tuple[str, list[int], DiffusionSamplingParams]:
        prompt = req.prompt
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt", "")
        sp = req.sampling_params
        extra = (getattr(sp, "extra_args", None) or {}).get(EXTRA_KEY)
        if extra is not None:
            return str(prompt), [int(s) for s in extra["seeds"]], DiffusionSamplingParams.from_dict(extra["params"])
        # A request that did not come from VllmOmniEngine (vllm-omni's start-up dummy run: 1 step at 512x512):
        # plain ODE sampling, at least 2 steps (a 1-step Qwen-Image schedule with shift_terminal is NaN).
        n = max(1, int(getattr(sp, "num_outputs_per_prompt", 1) or 1))
        seed0 = int(sp.seed) if getattr(sp, "seed", None) is not None else 0
        params = DiffusionSamplingParams(
            num_inference_steps=max(2, int(sp.num_inference_steps or 2)),
            height=int(sp.height or 512),
            width=int(sp.width or 512),
            noise_level=0.0,
            return_trajectory=False,
        )
        return str(prompt), [seed0 + i for i in range(n)], params

    def forward(self, batch: Any) -> list:
        from vllm_omni.diffusion.data import DiffusionOutput

        requests = list(getattr(batch, "requests", None) or [batch])
        groups: dict[tuple[str, str], list[tuple[int, list[int], DiffusionSamplingParams]]] = {}
        for index, req in enumerate(requests):
            prompt, seeds, params = self._decode_request(req)
            key = (prompt, json.dumps(_plain(params.to_dict()), sort_keys=True))
            groups.setdefault(key, []).append((index, seeds, params))
        outputs: list[Any] = [None] * len(requests)
        for (prompt, _), members in groups.items():
            all_seeds = [s for _, seeds, _ in members for s in seeds]
            result = self.pipe.rl_generate(prompt, all_seeds, members[0][2])
            self.rl_batch_sizes.append(len(all_seeds))
            start = 0
            for index, seeds, _ in members:
                part = _slice_batch(result, start, start + len(seeds))
                start += len(seeds)
                outputs[index] = self._to_diffusion_output(part, DiffusionOutput)
        return outputs

    def _to_diffusion_output(self, part: RLBatchOutput, output_cls: Any) -> Any:
        extra: dict[str, Any] = {"seeds": list(part.seeds), SHARED_ROWS_KEY: []}
        for name in _PER_SAMPLE + _SHARED:
            if name in ("images", "latents", "log_probs", "timesteps"):
                continue
            value = getattr(part, name)
            if name in _PROMPT_FIELDS and value is not None:
                # rl_generate repeats one prompt's rows (repeat_rows): one row carries the whole request
                value = value[:1].clone()
                extra[SHARED_ROWS_KEY].append(name)
            extra[name] = value
        images = part.images
        if self.od_config.model_class_name != MODEL_CLASS_NAME:
            # vllm-omni applies its model's post-process (VaeImageProcessor.postprocess) to ``output``:
            # give it [-1, 1] NCHW floats and carry our exact uint8 images in custom_output.
            extra["images"] = images
            images = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return output_cls(
            output=images,
            trajectory_latents=part.latents,
            trajectory_timesteps=part.timesteps,
            trajectory_log_probs=part.log_probs,
            custom_output={EXTRA_KEY: extra},
        )

    # ------------------------------------------------------------------ LoRA (called from the worker extension)
    def update_lora(self, tensors: dict[str, torch.Tensor]) -> str:
        from verl_omni.workers.lora import get_lora_state_dict, set_lora_state_dict

        set_lora_state_dict(self.transformer, tensors)
        return tensors_checksum(get_lora_state_dict(self.transformer))

    def lora_checksum(self) -> Optional[str]:
        from verl_omni.workers.lora import get_lora_state_dict

        if int(self.opts.get("lora_rank", 0)) <= 0:
            return None
        return tensors_checksum(get_lora_state_dict(self.transformer))


class VllmOmniRLWorkerExtension:
    """Mixed into vllm-omni's diffusion worker (``worker_extension_cls``); its methods are collective_rpc targets.

    Setting ``worker_extension_cls`` replaces vllm-omni's ``CustomPipelineWorkerExtension``, so this class also
    provides ``re_init_pipeline`` (same steps, without vllm-omni's LoRA manager, which cannot serve a peft adapter).
    """

    def re_init_pipeline(self, custom_pipeline_args: dict[str, Any]) -> None:
        if getattr(self.model_runner, "pipeline", None) is not None:
            self.model_runner.pipeline = None
            gc.collect()
            _empty_cuda_cache()
        self.load_model(load_format="custom_pipeline", custom_pipeline_name=custom_pipeline_args["pipeline_class"])

    def verl_omni_update_lora(self, tensors: dict[str, torch.Tensor]) -> str:
        with torch.no_grad():
            return self.model_runner.pipeline.update_lora(tensors)

    def verl_omni_lora_checksum(self) -> Optional[str]:
        return self.model_runner.pipeline.lora_checksum()

    def verl_omni_take_batch_sizes(self) -> dict[str, list[int]]:
        pipeline = self.model_runner.pipeline
        sizes = list(pipeline.rl_batch_sizes)
        pipeline.rl_batch_sizes.clear()
        return {"sizes": sizes}  # a dict, so _unwrap's peeling of stage/rank lists stops at it

    def verl_omni_empty_cache(self) -> bool:
        gc.collect()
        _empty_cuda_cache()
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


__all__ = [
    "VllmOmniEngine",
    "VllmOmniRLPipeline",
    "VllmOmniRLWorkerExtension",
    "request_output_to_batch",
    "resolve_flash_attention",
    "PIPELINE_CLASS",
    "WORKER_EXTENSION_CLASS",
    "MODEL_CLASS_NAME",
]
