"""Full fine-tuning (model.lora_rank=0) in the hybrid engine on GPUs: every weight of the engine's own bf16
transformer trains (NCCL reduce-scatter / all-gather between the engines' processes with two GPUs), with the master
weights and AdamW shards on the GPU or offloaded to host memory.

Asserted: the run trains (gradient > 0), every rank's weights are bitwise rank 0's after the steps, the weights moved,
and the all-gather time (``actor/weight_sync_s``) is reported every step. The figures (update and sync seconds, the
offload) go to the GPU figures file for docs/performance.md."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from gpu_helpers import requires_cuda, requires_vllm_omni, write_figures

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import trainer_config  # noqa: E402

from verl_omni.core.checksum import tensors_checksum  # noqa: E402
from verl_omni.trainer.ray_trainer import FlowGRPOTrainer  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_cuda, requires_vllm_omni]


@pytest.mark.parametrize(
    ("engine", "gpus", "offload"),
    [("diffusers", 1, False), ("vllm_omni", 1, False), ("vllm_omni", 1, True), ("vllm_omni", 2, False)],
    ids=["diffusers", "vllm_omni", "vllm_omni_offload", "vllm_omni_2gpus"],
)
def test_full_fine_tuning_trains_the_engines_weights(
    engine, gpus, offload, gpu_qwen_image_dir, ocr_data_files, tmp_path
):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs")
    cfg = trainer_config(
        ocr_data_files,
        gpu_qwen_image_dir,
        tmp_path / engine,
        **{
            "actor_rollout_ref.hybrid_engine": True,
            "actor_rollout_ref.model.lora_rank": 0,
            "actor_rollout_ref.rollout.name": engine,
            "actor_rollout_ref.rollout.device": "cuda",
            "actor_rollout_ref.rollout.dtype": "bfloat16",
            "actor_rollout_ref.actor.device": "cuda",
            "actor_rollout_ref.actor.dtype": "bfloat16",
            "actor_rollout_ref.actor.optimizer_offload": offload,
            "actor_rollout_ref.rollout.pipeline.height": 128,
            "actor_rollout_ref.rollout.pipeline.width": 128,
            "actor_rollout_ref.rollout.pipeline.true_cfg_scale": 4.0,
            "actor_rollout_ref.rollout.pipeline.negative_prompt": " ",
            "actor_rollout_ref.rollout.gpu_memory_utilization": 0.5,
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": 4,
            "actor_rollout_ref.actor.optim.lr": 1e-5,
            "trainer.total_training_steps": 3,
            "trainer.n_gpus_per_node": gpus,
        },
    )
    trainer = FlowGRPOTrainer(cfg).init()
    try:
        start = trainer.last_lora_checksum
        history = trainer.fit()
        same = trainer.actor.lora_matches_rank0()
        final = tensors_checksum(trainer.actor.lora_state_dict())
    finally:
        trainer.shutdown()
    figures = {
        "engine": engine,
        "gpus": gpus,
        "offload": offload,
        "grad_norms": [h["actor/grad_norm"] for h in history],
        "weight_sync_s": [h["actor/weight_sync_s"] for h in history],
        "update_s": [h["timing/update_s"] for h in history],
        "step_s": [h["timing/step_s"] for h in history],
        "step1_ratio_min": history[0]["actor/ratio_min"],
        "step1_ratio_max": history[0]["actor/ratio_max"],
    }
    write_figures(f"gpu_full_weights_{engine}_{gpus}gpu{'_offload' if offload else ''}.json", figures)
    assert all(g > 0 for g in figures["grad_norms"]), figures
    assert all(s > 0 for s in figures["weight_sync_s"]), figures
    assert same == [True] * gpus and final != start, figures
