"""Engine faults with the real vllm-omni engine (GPU): a killed server actor fails the rollout fast and by
name, bad requests are refused before the engine runs, and a new replica serves again afterwards."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import pytest
import ray
from gpu_helpers import requires_cuda, requires_vllm_omni, write_figures

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import make_config, start_servers  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_cuda, requires_vllm_omni]
PROMPT = "a red bicycle leaning on a blue wall"
SP = {"num_inference_steps": 24, "height": 256, "width": 256}


def _config(model_dir):
    return make_config(
        {
            "actor_rollout_ref.model.path": model_dir,
            "actor_rollout_ref.model.lora_rank": 4,
            "actor_rollout_ref.rollout.name": "vllm_omni",
            "actor_rollout_ref.rollout.device": "cuda",
            "actor_rollout_ref.actor.device": "cuda",
            "actor_rollout_ref.rollout.dtype": "bfloat16",
            "actor_rollout_ref.actor.dtype": "bfloat16",  # the hybrid engine (the default) trains the engine's dtype
            "actor_rollout_ref.rollout.enforce_eager": True,
            "actor_rollout_ref.rollout.gpu_memory_utilization": 0.3,
        }
    )


def test_killed_vllm_omni_server_fails_the_request_fast_and_a_new_replica_serves(gpu_qwen_image_dir):
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    loop = asyncio.new_event_loop()
    figures = {}
    _, manager, client = start_servers(loop, _config(gpu_qwen_image_dir))
    try:
        with pytest.raises(Exception, match="num_outputs_per_prompt"):
            loop.run_until_complete(manager.replicas[0].server_handle.generate_batched.remote("bad", PROMPT, 0, [], SP))
        assert loop.run_until_complete(manager.stats())[0]["engine_calls"] == 0

        server = manager.replicas[0].server_handle
        killer = threading.Timer(2.0, lambda: ray.kill(server))
        killer.start()
        start = time.perf_counter()
        with pytest.raises(RuntimeError, match="died during request"):
            loop.run_until_complete(
                client.generate_batched("g1", prompt=PROMPT, seeds=list(range(16)), sampling_params=SP)
            )
        figures["seconds_to_error_after_start"] = time.perf_counter() - start
        assert figures["seconds_to_error_after_start"] < 60
    finally:
        loop.run_until_complete(manager.shutdown())

    _, fresh, fresh_client = start_servers(loop, _config(gpu_qwen_image_dir))
    try:
        out = loop.run_until_complete(
            fresh_client.generate_batched(
                "g2", prompt=PROMPT, seeds=[1, 2], sampling_params={**SP, "num_inference_steps": 4}
            )
        )
        assert out["seeds"] == [1, 2] and out["media"].shape[0] == 2
    finally:
        loop.run_until_complete(fresh.shutdown())
        loop.close()
    write_figures("gpu_engine_faults.json", figures)
