"""Start-up checks of the whole trainer config: each failure names the key and the allowed values."""

from __future__ import annotations

from typing import Any

from verl_omni.config.rollout import DiffusionRolloutConfig
from verl_omni.pipelines import PIPELINE_REGISTRY

DTYPES = ("float32", "bfloat16", "float16")
LOGGERS = ("console", "tensorboard", "wandb", "mlflow", "swanlab", "file")


def _positive_int(key: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={value!r} must be an int >= {minimum}")


def _number(key: str, value: Any, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > minimum if strict else value >= minimum)
    if not ok:
        raise ValueError(f"{key}={value!r} must be a number {'>' if strict else '>='} {minimum}")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not one of {allowed}")


def _device(key: str, value: Any) -> None:
    if not isinstance(value, str) or not (value == "cpu" or value == "cuda" or value.startswith("cuda:")):
        raise ValueError(f"{key}={value!r} must be 'cpu', 'cuda' or 'cuda:<index>'")


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
    _choice("actor_rollout_ref.actor.dtype", actor.dtype, DTYPES)
    _device("actor_rollout_ref.actor.device", actor.device)
    rollout = DiffusionRolloutConfig.from_omega(cfg.actor_rollout_ref.rollout)
    prefix = "actor_rollout_ref.rollout"
    _choice(f"{prefix}.dtype", rollout.dtype, DTYPES)
    _device(f"{prefix}.device", rollout.device)
    _number(f"{prefix}.request_timeout_s", rollout.request_timeout_s, 0, strict=True)
    if not 0 < rollout.gpu_memory_utilization <= 1:
        raise ValueError(f"{prefix}.gpu_memory_utilization={rollout.gpu_memory_utilization!r} must be in (0, 1]")
    _positive_int(f"{prefix}.agent.num_workers", rollout.agent.num_workers)
    if not rollout.algo.noise_level > 0:
        raise ValueError(f"{prefix}.algo.noise_level={rollout.algo.noise_level!r} must be > 0 for training "
                         "(0 is the deterministic sampler: no log-probs to train on; use it in val_kwargs)")
    steps = rollout.pipeline.num_inference_steps
    size = rollout.algo.sde_window_size
    last_start = steps - size if rollout.algo.sde_window_range is None else rollout.algo.sde_window_range[1]
    window_reaches_end = size == 0 or last_start + size >= steps
    if rollout.algo.sde_type == "cps" and actor.kl_coef > 0 and window_reaches_end:
        raise ValueError(
            f"{prefix}.algo.sde_type='cps' with actor_rollout_ref.actor.kl_coef>0 needs an SDE window that ends "
            f"before the last step (cps has zero noise there, so the KL divides by 0): set {prefix}.algo."
            "sde_window_size / sde_window_range, or kl_coef=0"
        )

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
