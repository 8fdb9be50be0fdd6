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
    assert out == [
        "VllmOmniReplica",
        "DiffusersReplica",
        "verl_omni.agent_loop.diffusion_agent_loop.DiffusionAgentLoop",
    ]


def test_readme_check_prints_our_class():
    code = (
        "import verl_omni; from verl.workers.rollout.replica import RolloutReplicaRegistry as R; "
        "print(R.get('vllm_omni'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "verl_omni.rollout.replica.VllmOmniReplica" in out


def test_registry_lookup_inside_a_fresh_ray_worker_goes_through_verls_plugin_hook(ray_session):
    # A runtime env of its own: Ray starts a new worker process for it (workers are pooled per runtime env).
    @ray.remote(num_cpus=0, runtime_env={"env_vars": {"VERL_OMNI_TEST_FRESH_WORKER": "1"}})
    def lookup():
        import sys as worker_sys

        before = "verl_omni" in worker_sys.modules
        import verl  # noqa: F401  only verl: its plugin loader must import verl_omni by itself

        after = "verl_omni" in worker_sys.modules
        from verl.workers.rollout.replica import RolloutReplicaRegistry

        names = (
            RolloutReplicaRegistry.get("vllm_omni").__qualname__,
            RolloutReplicaRegistry.get("diffusers").__qualname__,
        )
        return before, after, names

    before, after, names = ray.get(lookup.remote())
    assert (before, after) == (False, True)  # imported by `import verl`, not by the worker's own start-up
    assert names == ("VllmOmniReplica", "DiffusersReplica")
