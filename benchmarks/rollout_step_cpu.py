"""Wall time of one rollout step through the agent loop: batched B=N groups vs per-row calls (flag off).

Runs the real stack (Ray, verl's load balancer, agent-loop worker, server actor, diffusers engine) on the tiny
random Qwen-Image, side by side in one process, and writes JSON:
    python benchmarks/rollout_step_cpu.py --out docs/benchmarks/rollout_step_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time

import ray
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import make_config, prompt_batch  # noqa: E402

from verl_omni.agent_loop.diffusion_agent_loop import DiffusionAgentLoopManager  # noqa: E402
from verl_omni.pipelines.tiny import tiny_model_dir  # noqa: E402
from verl_omni.rollout.server_manager import DiffusionServerManager  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="docs/benchmarks/rollout_step_cpu.json")
    args = parser.parse_args()

    overrides = {
        "actor_rollout_ref.model.path": tiny_model_dir("qwen_image"),
        "actor_rollout_ref.model.lora_rank": 4,
        "actor_rollout_ref.rollout.n": args.n,
        "actor_rollout_ref.rollout.pipeline.num_inference_steps": args.steps,
        "actor_rollout_ref.rollout.pipeline.height": args.size,
        "actor_rollout_ref.rollout.pipeline.width": args.size,
    }
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    loop = asyncio.new_event_loop()
    servers = loop.run_until_complete(DiffusionServerManager(make_config(overrides)).start())
    managers = {
        flag: DiffusionAgentLoopManager.create(
            make_config({**overrides, "actor_rollout_ref.rollout.enable_batched_diffusion": flag}), servers.get_client()
        )
        for flag in (True, False)
    }
    prompts = [f'a poster that says "word {i}"' for i in range(args.prompts)]
    times: dict[bool, list[float]] = {True: [], False: []}
    for repeat in range(args.repeats + 1):  # the first round warms up both paths and is dropped
        for flag in (True, False):
            start = time.perf_counter()
            loop.run_until_complete(managers[flag].generate_sequences(prompt_batch(prompts, args.n, tag=f"r{repeat}")))
            if repeat:
                times[flag].append(time.perf_counter() - start)
    loop.run_until_complete(servers.shutdown())
    images = args.n * args.prompts
    batched, per_row = statistics.median(times[True]), statistics.median(times[False])
    result = {
        "benchmark": "one rollout step through the diffusion agent loop (tiny random Qwen-Image, diffusers engine)",
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}",
        "load_average_1min_at_end": os.getloadavg()[0],
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "config": {
            "n": args.n,
            "prompts": args.prompts,
            "images_per_step": images,
            "num_inference_steps": args.steps,
            "height": args.size,
            "width": args.size,
            "replicas": 1,
            "repeats": args.repeats,
        },
        "seconds_median": {"batched": batched, "per_row": per_row},
        "seconds_all": {"batched": times[True], "per_row": times[False]},
        "img_per_s": {"batched": images / batched, "per_row": images / per_row},
        "speedup_batched_over_per_row": per_row / batched,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
