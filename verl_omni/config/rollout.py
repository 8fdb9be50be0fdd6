"""Diffusion rollout config: the ``actor_rollout_ref.rollout`` section, as a dataclass with a yaml twin.

``configs/flowgrpo_trainer.yaml`` holds the same keys and defaults; ``DiffusionRolloutConfig.from_omega``
turns the Hydra section into this dataclass and validates it, naming the key on any bad value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from verl_omni.config.sampling import SDE_TYPES, DiffusionSamplingParams

ENGINE_NAMES = ("vllm_omni", "diffusers")
PREFIX = "actor_rollout_ref.rollout"


@dataclass
class SdeAlgoConfig:
    noise_level: float = 0.7
    sde_type: str = "sde"
    sde_window_size: int = 0
    sde_window_range: Optional[list[int]] = None


@dataclass
class PipelineSamplingConfig:
    true_cfg_scale: float = 1.0
    negative_prompt: Optional[str] = None
    num_inference_steps: int = 10
    height: int = 64
    width: int = 64
    max_sequence_length: int = 64


@dataclass
class ValKwargs:
    """Overrides for validation rollouts (e.g. deterministic ODE sampling with more steps)."""

    n: int = 1
    noise_level: float = 0.0
    num_inference_steps: Optional[int] = None


@dataclass
class AgentConfig:
    num_workers: int = 1
    default_agent_loop: str = "diffusion_single_turn"


@dataclass
class DiffusionRolloutConfig:
    name: str = "diffusers"
    n: int = 4
    enable_batched_diffusion: bool = True
    num_replicas: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 42
    max_num_seqs: int = 1
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.9
    free_cache_engine: bool = True
    server_port_base: Optional[int] = None
    request_timeout_s: float = 600.0
    algo: SdeAlgoConfig = field(default_factory=SdeAlgoConfig)
    pipeline: PipelineSamplingConfig = field(default_factory=PipelineSamplingConfig)
    val_kwargs: ValKwargs = field(default_factory=ValKwargs)
    agent: AgentConfig = field(default_factory=AgentConfig)

    @classmethod
    def from_omega(cls, section: Any) -> "DiffusionRolloutConfig":
        data = _to_plain(section)
        cfg = _build(cls, data, PREFIX)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.name not in ENGINE_NAMES:
            raise ValueError(f"{PREFIX}.name={self.name!r} is not one of {ENGINE_NAMES}")
        for key in ("n", "num_replicas", "max_num_seqs"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{PREFIX}.{key}={value!r} must be an int >= 1")
        if self.algo.sde_type not in SDE_TYPES:
            raise ValueError(f"{PREFIX}.algo.sde_type={self.algo.sde_type!r} is not one of {SDE_TYPES}")
        n = self.val_kwargs.n
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{PREFIX}.val_kwargs.n={n!r} must be an int >= 1")
        try:
            self.sampling_params().validate()
            self.sampling_params(validate=True).validate()
        except ValueError as exc:
            raise ValueError(f"{PREFIX}: {exc}") from None

    def sampling_params(self, validate: bool = False) -> DiffusionSamplingParams:
        """Sampling params for a training (or, with validate=True, a validation) rollout."""
        p, a = self.pipeline, self.algo
        params = DiffusionSamplingParams(
            num_inference_steps=p.num_inference_steps,
            height=p.height,
            width=p.width,
            guidance_scale=float(p.true_cfg_scale),
            negative_prompt=p.negative_prompt,
            max_sequence_length=p.max_sequence_length,
            noise_level=float(a.noise_level),
            sde_type=a.sde_type,
            sde_window_size=a.sde_window_size,
            sde_window_range=tuple(a.sde_window_range) if a.sde_window_range is not None else None,
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


def _to_plain(section: Any) -> dict:
    if section is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(section):
            return OmegaConf.to_container(section, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf ships with verl
        pass
    if dataclasses.is_dataclass(section):
        return dataclasses.asdict(section)
    return dict(section)


def _build(cls, data: dict, prefix: str):
    """Recursively build a dataclass, rejecting unknown keys with their full dotted name."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown keys {[f'{prefix}.{k}' for k in unknown]}; allowed: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        default = known[name].default_factory() if known[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            kwargs[name] = _build(type(default), value, f"{prefix}.{name}")
        else:
            kwargs[name] = value
    return cls(**kwargs)
