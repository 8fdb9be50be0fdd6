"""``model.gradient_checkpointing_blocks: auto`` on a GPU: the warm-up update recomputes all blocks but the last and
measures it through the CUDA allocator; the next update keeps every block when the card has room (the GPU fixture's
2-layer Qwen-Image at the real width, bf16, eager), with the same log-probs as the all-recomputed update."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from gpu_helpers import requires_cuda

from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.model import ModelConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.pipelines.qwen_image.pipeline import QwenImageRLPipeline
from verl_omni.workers.actor import DiffusionLoRAActor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from helpers import num_rows, records_data_proto, rollout_config  # noqa: E402

pytestmark = [pytest.mark.gpu, requires_cuda]

PROMPTS = ["a red cat", "a blue house on a hill"]
SIZE = 256  # 256 image tokens


def fixture_rollout(model_dir, prompts=PROMPTS):
    """Two samples of each prompt (CFG 4, 4 steps, an SDE window of 2), as the agent loop hands them to the actor."""
    pipe = QwenImageRLPipeline.from_pretrained(model_dir, torch_dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    records = []
    for i, prompt in enumerate(prompts):
        params = DiffusionSamplingParams(
            num_inference_steps=4, height=SIZE, width=SIZE, sde_window_size=2, window_start=0, guidance_scale=4.0
        )
        records.append(pipe.rl_generate(prompt, [3 + i, 4 + i], params))
    del pipe
    torch.cuda.empty_cache()
    raw = np.array([prompts[i // 2] for i in range(num_rows(records))], dtype=object)
    uid = np.array([f"g{i // 2}" for i in range(num_rows(records))], dtype=object)
    return records_data_proto(records, {"raw_prompt": raw, "uid": uid})


def bf16_actor(model_dir: str, use_torch_compile: bool = False, **model_kwargs) -> DiffusionLoRAActor:
    """A bf16 LoRA actor (eager unless asked) on the GPU fixture, for ``fixture_rollout`` (micro-batches of 2)."""
    rollout = rollout_config(pipeline={"true_cfg_scale": 4.0, "height": SIZE, "width": SIZE})
    actor_cfg = ActorConfig(
        device="cuda",
        dtype="bfloat16",
        optim=OptimConfig(lr=1e-4),
        ppo_micro_batch_size_per_gpu=2,
        use_torch_compile=use_torch_compile,
    )
    model = ModelConfig(path=model_dir, lora_rank=8, lora_alpha=16.0, **model_kwargs)
    return DiffusionLoRAActor(model, actor_cfg, rollout, lora_seed=5)


def test_auto_measures_the_kept_block_then_keeps_all_that_fit(gpu_qwen_image_dir):
    data = fixture_rollout(gpu_qwen_image_dir)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])

    def actor(blocks):
        return bf16_actor(gpu_qwen_image_dir, enable_gradient_checkpointing=True, gradient_checkpointing_blocks=blocks)

    auto = actor("auto")
    assert auto.memory_plan is not None
    first = auto.update(data, advantages)
    assert first["actor/recomputed_blocks"] == 1  # all but the last, which is measured
    kept = auto.checkpointing.kept_bytes
    assert kept[0] == 0
    # at least q, k, v and the attention output of a micro-batch's image tokens: 2 rows x 2 CFG branches, bf16
    tokens = data.batch["latents"].shape[2]
    assert kept[1] >= 4 * (2 * 2 * tokens * 3072) * 2, kept
    second = auto.update(data, advantages)
    assert second["actor/recomputed_blocks"] == 0  # a 2-layer model fits any card
    del auto
    torch.cuda.empty_cache()

    every = actor(None)
    reference = every.update(data, advantages)
    assert reference["actor/recomputed_blocks"] == 2
    # the same first update (same adapter, same rows): recomputation changes no log-prob
    for key in ("actor/ratio_mean", "actor/policy_loss"):
        assert first[key] == pytest.approx(reference[key], rel=1e-3, abs=1e-6), key
