"""``model.gradient_checkpointing_blocks: auto``: the plan's arithmetic, the measurement of what a kept
block's forward leaves for its backward, and the actor's choice off a GPU. (On a GPU, where auto measures the
allocator: tests/gpu/test_activation_memory_gpu.py.)"""

from __future__ import annotations

import weakref

import pytest
import torch
from helpers import model_config, rollout_config
from test_actor_speed import _rollout

from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.model import ModelConfig
from verl_omni.models.checkpointing import BlockCheckpointing
from verl_omni.pipelines.qwen_image.standin import build_tiny_qwen_image
from verl_omni.workers.activation_memory import SLACK, AutoCheckpointing, blocks_to_recompute
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


class LiveActivations:
    """An allocator for the CPU test: the bytes of the activations autograd holds for the backward (added when
    saved, removed when freed), its peak, and a card of ``budget`` bytes (``CudaMemory``'s interface)."""

    def __init__(self, budget: float = 1e12):
        self.live: dict[int, int] = {}
        self.total = self.top = 0
        self.card = budget

    def _free(self, key: int) -> None:
        self.total -= self.live.pop(key)

    def hooks(self):
        def pack(t):
            if not t.is_leaf and id(t) not in self.live:  # weights and inputs exist anyway
                self.live[id(t)] = t.numel() * t.element_size()
                self.total += self.live[id(t)]
                self.top = max(self.top, self.total)
                weakref.finalize(t, self._free, id(t))
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    def allocated(self) -> int:
        return self.total

    def reset_peak(self) -> None:
        self.top = self.total

    def peak(self) -> int:
        return self.top

    def budget(self, margin: float) -> float:
        return self.card - self.total  # the test's card is what remains after the margin


ADVANTAGES = torch.tensor([1.0, -1.0, 0.5, -0.5])


@pytest.fixture(scope="module")
def four_layer_dir(tmp_path_factory):
    """A tiny Qwen-Image of 4 blocks: room for a plan between all and none (the rollout's text embeddings fit)."""
    return build_tiny_qwen_image(str(tmp_path_factory.mktemp("qwen4")), seed=0, num_layers=4)


def _actor(model_dir: str, blocks="auto") -> DiffusionLoRAActor:
    model = model_config(model_dir, enable_gradient_checkpointing=True, gradient_checkpointing_blocks=blocks)
    actor_cfg = ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=2)
    return DiffusionLoRAActor(model, actor_cfg, rollout_config(pipeline={"true_cfg_scale": 2.0}), lora_seed=5)


class CardActivations(LiveActivations):
    """``LiveActivations`` on a card of ``card`` bytes whose free share honours the planner's margin, as
    ``CudaMemory.budget`` does."""

    def budget(self, margin: float) -> float:
        return self.card * (1 - margin) - self.total


def _plan_with(actor: DiffusionLoRAActor, memory: LiveActivations, utilization: float = 0.92) -> AutoCheckpointing:
    """What ``auto`` sets up on a GPU, on the CPU with ``memory`` in place of the CUDA allocator."""
    actor.checkpointing = BlockCheckpointing(actor.transformer, len(actor.checkpointing.blocks), memory.allocated)
    actor.memory_plan = AutoCheckpointing(actor.checkpointing, memory, utilization)
    return actor.memory_plan


def test_auto_keeps_what_the_budget_holds_from_the_second_update_with_the_same_result(
    four_layer_dir, qwen_image_rl_pipe
):
    data = _rollout(qwen_image_rl_pipe)

    def run(budget=None, updates=2):
        actor = _actor(four_layer_dir)
        if budget is None:  # auto off a GPU: no memory plan
            return actor, None, [actor.update(data, ADVANTAGES)["actor/recomputed_blocks"] for _ in range(updates)]
        memory = LiveActivations(budget)
        plan = _plan_with(actor, memory)
        with memory.hooks():
            counts = [actor.update(data, ADVANTAGES)["actor/recomputed_blocks"] for _ in range(updates)]
        return actor, plan, counts

    roomy, plan, counts = run(budget=1e12)
    assert counts == [3, 0]  # update 1: all but the last block (measured); then everything fits
    _, plan, counts = run(budget=1e12, updates=1)
    block = max(plan.checkpointing.kept_bytes)
    assert block > 0
    fixed = plan._last.peak_bytes - plan._last.start_bytes - block  # update 1 kept one block
    # a card with room for the fixed part and two blocks (with the slack) keeps two: blocks 0 and 1 recompute ...
    budget = fixed + 2 * SLACK * block + 1
    _, plan, counts = run(budget=budget)
    assert counts == [3, 2]
    # ... and the update that kept them stayed within that room
    assert plan._last.peak_bytes - plan._last.start_bytes <= budget
    _, _, counts = run(budget=0)
    assert counts == [3, 4]
    plain, _, counts = run(budget=None)
    assert counts == [4, 4]
    for name, value in plain.lora_state_dict().items():  # keeping activations changes no result
        assert torch.equal(value, roomy.lora_state_dict()[name]), name


