"""Test helpers: the trainer config with overrides, and rollout batches in verl's layout."""

from __future__ import annotations

import os

import numpy as np
from omegaconf import OmegaConf
from verl import DataProto

CONFIG = os.path.join(os.path.dirname(__file__), "..", "verl_omni", "trainer", "config", "flowgrpo_trainer.yaml")
PRESETS = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "configs"))


def make_config(overrides: dict | None = None):
    cfg = OmegaConf.load(CONFIG)
    for key, value in (overrides or {}).items():
        OmegaConf.update(cfg, key, value, merge=False)
    OmegaConf.set_struct(cfg, True)
    return cfg


def compose_preset(name: str, overrides: list[str] | tuple = (), config_dir: str = PRESETS):
    """A recipe preset of configs/ (or the packaged config, name ``flowgrpo_trainer``) composed by Hydra as
    ``main_flowgrpo --config-dir configs --config-name <name> <overrides>`` composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(name, overrides=list(overrides))


def prompt_batch(prompts: list[str], n: int, tag: str = "t") -> DataProto:
    raw = np.empty(len(prompts), dtype=object)
    for i, p in enumerate(prompts):
        raw[i] = [{"role": "user", "content": p}]
    uid = np.array([f"{tag}-{i}" for i in range(len(prompts))], dtype=object)
    data = DataProto.from_dict(non_tensors={"raw_prompt": raw, "uid": uid})
    return data.repeat(repeat_times=n, interleave=True)


def trainer_config(data_files: tuple[str, str], model_dir: str, out_dir, **extra):
    """A small FlowGRPO run on the tiny model: 2 prompts x n=4, 4 steps, brightness reward, no checkpoints."""
    train, test = data_files
    return make_config(
        {
            "data.train_files": train,
            "data.val_files": test,
            "data.train_batch_size": 2,
            "actor_rollout_ref.model.path": model_dir,
            "actor_rollout_ref.model.lora_rank": 4,
            "actor_rollout_ref.model.lora_alpha": 8,
            "actor_rollout_ref.actor.optim.lr": 1e-2,
            "actor_rollout_ref.rollout.n": 4,
            "actor_rollout_ref.rollout.pipeline.num_inference_steps": 4,
            "actor_rollout_ref.rollout.algo.sde_window_size": 2,
            "reward.rewards": [{"name": "brightness", "weight": 1.0}],
            "trainer.logger": ["console"],
            "trainer.save_freq": -1,
            "trainer.sample_images_per_step": 0,
            "trainer.default_local_dir": str(out_dir),
            **extra,
        }
    )


def model_config(model_dir: str, **overrides):
    """``actor_rollout_ref.model`` for a pipeline dir (a LoRA of rank 4 unless overridden)."""
    from verl_omni.config.model import ModelConfig

    return ModelConfig(**{"path": model_dir, "lora_rank": 4, "lora_alpha": 8.0, **overrides})


def rollout_config(**overrides):
    """``actor_rollout_ref.rollout`` with overrides given as nested dicts (e.g. ``limits={...}``)."""
    from verl_omni.config.base import build
    from verl_omni.config.rollout import RolloutConfig

    return build(RolloutConfig, overrides)


def start_servers(loop, cfg):
    """Launch the replicas of a (Hydra) config the way the trainer does; returns (parsed config, manager, client)."""
    from verl_omni.agent_loop.diffusion_agent_loop import DiffusionServerClient
    from verl_omni.config.trainer import FlowGRPOConfig
    from verl_omni.rollout.server_manager import DiffusionServerManager

    parsed = FlowGRPOConfig.from_omega(cfg)
    ref = parsed.actor_rollout_ref
    manager = loop.run_until_complete(DiffusionServerManager(ref.rollout, ref.model, parsed.num_replicas).start())
    return parsed, manager, DiffusionServerClient(config=parsed, load_balancer_handle=manager.load_balancer)


def num_rows(records) -> int:
    """Rows of a list of rollout records (``RLBatchOutput``)."""
    return sum(r.batch_size for r in records)


def records_data_proto(records, non_tensor: dict, metrics: dict | None = None):
    """Rollout records (``RLBatchOutput``, e.g. ``rl_generate`` results) as verl's ``DataProto``, filling the batch's
    rows in order, as the agent loop does."""
    from verl_omni.agent_loop.diffusion_agent_loop import records_to_data_proto

    parts, start = [], 0
    for record in records:
        parts.append((list(range(start, start + record.batch_size)), record))
        start += record.batch_size
    return records_to_data_proto(parts, non_tensor, metrics or {})
