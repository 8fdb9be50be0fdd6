"""Test helpers: the trainer config with overrides, and rollout batches in verl's layout."""

from __future__ import annotations

import os

import numpy as np
from omegaconf import OmegaConf
from verl import DataProto

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "flowgrpo_trainer.yaml")


def make_config(overrides: dict | None = None):
    cfg = OmegaConf.load(CONFIG)
    for key, value in (overrides or {}).items():
        OmegaConf.update(cfg, key, value, merge=False)
    OmegaConf.set_struct(cfg, True)
    return cfg


def prompt_batch(prompts: list[str], n: int, tag: str = "t") -> DataProto:
    raw = np.empty(len(prompts), dtype=object)
    for i, p in enumerate(prompts):
        raw[i] = [{"role": "user", "content": p}]
    uid = np.array([f"{tag}-{i}" for i in range(len(prompts))], dtype=object)
    data = DataProto.from_dict(non_tensors={"raw_prompt": raw, "uid": uid})
    return data.repeat(repeat_times=n, interleave=True)
