"""The server-actor side of the vllm-omni engine: drives ``AsyncOmni`` (imported here, lazily, and nowhere else)."""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import uuid
from collections.abc import Sequence
from typing import Any, Optional

import torch

from verl_omni.config.actor import ActorConfig
from verl_omni.config.base import to_plain
from verl_omni.config.model import ModelConfig
from verl_omni.config.rollout import RolloutConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.dtypes import resolve_dtype
from verl_omni.core.outputs import RLBatchOutput
from verl_omni.rollout.engines.base import DiffusionEngine
from verl_omni.rollout.engines.vllm_omni.wire import (
    ACTOR_ERROR_FILE,
    EXTRA_KEY,
    MODEL_CLASS_NAME,
    PIPELINE_CLASS,
    WORKER_EXTENSION_CLASS,
    actor_call_failed,
    plain,
    request_extra,
    request_output_to_batch,
)

logger = logging.getLogger(__name__)


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


def _first(result: Any) -> Any:
    """vllm-omni 0.24's collective_rpc returns one entry per stage, each possibly a per-rank list: stage 0, rank 0.
    (Our pipeline has one stage and one rank; results that are lists themselves are wrapped in dicts.)"""
    while isinstance(result, (list, tuple)) and result:
        result = result[0]
    return result


def _empty_cuda_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_acks(verb: str, acks: Any) -> None:
    for ack in acks or []:
        status = getattr(ack, "status", "SUCCESS")
        if status != "SUCCESS":
            raise RuntimeError(f"vllm-omni {verb} failed: {getattr(ack, 'error_msg', None) or ack}")


def _gpu_bytes() -> Optional[int]:
    return torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None


def start_failure(path: str, rollout: RolloutConfig, exc: Exception, gpu_bytes: Optional[int] = None) -> str:
    """Why vllm-omni's engine may not have started: its error, and the pipeline's weights in the rollout's dtype
    (from the safetensors headers) against what the engine may take of the GPU, with the keys to change when they
    do not fit. ``gpu_bytes``: the GPU's memory (default: device 0's, when there is one)."""
    from verl_omni.workers.full_weights import stored_parameter_counts

    message = f"vllm-omni's engine did not start for {path}: {type(exc).__name__}: {str(exc).strip() or '(no message)'}"
    counts = stored_parameter_counts(path) if os.path.isdir(path) else {}
    gpu_bytes = _gpu_bytes() if gpu_bytes is None else gpu_bytes
    if not counts or not gpu_bytes:
        return message + ". The engine's log above says why."
    weights = sum(counts.values()) * resolve_dtype(rollout.dtype).itemsize
    usable = rollout.gpu_memory_utilization * gpu_bytes
    message += (
        f". Its weights take {weights / 1e9:.1f} GB in {rollout.dtype} ({sum(counts.values()) / 1e9:.2f}B parameters); "
        f"the engine may use {usable / 1e9:.1f} GB of this GPU's {gpu_bytes / 1e9:.1f} GB "
        f"(actor_rollout_ref.rollout.gpu_memory_utilization={rollout.gpu_memory_utilization})"
    )
    if weights < usable:
        return message + ". The engine's log above says why."
    return message + (
        ": they do not fit. Load them in bfloat16 (actor_rollout_ref.rollout.dtype=bfloat16; verl-omni-eval "
        "--dtype bfloat16), raise gpu_memory_utilization, or use a GPU with more memory"
    )


