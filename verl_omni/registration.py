"""Registration with verl's registries (idempotent; called on ``import verl_omni``)."""

from __future__ import annotations


def _load_vllm_omni_replica():
    from verl_omni.rollout.replica import VllmOmniReplica

    return VllmOmniReplica


def _load_diffusers_replica():
    from verl_omni.rollout.replica import DiffusersReplica

    return DiffusersReplica


def register_all() -> None:
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register("vllm_omni", _load_vllm_omni_replica)
    RolloutReplicaRegistry.register("diffusers", _load_diffusers_replica)

    # The agent loop registers itself with verl's ``@register`` decorator on import.
    import verl_omni.agent_loop.diffusion_agent_loop  # noqa: F401
