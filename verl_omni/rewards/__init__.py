"""Rewards for diffusion RL: a registry of batched reward functions and a weighted manager.

Importing this package registers the built-in rewards: ocr, jpeg / jpeg_compressibility,
jpeg_incompressibility, brightness, redness, temporal_consistency (videos), and the configured ones: pickscore,
clipscore (a local CLIP directory), http (a scoring service). Image rewards score videos frame by frame
(``frames.py``). ``verl_omni.rewards.pool.RewardPool`` scores groups on Ray workers.
"""

from verl_omni.rewards import http, image_stats, jpeg, ocr, pickscore, temporal  # noqa: F401  (register built-ins)
from verl_omni.rewards.registry import (
    RewardComputationError,
    RewardFactory,
    RewardFn,
    RewardManager,
    RewardResult,
    RewardSampleError,
    RewardTimeoutError,
    allowed_entry_keys,
    build_reward_fn,
    get_reward_factory,
    get_reward_fn,
    load_custom_reward_fn,
    register_reward,
    register_reward_factory,
    registered_rewards,
)

__all__ = [
    "RewardComputationError",
    "RewardFactory",
    "RewardFn",
    "RewardManager",
    "RewardResult",
    "RewardSampleError",
    "RewardTimeoutError",
    "allowed_entry_keys",
    "build_reward_fn",
    "get_reward_factory",
    "get_reward_fn",
    "load_custom_reward_fn",
    "register_reward",
    "register_reward_factory",
    "registered_rewards",
]
