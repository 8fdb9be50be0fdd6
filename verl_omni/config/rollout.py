"""``actor_rollout_ref.rollout``: the engine replicas, FlowGRPO's SDE sampling and the request limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from verl_omni.config.base import (
    Section,
    freeze_list,
    require_choice,
    require_device,
    require_int,
    require_number,
)
from verl_omni.config.sampling import AUTO, SDE_TYPES, BatchCfg, DiffusionSamplingParams, check_batch_cfg
from verl_omni.core.dtypes import DTYPES
from verl_omni.core.names import AGENT_LOOP_NAME, ENGINE_NAMES


@dataclass
class SdeAlgoConfig(Section):
    _prefix = "actor_rollout_ref.rollout.algo"

    noise_level: float = 0.7
    sde_type: str = "sde"  # sde | cps
    sde_window_size: int = 0  # 0 = every step is stochastic
    sde_window_range: Optional[tuple[int, int]] = None  # [lo, hi] of the window start

    def __post_init__(self) -> None:
        object.__setattr__(self, "sde_window_range", freeze_list(self.sde_window_range))
        require_choice(self.key("sde_type"), self.sde_type, SDE_TYPES)


@dataclass
class PipelineSamplingConfig(Section):
    _prefix = "actor_rollout_ref.rollout.pipeline"

    true_cfg_scale: float = 1.0
    # The rollout's CFG branches in one forward of 2B rows: true, false or "auto" (batched unless the engine's fused
    # attention kernel would then need a mask; pipelines/model_inputs.py). The actor has its own actor.batch_cfg.
    batch_cfg: BatchCfg = AUTO
    negative_prompt: Optional[str] = None
    num_inference_steps: int = 10
    height: int = 64
    width: int = 64
    max_sequence_length: int = 64

    def __post_init__(self) -> None:
        check_batch_cfg(self.key("batch_cfg"), self.batch_cfg)


@dataclass
class ValKwargs(Section):
    """Overrides for validation rollouts (e.g. deterministic ODE sampling with more steps)."""

    _prefix = "actor_rollout_ref.rollout.val_kwargs"

    n: int = 1
    noise_level: float = 0.0
    num_inference_steps: Optional[int] = None

    def __post_init__(self) -> None:
        require_int(self.key("n"), self.n)


@dataclass
class AgentConfig(Section):
    _prefix = "actor_rollout_ref.rollout.agent"

    num_workers: int = 1
    default_agent_loop: str = AGENT_LOOP_NAME

    def __post_init__(self) -> None:
        require_int(self.key("num_workers"), self.num_workers)


@dataclass
class RequestLimits(Section):
    """What one server request may ask for; larger requests are refused (HTTP 422 / ValueError naming the limit)
    before the engine is touched. The defaults fit the recipe with room to spare on an 80 GB GPU."""

    _prefix = "actor_rollout_ref.rollout.limits"

    max_num_outputs_per_prompt: int = 64
    max_pixels: int = 1024 * 1024  # height x width
    max_inference_steps: int = 100
    max_prompt_chars: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_num_outputs_per_prompt", "max_pixels", "max_inference_steps", "max_prompt_chars"):
            require_int(self.key(name), getattr(self, name))


@dataclass
class RolloutConfig(Section):
    _prefix = "actor_rollout_ref.rollout"

    name: str = "diffusers"  # vllm_omni (GPU) | diffusers (in-process; CPU default)
    n: int = 4
    enable_batched_diffusion: bool = True
    # Split placement only: replicas are hand-set. With the hybrid engine there is one per GPU (derived).
    num_replicas: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 42
    max_num_seqs: int = 1
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.9
    free_cache_engine: bool = True  # split placement: sleep the engines while the actor trains
    server_port_base: Optional[int] = None
    request_timeout_s: float = 600.0
    algo: SdeAlgoConfig = field(default_factory=SdeAlgoConfig)
    pipeline: PipelineSamplingConfig = field(default_factory=PipelineSamplingConfig)
    val_kwargs: ValKwargs = field(default_factory=ValKwargs)
    agent: AgentConfig = field(default_factory=AgentConfig)
    limits: RequestLimits = field(default_factory=RequestLimits)

    def __post_init__(self) -> None:
        require_choice(self.key("name"), self.name, ENGINE_NAMES)
        for key in ("n", "num_replicas", "max_num_seqs"):
            require_int(self.key(key), getattr(self, key))
        require_device(self.key("device"), self.device)
        require_choice(self.key("dtype"), self.dtype, DTYPES)
        require_number(self.key("request_timeout_s"), self.request_timeout_s, 0, strict=True)
        if not (isinstance(self.gpu_memory_utilization, (int, float)) and 0 < self.gpu_memory_utilization <= 1):
            raise ValueError(f"{self.key('gpu_memory_utilization')}={self.gpu_memory_utilization!r} must be in (0, 1]")
        try:
            self.sampling_params().validate()
            self.sampling_params(validate=True).validate()
        except ValueError as exc:
            raise ValueError(f"{self._prefix}: {exc}") from None

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sampling_params(self, validate: bool = False) -> DiffusionSamplingParams:
        """Sampling params for a training (or, with validate=True, a validation) rollout."""
        p, a = self.pipeline, self.algo
        params = DiffusionSamplingParams(
            num_inference_steps=p.num_inference_steps,
            height=p.height,
            width=p.width,
            guidance_scale=float(p.true_cfg_scale),
            batch_cfg=p.batch_cfg,
            negative_prompt=p.negative_prompt,
            max_sequence_length=p.max_sequence_length,
            noise_level=float(a.noise_level),
            sde_type=a.sde_type,
            sde_window_size=a.sde_window_size,
            sde_window_range=tuple(a.sde_window_range) if a.sde_window_range is not None else None,
            trajectory_window_only=True,  # the actor reads only the window's transitions
        )
        if validate:
            v = self.val_kwargs
            steps = v.num_inference_steps or p.num_inference_steps
            params = params.replace(
                noise_level=float(v.noise_level),
                num_inference_steps=steps,
                sde_window_size=0,
                sde_window_range=None,
                return_trajectory=False,
            )
        return params