def test_an_update_that_runs_out_of_memory_is_retried_recomputing_every_block(
    four_layer_dir, qwen_image_rl_pipe, caplog
):
    data = _rollout(qwen_image_rl_pipe)
    auto = _actor(four_layer_dir)
    memory = LiveActivations(1e12)
    _plan_with(auto, memory)
    armed = {"on": False}

    def out_of_memory_in_a_kept_block(block, args):
        # the card "runs out" while the third micro-batch's kept blocks hold their activations (the first two
        # micro-batches already accumulated gradients: the retry must not add them twice)
        index = auto.checkpointing.blocks.index(block)
        if armed["on"] and torch.is_grad_enabled() and index >= auto.checkpointing.recomputed:
            armed["calls"] = armed.get("calls", 0) + 1
            if armed["calls"] > 2 * (4 - auto.checkpointing.recomputed):
                armed["on"] = False
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    for block in auto.checkpointing.blocks:
        block.register_forward_pre_hook(out_of_memory_in_a_kept_block)
    counts = []
    with memory.hooks(), caplog.at_level("WARNING", logger="verl_omni.workers.activation_memory"):
        for update in range(3):
            armed["on"] = update == 1  # update 2 plans to keep all 4 blocks, and fails
            counts.append(auto.update(data, ADVANTAGES)["actor/recomputed_blocks"])
    assert counts == [3, 4, 1]  # the retry recomputes all; then at most 3/4 of the 4 blocks that failed are kept
    assert "out of memory with 4 of 4 blocks keeping their activations" in caplog.text
    assert "later updates keep at most 3" in caplog.text

    plain = _actor(four_layer_dir, blocks=None)  # every block recomputed, no memory plan
    for _ in range(3):
        plain.update(data, ADVANTAGES)
    for name, value in plain.lora_state_dict().items():  # the failed attempt left nothing behind
        assert torch.equal(value, auto.lora_state_dict()[name]), name

    fixed = _actor(
        four_layer_dir, blocks=0
    )  # a count the user fixed is not second-guessed: the error reaches the caller

    def out_of_memory(block, args):
        if torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory")

    fixed.transformer.transformer_blocks[0].register_forward_pre_hook(out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        fixed.update(data, ADVANTAGES)


def test_no_retry_once_another_rank_may_wait_in_the_all_reduce(tiny_qwen_image_dir):
    model = model_config(tiny_qwen_image_dir, enable_gradient_checkpointing=True)
    actor = DiffusionLoRAActor(model, ActorConfig(), rollout_config(), lora_seed=5)
    actor.memory_plan = AutoCheckpointing(actor.checkpointing, LiveActivations())
    assert actor._may_retry_after_oom()
    actor.grad_sync.world_size = 2
    actor._all_reduce_started = True
    assert not actor._may_retry_after_oom()
    actor._all_reduce_started = False
    assert actor._may_retry_after_oom()
    actor.retries_after_oom = False  # FSDP ranks
    assert not actor._may_retry_after_oom()


@pytest.mark.parametrize("bad", ["all", -1, True, 2.5])
def test_a_bad_block_count_is_refused_naming_the_key_and_the_choices(tiny_qwen_image_dir, bad):
    with pytest.raises(ValueError, match=r"gradient_checkpointing_blocks=.* must be an int >= 0, auto or null"):
        ModelConfig(path=tiny_qwen_image_dir, gradient_checkpointing_blocks=bad)


def test_a_lower_memory_utilization_keeps_fewer_blocks(four_layer_dir, qwen_image_rl_pipe):
    """``model.gradient_checkpointing_memory_utilization``: the share of the card ``auto`` may fill. On a card with
    room for every block at 100%, a share that leaves room for two keeps two."""
    data = _rollout(qwen_image_rl_pipe)
    actor = _actor(four_layer_dir)
    plan = _plan_with(actor, LiveActivations(1e12))
    with plan.memory.hooks():
        actor.update(data, ADVANTAGES)
    block = max(plan.checkpointing.kept_bytes)
    fixed = plan._last.peak_bytes - plan._last.start_bytes - block  # update 1 kept one block
    card = fixed + 4 * SLACK * block + 1

    def counts(utilization: float) -> list[int]:
        actor = _actor(four_layer_dir)
        memory = CardActivations(card)
        _plan_with(actor, memory, utilization)
        with memory.hooks():
            return [actor.update(data, ADVANTAGES)["actor/recomputed_blocks"] for _ in range(2)]

    assert counts(1.0) == [3, 0]
    assert counts((fixed + 2 * SLACK * block + 1) / card) == [3, 2]


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, True, "0.9"])
def test_a_bad_memory_utilization_is_refused_naming_the_key(tiny_qwen_image_dir, bad):
    with pytest.raises(ValueError, match=r"gradient_checkpointing_memory_utilization=.* must be in \(0, 1\]"):
        ModelConfig(path=tiny_qwen_image_dir, gradient_checkpointing_memory_utilization=bad)
