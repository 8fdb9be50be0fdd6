"""``model.gradient_checkpointing_blocks: auto`` (issue 15): the plan's arithmetic, the measurement of what a kept
block's forward leaves for its backward, and the actor's choice off a GPU. (On a GPU, where auto measures the
allocator: tests/gpu/test_activation_memory_gpu.py.)"""

from __future__ import annotations

import pytest
import torch
from helpers import model_config, rollout_config
from test_actor_speed import _rollout

from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.model import ModelConfig
from verl_omni.models.checkpointing import BlockCheckpointing
from verl_omni.workers.activation_memory import SLACK, blocks_to_recompute
from verl_omni.workers.actor import DiffusionLoRAActor

GB = 1e9


def test_the_plan_keeps_as_many_blocks_as_the_budget_holds_with_slack():
    # 10 GB left, 2 GB of it not kept blocks: 8 GB for blocks of 1 GB each counted 1.25x -> 6 kept of 60
    assert blocks_to_recompute(60, 1 * GB, 2 * GB, 10 * GB) == 60 - int(8 / SLACK)
    assert blocks_to_recompute(60, 0.3 * GB, 2 * GB, 40 * GB) == 0  # all fit: nothing recomputes
    assert blocks_to_recompute(60, 1 * GB, 12 * GB, 10 * GB) == 60  # not even the fixed part fits
    assert blocks_to_recompute(60, 0, 0, 100 * GB) == 60  # nothing measured: recompute all
    assert blocks_to_recompute(4, 1 * GB, 0, 4 * GB, slack=1.0) == 0


class SavedBytes:
    """A host-side counter of the bytes autograd saves for the backward (what the allocator would show on a GPU)."""

    def __init__(self):
        self.total = 0

    def hooks(self):
        def pack(t):
            self.total += t.numel() * t.element_size()
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


@pytest.mark.parametrize("recomputed", [0, 1])
def test_kept_blocks_record_what_their_forward_saves_and_recomputed_ones_nothing(
    qwen_image_rl_pipe, tiny_qwen_image_dir, recomputed
):
    data = _rollout(qwen_image_rl_pipe)
    model = model_config(tiny_qwen_image_dir, enable_gradient_checkpointing=True, gradient_checkpointing_blocks=0)
    actor_cfg = ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=2)
    actor = DiffusionLoRAActor(model, actor_cfg, rollout_config(pipeline={"true_cfg_scale": 2.0}), lora_seed=5)
    saved = SavedBytes()
    checkpointing = BlockCheckpointing(actor.transformer, recomputed, allocated=lambda: saved.total)
    with saved.hooks():
        actor.update(data, torch.tensor([1.0, -1.0, 0.5, -0.5]))
    kept = checkpointing.kept_bytes
    assert kept[:recomputed] == [0] * recomputed  # a recomputed block saves only its inputs, inside checkpoint
    assert all(b > 0 for b in kept[recomputed:])
    # at least the attention's q, k, v and output of the image tokens of a micro-batch: 2 rows x 2 CFG branches x
    # the image tokens x the width, in float32
    width = actor.transformer.config.num_attention_heads * actor.transformer.config.attention_head_dim
    image_tokens = data.batch["latents"].shape[2]
    assert kept[-1] >= 4 * (2 * 2 * image_tokens * width) * 4


def test_auto_off_a_gpu_recomputes_every_block_and_reports_it(qwen_image_rl_pipe, tiny_qwen_image_dir, caplog):
    data = _rollout(qwen_image_rl_pipe)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    actor_cfg = ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=2)
    rollout = rollout_config(pipeline={"true_cfg_scale": 2.0})
    results = {}
    for enable in (True, False):
        model = model_config(tiny_qwen_image_dir, enable_gradient_checkpointing=enable)
        assert model.gradient_checkpointing_blocks == "auto"  # the default
        with caplog.at_level("INFO", logger="verl_omni.workers.actor"):
            actor = DiffusionLoRAActor(model, actor_cfg, rollout, lora_seed=5)
        assert actor.memory_plan is None
        metrics = actor.update(data, advantages)
        assert metrics["actor/recomputed_blocks"] == (2 if enable else 0)
        results[enable] = actor.lora_state_dict()
    assert "auto measures GPU memory; on cpu every block recomputes" in caplog.text
    for name, value in results[True].items():
        assert torch.equal(value, results[False][name]), name


@pytest.mark.parametrize("bad", ["all", -1, True, 2.5])
def test_a_bad_block_count_is_refused_naming_the_key_and_the_choices(tiny_qwen_image_dir, bad):
    with pytest.raises(ValueError, match=r"gradient_checkpointing_blocks=.* must be an int >= 0, auto or null"):
        ModelConfig(path=tiny_qwen_image_dir, gradient_checkpointing_blocks=bad)
