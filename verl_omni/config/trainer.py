"""The whole run's config: ``data``, ``actor_rollout_ref``, ``reward``, ``algorithm``, ``trainer``.

``FlowGRPOConfig.from_omega(cfg)`` is the one place the YAML (``verl_omni/trainer/config/flowgrpo_trainer.yaml``,
overridable with Hydra) becomes typed sections; every component gets the section it needs from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from verl_omni.algorithms import get_algorithm
from verl_omni.config.actor import ActorConfig
from verl_omni.config.algorithm import AlgorithmConfigBase, algorithm_config_class
from verl_omni.config.base import Section, build, freeze_list, require_choice, require_int, require_number, to_plain
from verl_omni.config.model import ModelConfigBase, model_config_class
from verl_omni.config.rollout import RolloutConfig
from verl_omni.pipelines.registry import TINY_PREFIX, family_names

LOGGERS = ("console", "tensorboard", "wandb", "mlflow", "swanlab", "file")


@dataclass
class DataConfig(Section):
    _prefix = "data"

    train_files: str = "~/data/qwenimage_ocr/train.parquet"
    val_files: Optional[str] = "~/data/qwenimage_ocr/test.parquet"
    prompt_key: str = "prompt"
    train_batch_size: int = 2  # prompts per step (each is sampled rollout.n times)
    val_batch_size: int = 2
    val_max_samples: Optional[int] = 4
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        require_int(self.key("train_batch_size"), self.train_batch_size)
        require_int(self.key("val_batch_size"), self.val_batch_size)


@dataclass
class RewardConfig(Section):
    """Reward entries stay plain dicts: each reward kind takes its own keys (checked by the reward manager)."""

    _prefix = "reward"

    rewards: tuple = ({"name": "ocr", "weight": 1.0},)
    custom_reward_function: dict = field(default_factory=lambda: {"path": None, "name": None})
    # Score each group as it returns, on a pool of Ray reward workers (false: the driver scores the whole batch
    # after the rollout).
    streaming: bool = True
    num_workers: Optional[int] = None  # reward workers; null: the node's cores not used by replicas / agent workers
    # Seconds one reward call may take unless its entry sets timeout_s: a reward that never returns fails the step
    # naming itself (http keeps its own per-request timeout_s, 60 s by default).
    default_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "rewards", freeze_list(self.rewards or ()))
        require_number(self.key("default_timeout_s"), self.default_timeout_s, 0, strict=True)
        if not isinstance(self.streaming, bool):
            raise ValueError(f"{self.key('streaming')}={self.streaming!r} must be true or false")
        if self.num_workers is not None:
            require_int(self.key("num_workers"), self.num_workers)
        self._refuse_all_zero_weights()

    def _refuse_all_zero_weights(self) -> None:
        """Every weight 0: every total reward is 0, every advantage 0, nothing is learned. (Other weight errors are
        the reward manager's to name.)"""
        entries = {f"{self.key('rewards')}[{i}]": entry for i, entry in enumerate(self.rewards)}
        custom = self.custom_reward_function or {}
        if isinstance(custom, dict) and custom.get("path"):
            entries[self.key("custom_reward_function")] = custom
        weights = {f"{key}.weight": e.get("weight", 1.0) for key, e in entries.items() if isinstance(e, dict)}
        zero = [key for key, w in weights.items() if isinstance(w, (int, float)) and not isinstance(w, bool) and w == 0]
        if entries and len(zero) == len(entries):
            raise ValueError(
                f"every reward weight is 0 ({', '.join(zero)}): every total reward would be 0, so every "
                "advantage is 0 and the run learns nothing. Give at least one reward a non-zero weight"
            )

    def as_dict(self) -> dict[str, Any]:
        return {
            "rewards": [dict(r) for r in self.rewards],
            "custom_reward_function": dict(self.custom_reward_function),
            "default_timeout_s": self.default_timeout_s,
        }


@dataclass
class TrainerConfig(Section):
    _prefix = "trainer"

    project_name: str = "verl_omni_flowgrpo"
    experiment_name: str = "qwen_image_ocr_lora"
    logger: tuple[str, ...] = ("console", "tensorboard")
    total_training_steps: int = 2
    save_freq: int = 1  # -1 disables checkpoints
    test_freq: int = -1  # -1 disables validation
    default_local_dir: str = "checkpoints/verl_omni_flowgrpo/qwen_image_ocr_lora"
    # auto: continue the run in default_local_dir (if any) | disable: a new run (refused where another run's
    # checkpoints are) | overwrite: delete that run's checkpoints, then start a new run
    resume_mode: str = "auto"
    sample_images_per_step: int = 4
    nan_policy: str = "stop"  # stop | skip
    max_consecutive_skips: int = 3  # nan_policy=skip: this many refused steps in a row stop the run
    resume_on_damage: str = "fallback"  # fallback (to the newest intact checkpoint, said loudly) | stop
    # Steps in a row whose advantages are all 0 (no learning signal) that stop the run (each warns); 0: never stop
    max_steps_without_signal: int = 3
    seed: int = 0
    ray_num_cpus: Optional[int] = None  # null = this machine's cores (at least 4 logical slots)
    # Placement of the hybrid engine (verl's keys): one replica + one actor rank per GPU (per worker on CPU).
    n_gpus_per_node: int = 1
    nnodes: int = 1

    def __post_init__(self) -> None:
        loggers = (self.logger,) if isinstance(self.logger, str) else freeze_list(self.logger)
        object.__setattr__(self, "logger", tuple(loggers))
        unknown = [name for name in self.logger if name not in LOGGERS]
        if unknown:
            raise ValueError(f"{self.key('logger')} has {unknown}; allowed: {LOGGERS}")
        require_int(self.key("total_training_steps"), self.total_training_steps)
        require_choice(self.key("resume_mode"), self.resume_mode, ("auto", "disable", "overwrite"))
        require_choice(self.key("nan_policy"), self.nan_policy, ("stop", "skip"))
        require_int(self.key("max_consecutive_skips"), self.max_consecutive_skips)
        require_choice(self.key("resume_on_damage"), self.resume_on_damage, ("fallback", "stop"))
        require_int(self.key("max_steps_without_signal"), self.max_steps_without_signal, minimum=0)
        for key in ("save_freq", "test_freq"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
                raise ValueError(f"{self.key(key)}={value!r} must be -1 (off) or an int >= 1")
        require_int(self.key("sample_images_per_step"), self.sample_images_per_step, minimum=0)
        require_int(self.key("n_gpus_per_node"), self.n_gpus_per_node)
        require_int(self.key("nnodes"), self.nnodes)
        if self.ray_num_cpus is not None:
            require_int(self.key("ray_num_cpus"), self.ray_num_cpus)

    @property
    def world_size(self) -> int:
        return self.n_gpus_per_node * self.nnodes


@dataclass
class ActorRolloutRefConfig(Section):
    _prefix = "actor_rollout_ref"

    # verl's key: the actor and the rollout share each GPU (one replica + one actor rank per GPU, the frozen
    # weights held once). false: the split placement (replicas and actor ranks on GPUs of their own).
    hybrid_engine: bool = True
    # (the YAML requires model.path; this default only gives the section its shape)
    model: ModelConfigBase = field(default_factory=lambda: model_config_class()(path=TINY_PREFIX + family_names()[0]))
    actor: ActorConfig = field(default_factory=ActorConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)


@dataclass
class FlowGRPOConfig(Section):
    data: DataConfig = field(default_factory=DataConfig)
    actor_rollout_ref: ActorRolloutRefConfig = field(default_factory=ActorRolloutRefConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    # algorithm.name and one typed section per registered algorithm (config/algorithm.py)
    algorithm: AlgorithmConfigBase = field(default_factory=lambda: algorithm_config_class()())
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    @classmethod
    def from_omega(cls, cfg: Any) -> FlowGRPOConfig:
        return cfg if isinstance(cfg, cls) else build(cls, to_plain(cfg))

    def __post_init__(self) -> None:
        """Checks that span sections."""
        ref = self.actor_rollout_ref
        rollout, actor = ref.rollout, ref.actor
        prefix = "actor_rollout_ref.rollout"
        if ref.model.lora_rank == 0:  # full fine-tuning: the engines' own weights train (workers/full_actor.py)
            if not ref.hybrid_engine:
                raise ValueError(
                    "actor_rollout_ref.model.lora_rank=0 (full fine-tuning) trains the engines' own weights: it needs "
                    "actor_rollout_ref.hybrid_engine=true (the split placement pushes a LoRA to the engines)"
                )
            if actor.kl_coef > 0:
                raise ValueError(
                    f"actor_rollout_ref.actor.kl_coef={actor.kl_coef} needs a reference policy, which full fine-tuning "
                    "(actor_rollout_ref.model.lora_rank=0) would keep as a second copy of every weight: set kl_coef=0, "
                    "or train a LoRA (lora_rank >= 1), whose reference is the base model"
                )
        # The chosen algorithm's checks across sections (rollout.n, the SDE settings it needs ...).
        get_algorithm(self.algorithm.name).check_config(self)
        if ref.hybrid_engine:
            if actor.on_cuda != rollout.on_cuda:
                raise ValueError(
                    f"actor_rollout_ref.hybrid_engine=true colocates each actor rank with a replica: "
                    f"actor_rollout_ref.actor.device={actor.device!r} and {prefix}.device={rollout.device!r} must "
                    "both be cpu or both cuda (or set actor_rollout_ref.hybrid_engine=false)"
                )
            if actor.dtype != rollout.dtype:
                raise ValueError(
                    f"actor_rollout_ref.hybrid_engine=true trains the engine's own weights: "
                    f"actor_rollout_ref.actor.dtype={actor.dtype!r} must equal {prefix}.dtype={rollout.dtype!r}"
                )
            if actor.world_size != 1:
                raise ValueError(
                    f"actor_rollout_ref.actor.world_size={actor.world_size} applies to the split placement only; with "
                    "actor_rollout_ref.hybrid_engine=true the actor has one rank per replica: set "
                    "trainer.n_gpus_per_node (and trainer.nnodes) instead"
                )

    @property
    def num_replicas(self) -> int:
        """Replicas to launch: one per GPU (worker) with the hybrid engine, else ``rollout.num_replicas``."""
        ref = self.actor_rollout_ref
        return self.trainer.world_size if ref.hybrid_engine else ref.rollout.num_replicas
