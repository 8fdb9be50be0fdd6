"""verl finds our rollout backends by name, in the driver and inside Ray workers (via verl.plugins)."""

import subprocess
import sys

import ray

CHECK = (
    "import verl\n"  # only verl: the verl.plugins entry point must import verl_omni by itself
    "from verl.workers.rollout.replica import RolloutReplicaRegistry as R\n"
    "from verl.experimental.agent_loop.agent_loop import _agent_loop_registry as A\n"
    "print(R.get('vllm_omni').__name__, R.get('diffusers').__name__, A['diffusion_single_turn']['_target_'])\n"
)


def test_plain_import_of_verl_registers_our_replicas():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["VllmOmniReplica", "DiffusersReplica", "verl_omni.agent_loop.diffusion_agent_loop.DiffusionAgentLoop"]


def test_readme_check_prints_our_class():
    code = "import verl_omni; from verl.workers.rollout.replica import RolloutReplicaRegistry as R; print(R.get('vllm_omni'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "verl_omni.rollout.replica.VllmOmniReplica" in out


def test_registry_lookup_inside_a_ray_worker(ray_session):
    @ray.remote(num_cpus=0)
    def lookup():
        # A fresh worker process: nothing of ours imported yet except through verl's plugin hook.
        import sys as worker_sys

        before = "verl_omni" in worker_sys.modules
        from verl.workers.rollout.replica import RolloutReplicaRegistry

        return before, RolloutReplicaRegistry.get("vllm_omni").__qualname__, RolloutReplicaRegistry.get("diffusers").__qualname__

    _, vllm_name, diffusers_name = ray.get(lookup.remote())
    assert (vllm_name, diffusers_name) == ("VllmOmniReplica", "DiffusersReplica")
