"""``actor_rollout_ref.rollout``: the engine replicas, FlowGRPO's SDE sampling and the request limits."""

from __future__ import annotations

from collections.abc import Mapping
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

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # seeds: what a torch generator's manual_seed and numpy take as one value


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
    vae_decode_batch: int = 0  # rows per VAE decode call; 0: all of a call's rows at once (config/sampling.py)

    def __post_init__(self) -> None:
        check_batch_cfg(self.key("batch_cfg"), self.batch_cfg)
        require_int(self.key("vae_decode_batch"), self.vae_decode_batch, minimum=0)


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


# How a server request names its fields in errors; the start-up check passes the config keys instead.
REQUEST_FIELDS = {
    "n": "num_outputs_per_prompt",
    "height": "height",
    "width": "width",
    "num_inference_steps": "num_inference_steps",
}


def request_budget(n: int, height: int, width: int, num_inference_steps: int) -> int:
    """What ``limits.max_images_pixels_steps`` bounds: N x height x width x (num_inference_steps + 1)."""
    return n * height * width * (num_inference_steps + 1)


@dataclass
class RequestLimits(Section):
    """What one server request may ask for; larger requests are refused (HTTP 422 / ValueError naming the limit)
    before the engine is touched. The defaults fit the recipe with room to spare on an 80 GB GPU.

    ``max_images_pixels_steps`` bounds N x height x width x (num_inference_steps + 1) of one request: its denoising
    work (image tokens x steps, the VAE decode of the N images counted as one more pass) and the host memory of
    its result: the latent trajectory (steps + 1 latents per image; Qwen-Image's 16-channel latents at 1/8 of each
    side take height x width bytes each in float32) and the decoded images. Each other limit bounds one factor
    alone, so together they let through 64 images of 1024^2 at 100 steps; the default 10^8 holds the shipped
    recipes (16 x 512^2 x 11 = 4.6e7 on GPU, 8 x 64^2 x 7 on CPU) and refuses 64 x 1024^2 at 2 steps (2.0e8).
    """

    _prefix = "actor_rollout_ref.rollout.limits"

    max_num_outputs_per_prompt: int = 64
    max_pixels: int = 1024 * 1024  # height x width
    max_inference_steps: int = 100
    max_prompt_chars: int = 4096
    max_images_pixels_steps: int = 100_000_000  # N x height x width x (num_inference_steps + 1)

    def __post_init__(self) -> None:
        for name in (
            "max_num_outputs_per_prompt",
            "max_pixels",
            "max_inference_steps",
            "max_prompt_chars",
            "max_images_pixels_steps",
        ):
            require_int(self.key(name), getattr(self, name))

    def check(self, n: int, params: DiffusionSamplingParams, names: Mapping[str, str] = REQUEST_FIELDS) -> None:
        """Raise ``ValueError`` naming the field (``names`` maps n / height / width / num_inference_steps to the
        names the caller knows them by) and the limit key, for a request of ``n`` images with ``params``."""
        if not 1 <= n <= self.max_num_outputs_per_prompt:
            raise ValueError(
                f"{names['n']}={n} must be in [1, {self.max_num_outputs_per_prompt}] "
                f"({self.key('max_num_outputs_per_prompt')})"
            )
        h, w, steps = params.height, params.width, params.num_inference_steps
        if h * w > self.max_pixels:
            raise ValueError(
                f"{names['height']} x {names['width']} = {h} x {w} = {h * w} pixels; the limit is "
                f"{self.max_pixels} ({self.key('max_pixels')})"
            )
        if steps > self.max_inference_steps:
            raise ValueError(
                f"{names['num_inference_steps']}={steps}; the limit is {self.max_inference_steps} "
                f"({self.key('max_inference_steps')})"
            )
        budget = request_budget(n, h, w, steps)
        if budget > self.max_images_pixels_steps:
            raise ValueError(
                f"{names['n']} x {names['height']} x {names['width']} x ({names['num_inference_steps']} + 1) = "
                f"{n} x {h} x {w} x {steps + 1} = {budget}; the limit is {self.max_images_pixels_steps} "
                f"({self.key('max_images_pixels_steps')}): fewer or smaller images, or fewer steps, per request"
            )


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
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not INT64_MIN <= self.seed <= INT64_MAX:
            raise ValueError(f"{self.key('seed')}={self.seed!r} must be an int in [-2**63, 2**63 - 1]")
        try:
            self.sampling_params().validate()
            self.sampling_params(validate=True).validate()
        except ValueError as exc:
            raise ValueError(f"{self._prefix}: {exc}") from None
        self.check_requests_fit_limits()

    def check_requests_fit_limits(self) -> None:
        """The requests this config sends (a training group, a validation group) against ``limits``, so a config the
        servers would refuse at the first rollout fails at start-up, naming its keys and the limit key."""
        p, v = self.key("pipeline"), self.key("val_kwargs")
        for validate, n_key in ((False, self.key("n")), (True, f"{v}.n")):
            n = self.val_kwargs.n if validate else self.n
            steps_key = f"{v}.num_inference_steps" if validate and self.val_kwargs.num_inference_steps else None
            names = {
                "n": n_key,
                "height": f"{p}.height",
                "width": f"{p}.width",
                "num_inference_steps": steps_key or f"{p}.num_inference_steps",
            }
            if not self.enable_batched_diffusion:  # each of the n samples is a request of its own
                n, names["n"] = 1, f"1 (with {self.key('enable_batched_diffusion')}=false)"
            self.limits.check(n, self.sampling_params(validate=validate), names)

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
            vae_decode_batch=p.vae_decode_batch,
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
