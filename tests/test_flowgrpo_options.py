"""flow_grpo's per-family semantics as FlowGRPO options, on the tiny models: detaching CFG's unconditional branch,
dropping rows with advantage 0, the family defaults they resolve to, and GRPO-Guard in the actor's update."""

import dataclasses
import logging

import numpy as np
import pytest
import torch
from helpers import model_config, num_rows, records_data_proto, rollout_config

from verl_omni.algorithms.flowgrpo import FlowGRPO
from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.pipelines.qwen_image.pipeline import QwenImageRLPipeline
from verl_omni.pipelines.sd3.pipeline import SD3RLPipeline
from verl_omni.workers.actor import DiffusionLoRAActor
from verl_omni.workers.train_batch import TrainBatch

GUIDANCE = 3.0
PROMPTS = ["a red cat", "a blue house on a hill", "text 'OK'"]
SEEDS = [11, 22]


def _rollout(pipe):
    """3 prompt groups of 2 rows, 4 steps, a 2-step SDE window per group, CFG on."""
    records = []
    for i, prompt in enumerate(PROMPTS):
        params = DiffusionSamplingParams(
            num_inference_steps=4,
            height=32,
            width=32,
            sde_window_size=2,
            window_start=i % 3,
            guidance_scale=GUIDANCE,
            negative_prompt="blurry",
        )
        records.append(pipe.rl_generate(prompt, [s + i for s in SEEDS], params))
    raw = np.empty(num_rows(records), dtype=object)
    for i in range(num_rows(records)):
        raw[i] = PROMPTS[i // len(SEEDS)]
    uid = np.array([f"g{i // len(SEEDS)}" for i in range(num_rows(records))], dtype=object)
    return records_data_proto(records, {"raw_prompt": raw, "uid": uid})


def _actor(model_dir, algorithm=None, **actor):
    cfg = ActorConfig(optim=OptimConfig(lr=1e-2), ppo_micro_batch_size_per_gpu=2, **actor)
    rollout = rollout_config(pipeline={"true_cfg_scale": GUIDANCE})
    return DiffusionLoRAActor(model_config(model_dir), cfg, rollout, lora_seed=3, algorithm=algorithm)


def _flowgrpo(**section):
    return {"name": "flowgrpo", "flowgrpo": section}


# ----------------------------------------------------------------------------------------------- family defaults
def test_null_settings_resolve_to_the_familys_flow_grpo_trainer_and_explicit_ones_win(caplog):
    for pipeline, expected in ((SD3RLPipeline, True), (QwenImageRLPipeline, False)):
        algo = FlowGRPO()
        with caplog.at_level(logging.INFO, logger="verl_omni.algorithms.flowgrpo"):
            algo.bind_pipeline(pipeline)
        assert algo.detach_unconditional is expected and algo.drop_zero_advantage is expected
        # the log names the family it resolved for (the driver binds the class, the ranks an instance)
        assert f"algorithm.flowgrpo for {pipeline.__name__}: detach_unconditional={expected}" in caplog.text
        algo = FlowGRPO(FlowGRPO.Config(detach_unconditional=not expected, drop_zero_advantage=not expected))
        algo.bind_pipeline(pipeline)
        assert algo.detach_unconditional is (not expected) and algo.drop_zero_advantage is (not expected)
    with pytest.raises(ValueError, match=r"algorithm.flowgrpo.drop_zero_advantage .*='yes' must be true or false"):
        FlowGRPO.Config(drop_zero_advantage="yes")
    with pytest.raises(ValueError, match=r"algorithm.flowgrpo.adv_std_eps=0 must be a number > 0"):
        FlowGRPO.Config(adv_std_eps=0)


# ----------------------------------------------------------------------------------------------- detached CFG
@pytest.mark.parametrize("batch_cfg", [True, False])
def test_detaching_the_unconditional_branch_leaves_the_value_and_only_the_conditional_gradient(sd3_rl_pipe, batch_cfg):
    """SD3's CFG is u + w (c - u): with u detached, d/dx of sum(v * r) is w times the conditional's alone."""
    pipe = sd3_rl_pipe
    params = DiffusionSamplingParams(height=32, width=32)
    cond = pipe.encode_conditions("a red cat", "blurry", params).conditioning
    latents = pipe.prepare_rl_latents(1, params, [torch.Generator().manual_seed(0)], "cpu")
    weights = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([700.0])

    def grad(guidance, detach, conditioning=cond):
        x = latents.clone().requires_grad_(True)
        v = pipe.predict_velocity(
            x, timestep, conditioning, guidance, 32, 32, batch_cfg=batch_cfg, detach_unconditional=detach
        )
        (g,) = torch.autograd.grad((v * weights).sum(), x)
        return v.detach(), g

    v_detached, g_detached = grad(GUIDANCE, True)
    v_plain, g_plain = grad(GUIDANCE, False)
    _, g_conditional = grad(1.0, False, dataclasses.replace(cond, negative_prompt_embeds=None))
    assert torch.equal(v_detached, v_plain)
    # within float32 rounding of a 2B-row forward against a B-row one (test_cfg_batching.py's bound, 1e-5 of max)
    expected = GUIDANCE * g_conditional
    torch.testing.assert_close(g_detached, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    assert (g_plain - g_detached).abs().max() > 1e-3 * g_plain.abs().max()  # the unconditional branch's gradient


# ----------------------------------------------------------------------------------------------- zero advantages
def test_dropping_zero_advantage_rows_trains_on_the_others_alone(qwen_image_rl_pipe, tiny_qwen_image_dir):
    data = _rollout(qwen_image_rl_pipe)
    advantages = torch.tensor([0.0, 0.0, 1.0, -1.0, 0.5, -0.5])  # group 0: all-equal rewards
    kept = torch.tensor([2, 3, 4, 5])
    host = TrainBatch.from_data_proto(data, advantages)

    dropping = _actor(tiny_qwen_image_dir, _flowgrpo(drop_zero_advantage=True))
    m_drop = dropping.update_batch(host)
    alone = _actor(tiny_qwen_image_dir, _flowgrpo(drop_zero_advantage=False))
    m_alone = alone.update_batch(host.select(kept))
    assert m_drop["actor/num_train_terms"] == m_alone["actor/num_train_terms"] == 8
    assert m_drop["actor/grad_norm"] == pytest.approx(m_alone["actor/grad_norm"], rel=1e-5)
    for name, value in dropping.lora_state_dict().items():
        torch.testing.assert_close(value, alone.lora_state_dict()[name], rtol=1e-5, atol=1e-7)

    # Kept, the zero rows add terms with no gradient: the same direction, averaged over 12 terms instead of 8.
    keeping = _actor(tiny_qwen_image_dir, _flowgrpo(drop_zero_advantage=False))
    m_keep = keeping.update_batch(host)
    assert m_keep["actor/num_train_terms"] == 12
    assert m_keep["actor/grad_norm"] == pytest.approx(m_drop["actor/grad_norm"] * 8 / 12, rel=1e-5)


def test_a_batch_of_all_equal_groups_takes_no_step_when_zero_rows_drop(qwen_image_rl_pipe, tiny_qwen_image_dir):
    data = _rollout(qwen_image_rl_pipe)
    actor = _actor(tiny_qwen_image_dir, _flowgrpo(drop_zero_advantage=True))
    before = actor.lora_state_dict()
    metrics = actor.update(data, torch.zeros(len(data)))
    assert metrics["actor/num_train_terms"] == 0 and metrics["actor/grad_norm"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in actor.lora_state_dict().items())
    assert actor.optimizer_steps == 0


# ----------------------------------------------------------------------------------------------- GRPO-Guard
def test_grpo_guard_updates_from_ratio_one_and_reweights_the_gradient(qwen_image_rl_pipe, tiny_qwen_image_dir):
    data = _rollout(qwen_image_rl_pipe)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0])
    plain = _actor(tiny_qwen_image_dir, _flowgrpo(), ppo_epochs=2, clip_ratio=0.2)
    guard = _actor(tiny_qwen_image_dir, _flowgrpo(grpo_guard=True), ppo_epochs=2, clip_ratio=0.2)
    m_plain, m_guard = plain.update(data, advantages), guard.update(data, advantages)
    # Epoch 1 samples the rollout's policy: the normalised ratio starts at exactly 1 only where the bias term is 0;
    # averaged over both epochs it stays near 1, and the update moved the adapter.
    assert m_guard["actor/ratio_min"] > 0.9 and m_guard["actor/ratio_max"] < 1.1
    assert guard.optimizer_steps == 2
    # The reweighting (1 / (sigma - sigma_next) per step, times the noise scale in the ratio) changes the gradient.
    assert m_guard["actor/grad_norm"] != pytest.approx(m_plain["actor/grad_norm"], rel=1e-3)
    moved = [(v - plain.lora_state_dict()[k]).abs().max() for k, v in guard.lora_state_dict().items() if "lora_B" in k]
    assert max(moved) > 0
