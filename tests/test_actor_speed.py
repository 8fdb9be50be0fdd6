"""The actor's speed knobs keep its result, on the tiny Qwen-Image in float32 on CPU:

- gradient checkpointing of every block, of the first k (``model.gradient_checkpointing_blocks``) or of none give
  the same update, and exactly the chosen blocks run their forward twice;
- the adapter's matmuls in the activations' dtype (``models.lora.compute_lora_in_activation_dtype``, on everywhere):
  nothing changes over float32 activations; over bf16 activations the adapter still trains float32 weights and its
  output is the bf16 product of the bf16-rounded factors (what autocast computes), not peft's float32 product.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from helpers import model_config, num_rows, records_data_proto, rollout_config

from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.model import ModelConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.models.checkpointing import transformer_blocks
from verl_omni.models.lora import (
    LoRASpec,
    add_lora_adapter,
    compute_lora_in_activation_dtype,
    fused_projections,
    lora_parts,
)
from verl_omni.pipelines.loading import load_rl_pipeline
from verl_omni.workers.actor import DiffusionLoRAActor
from verl_omni.workers.train_batch import TrainBatch

PROMPTS = ["a red cat", "a blue house on a hill"]


def _rollout(pipe):
    records = []
    for i, prompt in enumerate(PROMPTS):
        params = DiffusionSamplingParams(
            num_inference_steps=4, height=32, width=32, sde_window_size=2, window_start=i, guidance_scale=2.0
        )
        records.append(pipe.rl_generate(prompt, [3 + i, 4 + i], params))
    raw = np.array([PROMPTS[i // 2] for i in range(num_rows(records))], dtype=object)
    uid = np.array([f"g{i // 2}" for i in range(num_rows(records))], dtype=object)
    return records_data_proto(records, {"raw_prompt": raw, "uid": uid})


def _block_forward_counts(transformer) -> list[int]:
    """Forward calls per block (a pre-hook: a recomputation stops as soon as it has what the backward needs)."""
    counts = [0] * len(transformer_blocks(transformer))
    for index, block in enumerate(transformer_blocks(transformer)):
        block.register_forward_pre_hook(lambda *_, i=index: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("checkpointing,blocks,recomputed", [(False, None, 0), (True, None, 2), (True, 1, 1)])
def test_checkpointing_every_some_or_no_block_gives_the_same_update(
    qwen_image_rl_pipe, tiny_qwen_image_dir, checkpointing, blocks, recomputed
):
    data = _rollout(qwen_image_rl_pipe)  # 4 rows x 2 window steps: 8 transitions
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    rollout = rollout_config(pipeline={"true_cfg_scale": 2.0})
    actor_cfg = ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=2)

    def update(enable, k):
        model = model_config(tiny_qwen_image_dir, enable_gradient_checkpointing=enable, gradient_checkpointing_blocks=k)
        actor = DiffusionLoRAActor(model, actor_cfg, rollout, lora_seed=5)
        counts = _block_forward_counts(actor.transformer)
        actor.update(data, advantages)
        return actor, counts

    plain, plain_counts = update(False, None)
    actor, counts = update(checkpointing, blocks)
    assert actor.checkpointed_blocks == recomputed
    micro_batches = len(plain_counts) and plain_counts[0]  # one forward per micro-batch without recomputation
    assert micro_batches == 4 and plain_counts == [micro_batches] * 2
    # A recomputed block runs its forward again in the backward pass; the others do not.
    assert counts == [2 * micro_batches] * recomputed + [micro_batches] * (2 - recomputed)
    before, after = plain.lora_state_dict(), actor.lora_state_dict()
    for name in before:
        assert torch.equal(before[name], after[name]), name  # recomputation is the same float32 arithmetic


def test_more_checkpointed_blocks_than_the_model_has_is_refused_naming_the_key(tiny_qwen_image_dir):
    model = model_config(tiny_qwen_image_dir, enable_gradient_checkpointing=True, gradient_checkpointing_blocks=3)
    with pytest.raises(ValueError, match=r"gradient_checkpointing_blocks=3 .* 2 blocks \(allowed: 0 to 2"):
        DiffusionLoRAActor(model, ActorConfig(), rollout_config())
    with pytest.raises(ValueError, match=r"gradient_checkpointing_blocks=-1 must be an int >= 0"):
        ModelConfig(path=tiny_qwen_image_dir, gradient_checkpointing_blocks=-1)


def _lora_layer(model_dir: str, dtype: torch.dtype):
    """One to_q projection of the tiny Qwen-Image, in ``dtype``, with a random (non-identity) float32 adapter."""
    pipe = load_rl_pipeline(model_dir, "qwen_image", dtype, LoRASpec(rank=4, alpha=8.0))
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for factor in (layer.lora_A["default"], layer.lora_B["default"]):
            factor.weight.copy_(torch.randn(factor.weight.shape, generator=generator) * 0.5)
            factor.weight.requires_grad_(True)
    x = torch.randn(3, 7, layer.in_features, generator=generator).to(dtype)
    return pipe.transformer, layer, x


def test_lora_over_float32_activations_is_unchanged_by_the_activation_dtype_compute(tiny_qwen_image_dir):
    transformer, layer, x = _lora_layer(tiny_qwen_image_dir, torch.float32)
    assert type(layer.lora_A["default"]).__name__ == "ActivationDtypeLinear"  # what add_lora_adapter sets up
    ours = layer(x)
    assert compute_lora_in_activation_dtype(transformer, enabled=False) > 0
    assert type(layer.lora_A["default"]) is torch.nn.Linear
    assert torch.equal(ours, layer(x))


def test_lora_over_bf16_activations_computes_in_bf16_and_trains_float32_weights(tiny_qwen_image_dir):
    transformer, layer, x = _lora_layer(tiny_qwen_image_dir, torch.bfloat16)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert a.dtype == b.dtype == torch.float32
    out = layer(x)
    assert out.dtype == torch.bfloat16
    scale = layer.scaling["default"]
    expected = layer.base_layer(x) + (x @ a.to(torch.bfloat16).T @ b.to(torch.bfloat16).T) * scale
    assert torch.equal(out, expected)
    out.float().square().sum().backward()
    assert a.grad is not None and a.grad.dtype == torch.float32 and a.grad.abs().sum() > 0
    # peft's default (every activation cast to float32) computes another, more precise, sum: a control that the
    # two paths differ at all over bf16 activations.
    compute_lora_in_activation_dtype(transformer, enabled=False)
    with torch.no_grad():
        peft_default = layer(x)
        float32_product = layer.base_layer(x).float() + (x.float() @ a.T @ b.T) * scale
    assert not torch.equal(peft_default, out)
    assert torch.equal(peft_default, float32_product.to(torch.bfloat16))


def test_lora_parts_add_up_to_the_layer_and_are_refused_where_peft_computes_otherwise(tiny_qwen_image_dir):
    transformer, layer, x = _lora_layer(tiny_qwen_image_dir, torch.bfloat16)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # a product the sum can show
        parts = lora_parts(layer, x)
        assert parts is not None and parts.scaling == layer.scaling["default"]
        assert torch.equal(parts.total(), layer(x))
        assert not torch.equal(parts.base, layer(x))  # the product is not nothing
        assert lora_parts(layer.base_layer, x) is None  # not a LoRA layer
        compute_lora_in_activation_dtype(transformer, enabled=False)  # peft's float32 input cast
        assert lora_parts(layer, x) is None
        compute_lora_in_activation_dtype(transformer)
        layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
        assert lora_parts(layer, x) is None
        layer.lora_dropout["default"] = torch.nn.Identity()
        layer.enable_adapters(False)
        assert lora_parts(layer, x) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projections_equal_each_layer_and_are_refused_where_a_layer_computes_otherwise(
    tiny_qwen_image_dir, dtype
):
    transformer, layer, x = _lora_layer(tiny_qwen_image_dir, dtype)
    attn = transformer.transformer_blocks[0].attn  # to_q has the random adapter, to_k / to_v identity ones
    layers = [attn.to_q, attn.to_k, attn.to_v, attn.add_q_proj]  # add_q_proj: a plain nn.Linear (no adapter)
    with torch.no_grad():
        parts = fused_projections(layers, x)
        separate = [m(x) for m in layers]
        assert parts is not None and [p.delta is None for p in parts] == [False, False, False, True]
        assert not parts[0].base.is_contiguous()  # column slices of the one matmul: nothing copied
        tolerance = 1e-5 if dtype == torch.float32 else 2**-7
        for fused, own in zip(parts, separate, strict=True):
            error = (fused.total().float() - own.float()).abs().max().item()
            assert error <= tolerance * own.float().abs().max().item(), error
        assert not torch.equal(parts[0].total(), parts[0].base)  # the adapter's product is in the sum
        assert fused_projections([attn.to_q, attn.norm_q], x) is None  # not a linear
        layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
        assert fused_projections(layers, x) is None  # a LoRA that is not plain
        layer.lora_dropout["default"] = torch.nn.Identity()
        attn.to_k.base_layer.bias = None
        assert fused_projections(layers, x) is None  # the layers disagree on a bias


def test_the_engines_and_the_actor_add_the_adapter_the_same_way(tiny_qwen_image_dir):
    pipe = load_rl_pipeline(tiny_qwen_image_dir, "qwen_image", torch.float32)
    add_lora_adapter(pipe.transformer, LoRASpec(rank=2, alpha=2.0))
    layers = [m for m in pipe.transformer.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)


def test_the_actors_auto_cfg_layout_weighs_sdpas_unmasked_kernels(qwen_image_rl_pipe, tiny_qwen_image_dir):
    """actor.batch_cfg=auto: two unmasked forwards only where SDPA has faster unmasked kernels (a GPU in bf16/fp16);
    the float32 CPU actor keeps the batched call, and its update equals the one of batch_cfg=true exactly."""
    from verl_omni.workers.actor import sdpa_has_unmasked_kernel

    assert sdpa_has_unmasked_kernel(torch.device("cuda", 0), torch.bfloat16)
    assert not sdpa_has_unmasked_kernel(torch.device("cuda", 0), torch.float32)
    assert not sdpa_has_unmasked_kernel(torch.device("cpu"), torch.bfloat16)
    data = _rollout(qwen_image_rl_pipe)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    rollout = rollout_config(pipeline={"true_cfg_scale": 2.0})
    states = []
    for layout in (True, "auto"):
        actor_cfg = ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=2, batch_cfg=layout)
        actor = DiffusionLoRAActor(model_config(tiny_qwen_image_dir), actor_cfg, rollout, lora_seed=5)
        plan = actor.plan(TrainBatch.from_data_proto(data, advantages))
        assert all(m.inputs.batch_cfg for m in plan)  # different text lengths, a mask: still one call on CPU
        actor.update(data, advantages)
        states.append(actor.lora_state_dict())
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), name
    with pytest.raises(ValueError, match=r"actor.batch_cfg='sometimes' must be true, false or 'auto'"):
        ActorConfig(batch_cfg="sometimes")


def _sdpa_backends_enabled() -> tuple[bool, bool, bool, bool]:
    cuda = torch.backends.cuda
    return cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled()


def test_the_update_runs_with_every_sdpa_backend_whatever_the_process_switched_off(
    qwen_image_rl_pipe, tiny_qwen_image_dir
):
    """vllm's import switches cuDNN's SDPA off for the whole process (the vllm-omni worker, where the hybrid engine's
    actor trains): the update's forwards and its backward's recomputations see every backend enabled, as in the
    diffusers engine's process, and the process's own setting is back afterwards."""
    data = _rollout(qwen_image_rl_pipe)
    model = model_config(tiny_qwen_image_dir, enable_gradient_checkpointing=True)  # the recomputation: in backward
    actor_cfg = ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=2)
    actor = DiffusionLoRAActor(model, actor_cfg, rollout_config(pipeline={"true_cfg_scale": 2.0}), lora_seed=5)
    seen = []
    for block in transformer_blocks(actor.transformer):
        block.register_forward_pre_hook(lambda *_: seen.append(_sdpa_backends_enabled()))
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)  # what vllm/platforms/cuda.py does at import
    try:
        actor.update(data, torch.tensor([1.0, -1.0, 0.5, -0.5]))
        after = _sdpa_backends_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
    # 4 micro-batches x 2 blocks, each block's forward again in the backward pass.
    assert len(seen) == 16 and all(flags == (True, True, True, True) for flags in seen)
    assert after == (False, True, True, True)


@pytest.mark.parametrize("family, cudnn", [("qwen_image", True), ("sd3", True), ("flux", False)])
def test_the_update_leaves_cudnn_attention_off_for_a_family_whose_backward_fails_on_it(family, cudnn):
    """FLUX.1-dev's update runs without cuDNN's SDPA (its backward fails on FLUX's training shapes on an H100);
    every other family's gets every backend, whatever the process switched off, and the setting is back after."""
    from verl_omni.core.workarounds import update_sdpa_backends
    from verl_omni.pipelines import get_pipeline_class

    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)  # what vllm/platforms/cuda.py does at import
    try:
        with update_sdpa_backends(get_pipeline_class(family)):
            inside = _sdpa_backends_enabled()
        after = _sdpa_backends_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
    assert inside == (cudnn, True, True, True)
    assert after == (False, True, True, True)


