"""The hybrid engine on one GPU, both engines, and on two GPUs (two replicas, two actor ranks, NCCL all-reduce of the
LoRA gradients between the engines' processes): the actor rank trains the engine's own transformer in the engine's
process (for vllm-omni: inside its diffusion worker), the engine serves the trained adapter as it is.

Asserted: the run trains (gradient > 0, the adapter moves), every replica serves the same adapter (checksums), and
step 1's importance ratios are within 1e-3 of 1 (the actor recomputes the rollout's log-probs: for the diffusers
engine the same kernels; for vllm-omni FA3 + compiled blocks vs the actor's SDPA, which round differently)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from gpu_helpers import requires_cuda, requires_vllm_omni, write_figures

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import trainer_config  # noqa: E402

from verl_omni.trainer.ray_trainer import FlowGRPOTrainer  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_cuda, requires_vllm_omni]


@pytest.mark.parametrize(
    ("engine", "gpus"),
    [("vllm_omni", 1), ("diffusers", 1), ("vllm_omni", 2)],
    ids=["vllm_omni", "diffusers", "vllm_omni_2gpus"],
)
def test_hybrid_engine_trains_in_the_engines_process(engine, gpus, gpu_qwen_image_dir, ocr_data_files, tmp_path):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    cfg = trainer_config(
        ocr_data_files,
        gpu_qwen_image_dir,
        tmp_path / engine,
        **{
            "actor_rollout_ref.hybrid_engine": True,
            "actor_rollout_ref.rollout.name": engine,
            "actor_rollout_ref.rollout.device": "cuda",
            "actor_rollout_ref.rollout.dtype": "bfloat16",
            "actor_rollout_ref.actor.device": "cuda",
            "actor_rollout_ref.actor.dtype": "bfloat16",
            "actor_rollout_ref.rollout.pipeline.height": 128,
            "actor_rollout_ref.rollout.pipeline.width": 128,
            "actor_rollout_ref.rollout.pipeline.true_cfg_scale": 4.0,
            "actor_rollout_ref.rollout.pipeline.negative_prompt": " ",
            "actor_rollout_ref.rollout.gpu_memory_utilization": 0.5,
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 4,
            "actor_rollout_ref.actor.optim.lr": 1e-3,
            "trainer.total_training_steps": 3,
            "trainer.n_gpus_per_node": gpus,
        },
    )
    trainer = FlowGRPOTrainer(cfg).init()
    try:
        start = trainer.last_lora_checksum
        history = trainer.fit()
        served = trainer._run(trainer.servers.lora_checksums())
        final = trainer.last_lora_checksum  # computed from the engines, so read before shutdown()
    finally:
        trainer.shutdown()
    first = history[0]
    figures = {
        "engine": engine,
        "gpus": gpus,
        "step1_ratio_min": first["actor/ratio_min"],
        "step1_ratio_max": first["actor/ratio_max"],
        "grad_norms": [h["actor/grad_norm"] for h in history],
        "step_s": [h["timing/step_s"] for h in history],
        "update_s": [h["timing/update_s"] for h in history],
        "rollout_s": [h["timing/rollout_s"] for h in history],
        "sync_s": [h["timing/sync_s"] for h in history],
        "busy_s": [{k: v for k, v in h.items() if "_busy_s/" in k} for h in history],
        "update_gc_s": [{k: v for k, v in h.items() if k.startswith("timing/update_gc_s/")} for h in history],
        "gc_frozen_objects": [[h[f"perf/update_gc_frozen_objects/rank{k}"] for k in range(gpus)] for h in history],
        "sm_clock_mhz": [[h[f"perf/update_sm_clock_mhz/rank{k}"] for k in range(gpus)] for h in history],
        "sm_clock_min_mhz": [[h[f"perf/update_sm_clock_min_mhz/rank{k}"] for k in range(gpus)] for h in history],
        "peak_gb": [
            {k: v for k, v in h.items() if k.startswith(("perf/update_peak_", "perf/rollout_peak_"))} for h in history
        ],
    }
    write_figures(f"gpu_hybrid_{engine}_{gpus}gpu.json", figures)
    assert abs(first["actor/ratio_min"] - 1) < 1e-3 and abs(first["actor/ratio_max"] - 1) < 1e-3, figures
    assert all(g > 0 for g in figures["grad_norms"])
    assert served == [final] * gpus and final != start
    for busy in figures["busy_s"]:  # every GPU rolled out and trained in every step
        assert sorted(busy) == sorted(
            [f"timing/rollout_busy_s/replica{k}" for k in range(gpus)]
            + [f"timing/update_busy_s/rank{k}" for k in range(gpus)]
        ), busy
        assert all(v > 0 for v in busy.values()), busy
    # actor.freeze_gc_heap: every rank froze its process's heap (the engine's worker) after the first update.
    assert all(count > 0 for step in figures["gc_frozen_objects"][1:] for count in step), figures["gc_frozen_objects"]
    # The probe read the GPU's SM clock (NVML) in every rank's update: a real clock, its lowest sample under the mean.
    for means, lows in zip(figures["sm_clock_mhz"], figures["sm_clock_min_mhz"], strict=True):
        assert all(0 < low <= mean for mean, low in zip(means, lows, strict=True)), figures["sm_clock_mhz"]
    # Every rank's allocator peaks, in the update and in the rollout before it: real, reserved >= allocated.
    for step in figures["peak_gb"]:
        assert len(step) == 4 * gpus, step
        for k in range(gpus):
            for phase in ("update", "rollout"):
                allocated = step[f"perf/{phase}_peak_allocated_gb/rank{k}"]
                assert 0 < allocated <= step[f"perf/{phase}_peak_reserved_gb/rank{k}"], step
