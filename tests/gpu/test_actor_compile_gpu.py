"""The compiled actor (regional ``torch.compile`` of the blocks, dynamic shapes) trains on prompts of every text
length with the graphs it compiled for the first: no recompilation mid-run (the GPU fixture's 2-layer Qwen-Image
at the real width, bf16).

Why it is a test: inductor's training graphs guard on whether the joint attention mask's row (text + image
tokens) is a multiple of 8. Before masked texts were padded to a multiple of 8 (``pipelines/model_inputs.py``), a
run compiled its block graphs again on the first step whose longest prompt fell on the other side, adding tens of
seconds to that step's update at the real size."""

from __future__ import annotations

import pytest
import torch
from gpu_helpers import requires_cuda
from test_activation_memory_gpu import bf16_actor, fixture_rollout
from torch._dynamo.utils import counters

from verl_omni.pipelines import model_inputs
from verl_omni.pipelines.model_inputs import MASKED_TEXT_MULTIPLE

pytestmark = [pytest.mark.gpu, requires_cuda]

# One token per byte: eight prompts whose text lengths cover every remainder modulo 8 (the negative prompt is
# empty, so each prompt's text is the longer CFG branch and sets the padded length).
FIRST = ["a red cat"]
EVERY_REMAINDER = ["a red cat" + "!" * extra for extra in range(1, 9)]


@pytest.mark.parametrize("multiple", [MASKED_TEXT_MULTIPLE, 1], ids=["padded", "unpadded_control"])
def test_prompts_of_every_length_reuse_the_first_steps_compiled_graphs(gpu_qwen_image_dir, monkeypatch, multiple):
    """``unpadded_control``: the texts left at their length, as before the padding; the graphs compile again."""
    monkeypatch.setattr(model_inputs, "MASKED_TEXT_MULTIPLE", multiple)
    torch._dynamo.reset()  # each case compiles from nothing
    actor = bf16_actor(gpu_qwen_image_dir, use_torch_compile=True, enable_gradient_checkpointing=False)
    first = fixture_rollout(gpu_qwen_image_dir, FIRST)
    every = fixture_rollout(gpu_qwen_image_dir, EVERY_REMAINDER)
    lengths = {int(m.sum()) for m in every.batch["prompt_embeds_mask"]}
    assert len({length % 8 for length in lengths}) == 8, lengths  # the fixture really spans every remainder

    counters.clear()
    actor.update(first, torch.tensor([1.0, -1.0]))
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > 0  # the blocks did compile (the test is about reusing these graphs)
    metrics = actor.update(every, torch.tensor([1.0, -1.0] * len(EVERY_REMAINDER)))
    recompiled = counters["stats"]["unique_graphs"] - compiled
    print(f"multiple {multiple}: {compiled} graphs for the first prompt, {recompiled} more for every length")
    if multiple == MASKED_TEXT_MULTIPLE:
        assert recompiled == 0, dict(counters["stats"])
    else:
        assert recompiled > 0, dict(counters["stats"])
    assert torch.isfinite(torch.tensor(metrics["actor/policy_loss"])), metrics