def _tracked_by_gc(obj) -> bool:
    """Whether a collection walks ``obj``: ``gc.get_objects`` lists the three generations, not the frozen heap."""
    return any(o is obj for o in gc.get_objects())


@pytest.mark.parametrize("freeze", [True, False])
def test_the_first_update_freezes_the_gc_heap_once_when_asked(qwen_image_rl_pipe, tiny_qwen_image_dir, freeze):
    """``actor.freeze_gc_heap``: after the first update the actor's modules are frozen (full collections skip them);
    what is made later stays collectable (no second freeze); off, nothing is frozen. The update's result is the same
    either way (a frozen object is still freed by reference counting)."""
    data = _rollout(qwen_image_rl_pipe)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    actor_cfg = ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=2, freeze_gc_heap=freeze)
    rollout = rollout_config(pipeline={"true_cfg_scale": 2.0})
    actor = DiffusionLoRAActor(model_config(tiny_qwen_image_dir), actor_cfg, rollout, lora_seed=5)
    assert gc.get_freeze_count() == 0 and _tracked_by_gc(actor.transformer)
    first = actor.update(data, advantages)
    assert _tracked_by_gc(actor.transformer) is not freeze
    assert (gc.get_freeze_count() > 0) is freeze
    made_later = [object()]
    second = actor.update(data, advantages)
    assert _tracked_by_gc(made_later)
    # The update's metric: the frozen heap's size when it ended (the freeze follows the first update).
    assert first["actor/gc_frozen_objects"] == 0 and (second["actor/gc_frozen_objects"] > 0) is freeze
    other_cfg = ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=2, freeze_gc_heap=not freeze)
    other = DiffusionLoRAActor(model_config(tiny_qwen_image_dir), other_cfg, rollout, lora_seed=5)
    assert other.update(data, advantages)["actor/loss"] == first["actor/loss"]
    other.update(data, advantages)
    theirs = other.lora_state_dict()
    for name, value in actor.lora_state_dict().items():
        assert torch.equal(value, theirs[name]), name