class VllmOmniEngine(DiffusionEngine):
    """Runs our RL pipeline inside vllm-omni's diffusion worker, driven through ``AsyncOmni``."""

    def __init__(self, model: ModelConfig, rollout: RolloutConfig, **engine_kwargs: Any):
        super().__init__(model, rollout)
        async_omni_cls, self._sampling_params_cls = _load_vllm_omni()
        self.engine_kwargs = self.build_engine_kwargs(model, rollout, **engine_kwargs)
        try:
            self._omni = async_omni_cls(model=model.path, **self.engine_kwargs)
        except Exception as exc:  # vllm-omni's own message can be empty ("Orchestrator initialization failed: ")
            raise RuntimeError(start_failure(model.path, rollout, exc)) from exc
        self._inflight: dict[str, Optional[str]] = {}  # engine request id -> caller's request id
        self._asleep = False

    # ------------------------------------------------------------------ construction
    @staticmethod
    def build_engine_kwargs(model: ModelConfig, rollout: RolloutConfig, **overrides: Any) -> dict[str, Any]:
        """AsyncOmni keyword arguments (plain values only: vllm-omni puts them in OmegaConf)."""
        lora = model.lora
        pipeline_opts = {
            "pipeline": model.pipeline,
            **model.rollout_kernel_switches,  # read by the worker by these names
            # the family's own options section (actor_rollout_ref.model.<pipeline>), rebuilt by the worker
            "family_options": {k: v for k, v in to_plain(model.family_options).items() if k != "_target_"},
            "lora": None
            if lora is None
            else {"rank": lora.rank, "alpha": lora.alpha, "target_modules": list(lora.target_modules)},
        }
        kwargs: dict[str, Any] = {
            "dtype": rollout.dtype,
            "custom_pipeline_args": {"pipeline_class": PIPELINE_CLASS, EXTRA_KEY: pipeline_opts},
            "worker_extension_cls": WORKER_EXTENSION_CLASS,
            "model_class_name": MODEL_CLASS_NAME,
            "max_num_seqs": int(rollout.max_num_seqs),
            # Let concurrent requests land before the scheduler forms a batch (only with engine-side batching).
            "request_batch_max_wait_ms": 50.0 if rollout.max_num_seqs > 1 else 0.0,
            "enforce_eager": bool(rollout.enforce_eager),
            "gpu_memory_utilization": float(rollout.gpu_memory_utilization),
            "enable_sleep_mode": True,
        }
        kwargs.update(overrides)
        return kwargs

    # ------------------------------------------------------------------ generation
    def build_sampling_params(
        self, seeds: Sequence[int], params: DiffusionSamplingParams, prompts: Optional[Sequence[str]] = None
    ) -> Any:
        """ONE request: ``num_outputs_per_prompt = len(seeds)``, our params and seeds (and the rows' ``prompts``,
        when they differ) in ``extra_args``."""
        kwargs: dict[str, Any] = dict(
            num_inference_steps=params.num_inference_steps,
            height=params.height,
            width=params.width,
            num_outputs_per_prompt=len(seeds),
            seed=int(seeds[0]),
            max_sequence_length=params.max_sequence_length,
            return_trajectory_latents=params.return_trajectory,
            extra_args={EXTRA_KEY: request_extra(seeds, params, prompts)},
        )
        if params.guidance_scale > 1.0:  # true CFG (any family); the request-batch key includes it
            kwargs["true_cfg_scale"] = float(params.guidance_scale)
            kwargs["guidance_scale"] = float(params.guidance_scale)
        return self._sampling_params_cls(**kwargs)

    async def generate(
        self, prompt: str, seeds: list[int], params: DiffusionSamplingParams, request_id: Optional[str] = None
    ) -> RLBatchOutput:
        return await self._request(prompt, self.build_sampling_params(seeds, params), seeds, request_id)

    async def generate_rows(
        self, prompts: list[str], seeds: list[int], params: DiffusionSamplingParams, request_id: Optional[str] = None
    ) -> RLBatchOutput:
        """ONE request whose rows carry their own prompts (``extra_args``); the worker's pipeline runs them as one
        ``rl_generate_rows`` call. One prompt for every row is :meth:`generate`'s request."""
        if len(prompts) != len(seeds):
            raise ValueError(f"generate_rows needs one prompt per seed, got {len(prompts)} prompts and {len(seeds)}")
        if len(set(prompts)) == 1:
            return await self.generate(prompts[0], seeds, params, request_id)
        sampling_params = self.build_sampling_params(seeds, params, prompts)
        return await self._request(prompts[0], sampling_params, seeds, request_id)

    async def _request(
        self, prompt: str, sampling_params: Any, seeds: list[int], request_id: Optional[str]
    ) -> RLBatchOutput:
        if self._asleep:
            raise RuntimeError("engine is asleep: call wake_up() before generate()")
        # vllm-omni needs a unique id per request; the caller's id maps to it so abort(caller_id) reaches it.
        engine_id = f"verl-omni-{uuid.uuid4().hex[:12]}"
        self._inflight[engine_id] = request_id
        final = None
        try:
            async for out in self._omni.generate(prompt, request_id=engine_id, sampling_params_list=[sampling_params]):
                final = out
        finally:
            self._inflight.pop(engine_id, None)
        if final is None:
            raise RuntimeError(f"vllm-omni returned no output for request {engine_id}")
        if getattr(final, "error", None):
            raise RuntimeError(f"vllm-omni request {engine_id} failed: {final.error}")
        return request_output_to_batch(final, seeds)

    # ------------------------------------------------------------------ LoRA
    async def update_lora(self, tensors: dict[str, torch.Tensor]) -> str:
        if self.model.lora is None:
            raise ValueError("update_lora needs an engine built with a LoRA (actor_rollout_ref.model.lora_rank >= 1)")
        payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        return _first(await self._omni.collective_rpc("verl_omni_update_lora", args=(payload,)))

    async def lora_checksum(self) -> Optional[str]:
        if self.model.lora is None:
            return None
        return _first(await self._omni.collective_rpc("verl_omni_lora_checksum"))

    async def take_batch_sizes(self) -> list[int]:
        """Samples per pipeline call since the last ask (shows how engine-side batching grouped requests)."""
        return _first(await self._omni.collective_rpc("verl_omni_take_batch_sizes"))["sizes"]

    async def memory_info(self) -> dict[str, float]:
        """GPU memory as the worker sees it (GiB): free / total / allocated by torch / reserved by torch."""
        return _first(await self._omni.collective_rpc("verl_omni_memory_info"))

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
        sections = {
            name: plain(dataclasses.asdict(section))
            for name, section in (("model", self.model), ("actor", actor), ("rollout", self.rollout))
        }
        payload = {
            **sections,
            "rank": rank,
            "world_size": world_size,
            "address": None if address is None else list(address),
            "lora_seed": int(lora_seed),
            "algorithm": plain(dataclasses.asdict(algorithm) if dataclasses.is_dataclass(algorithm) else algorithm),
        }
        await self._omni.collective_rpc("verl_omni_init_actor", args=(payload,))

    async def actor_call(self, verb: str, *args: Any) -> Any:
        # Arguments and result cross to vllm-omni's worker as files in shared memory: a rollout batch is hundreds
        # of MB, and ``torch.load(weights_only=True)`` reads them back without unpickling code.
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(prefix="verl_omni_actor_", dir=folder) as tmp:
            path_in, path_out = os.path.join(tmp, "args.pt"), os.path.join(tmp, "result.pt")
            torch.save(list(args), path_in)
            await self._omni.collective_rpc("verl_omni_actor_call", args=(verb, path_in, path_out))
            path_error = os.path.join(tmp, ACTOR_ERROR_FILE)
            if os.path.exists(path_error):
                raise actor_call_failed(verb, torch.load(path_error, weights_only=True))
            if not os.path.exists(path_out):
                raise RuntimeError(
                    f"vllm-omni's worker returned no result for the actor's {verb!r} (no {path_out}): the worker "
                    "stopped before it finished; its log above says why"
                )
            return torch.load(path_out, weights_only=True)

    async def shutdown(self) -> None:
        omni, self._omni = self._omni, None
        if omni is not None:
            omni.shutdown()
