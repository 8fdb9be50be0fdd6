"""Start-up checks of the whole trainer config: each failure names the key and the allowed values."""

from __future__ import annotations

from typing import Any

from verl_omni.config.rollout import DiffusionRolloutConfig
from verl_omni.pipelines import PIPELINE_REGISTRY

LOGGERS = ("console", "tensorboard", "wandb", "mlflow", "swanlab", "file")


def _positive_int(key: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} must be an int >= {minimum}")


def _number(key: str, value: Any, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > minimum if strict else value >= minimum)
    if not ok:
        raise ValueError(f"{key}={value!r} must be a number {'>' if strict else '>='} {minimum}")


def check_config(cfg: Any) -> DiffusionRolloutConfig:
    """Validate ``cfg`` (an OmegaConf tree); returns the parsed rollout section."""
    model, actor = cfg.actor_rollout_ref.model, cfg.actor_rollout_ref.actor
    if not model.get("path"):
        raise ValueError("actor_rollout_ref.model.path must be set (a diffusers pipeline dir, or tiny:qwen_image / tiny:sd3)")
    if model.pipeline not in PIPELINE_REGISTRY:
        raise ValueError(f"actor_rollout_ref.model.pipeline={model.pipeline!r} is not one of {sorted(PIPELINE_REGISTRY)}")
    _positive_int("actor_rollout_ref.model.lora_rank", model.lora_rank)
    _number("actor_rollout_ref.model.lora_alpha", model.lora_alpha, 0, strict=True)
    _number("actor_rollout_ref.actor.optim.lr", actor.optim.lr, 0)
    _number("actor_rollout_ref.actor.clip_ratio", actor.clip_ratio, 0, strict=True)
    _number("actor_rollout_ref.actor.kl_coef", actor.kl_coef, 0)
    _number("actor_rollout_ref.actor.grad_clip", actor.grad_clip, 0, strict=True)
    _positive_int("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", actor.ppo_micro_batch_size_per_gpu)
    _positive_int("actor_rollout_ref.actor.ppo_epochs", actor.ppo_epochs)
    _positive_int("actor_rollout_ref.actor.world_size", actor.world_size)
    if actor.adv_clip_max is not None:
        _number("actor_rollout_ref.actor.adv_clip_max", actor.adv_clip_max, 0, strict=True)
    rollout = DiffusionRolloutConfig.from_omega(cfg.actor_rollout_ref.rollout)

    _positive_int("data.train_batch_size", cfg.data.train_batch_size)
    _positive_int("data.val_batch_size", cfg.data.val_batch_size)

    t = cfg.trainer
    _positive_int("trainer.total_training_steps", t.total_training_steps)
    if t.resume_mode not in ("auto", "disable"):
        raise ValueError(f"trainer.resume_mode={t.resume_mode!r} is not one of ('auto', 'disable')")
    if t.nan_policy not in ("stop", "skip"):
        raise ValueError(f"trainer.nan_policy={t.nan_policy!r} is not one of ('stop', 'skip')")
    loggers = [t.logger] if isinstance(t.logger, str) else list(t.logger)
    unknown = [name for name in loggers if name not in LOGGERS]
    if unknown:
        raise ValueError(f"trainer.logger has {unknown}; allowed: {LOGGERS}")
    for key in ("save_freq", "test_freq"):
        value = t.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            raise ValueError(f"trainer.{key}={value!r} must be -1 (off) or an int >= 1")
    return rollout
