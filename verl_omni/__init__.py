"""verl_omni: a diffusion rollout backend (vllm-omni, diffusers) and FlowGRPO for verl.

Importing this package registers, through verl's public registries only:
- rollout replicas ``vllm_omni`` and ``diffusers`` in ``RolloutReplicaRegistry``;
- the ``diffusion_single_turn`` agent loop in verl's agent-loop registry.
verl imports it in every process (driver, Ray workers) through the ``verl.plugins`` entry point.
"""

from verl_omni.registration import register_all
from verl_omni.version import __version__  # noqa: F401

register_all()
