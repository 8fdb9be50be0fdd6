"""Typed config sections (verl's ``BaseConfig`` style), each validated when built; the YAML twin is
``verl_omni/trainer/config/flowgrpo_trainer.yaml``. ``FlowGRPOConfig.from_omega`` builds the whole tree once."""

from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.model import ModelConfig
from verl_omni.config.rollout import RequestLimits, RolloutConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.config.trainer import FlowGRPOConfig

__all__ = [
    "ActorConfig",
    "DiffusionSamplingParams",
    "FlowGRPOConfig",
    "ModelConfig",
    "OptimConfig",
    "RequestLimits",
    "RolloutConfig",
]
