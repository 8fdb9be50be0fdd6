"""Rewards for diffusion RL: a registry of batched reward functions and a weighted manager.

Importing this package registers the built-in rewards: ocr, jpeg / jpeg_compressibility,
jpeg_incompressibility, brightness, redness.
"""

from verl_omni.rewards import image_stats, jpeg, ocr  # noqa: F401  (register built-ins)
from verl_omni.rewards.registry import (
    RewardComputationError,
    RewardFn,
    RewardManager,
    RewardResult,
    RewardTimeoutError,
    get_reward_fn,
    load_custom_reward_fn,
    register_reward,
    registered_rewards,
)

__all__ = [
    "RewardComputationError",
    "RewardFn",
    "RewardManager",
    "RewardResult",
    "RewardTimeoutError",
    "get_reward_fn",
    "load_custom_reward_fn",
    "register_reward",
    "registered_rewards",
]
