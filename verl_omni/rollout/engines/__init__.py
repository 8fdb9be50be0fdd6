"""Engines behind the seam (``base.DiffusionEngine``), by the names ``actor_rollout_ref.rollout.name`` takes.

Each entry is a loader, so naming an engine imports only that engine (``vllm_omni`` needs a GPU stack).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from verl_omni.core.names import ENGINE_NAMES

if TYPE_CHECKING:
    from verl_omni.rollout.engines.base import DiffusionEngine


def _diffusers() -> type[DiffusionEngine]:
    from verl_omni.rollout.engines.diffusers import DiffusersEngine

    return DiffusersEngine


def _vllm_omni() -> type[DiffusionEngine]:
    from verl_omni.rollout.engines.vllm_omni.engine import VllmOmniEngine

    return VllmOmniEngine


ENGINE_REGISTRY: dict[str, Callable[[], type[DiffusionEngine]]] = {"diffusers": _diffusers, "vllm_omni": _vllm_omni}
assert set(ENGINE_REGISTRY) == set(ENGINE_NAMES), "core.names.ENGINE_NAMES must list every registered engine"


def get_engine_class(name: str) -> type[DiffusionEngine]:
    if name not in ENGINE_REGISTRY:
        raise ValueError(f"unknown engine {name!r}; allowed: {sorted(ENGINE_REGISTRY)}")
    return ENGINE_REGISTRY[name]()
