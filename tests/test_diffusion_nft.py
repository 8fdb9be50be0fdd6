"""DiffusionNFT behind the algorithm seam on the tiny Qwen-Image (float32, CPU): its config section, its CFG-free ODE
rollout that keeps only x_0, its update through the actor and the old policy beside the adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import make_config, model_config, num_rows, records_data_proto, rollout_config

from verl_omni.algorithms import get_algorithm
from verl_omni.algorithms.diffusion_nft import DiffusionNFT, nft_loss, noised_latents, old_policy_decay, reward_weight
from verl_omni.config.actor import ActorConfig, OptimConfig
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.config.trainer import FlowGRPOConfig
from verl_omni.workers.actor import DiffusionLoRAActor
from verl_omni.workers.train_batch import TrainBatch

PROMPTS = ["a red cat", "a blue house on a hill"]
NFT = {"algorithm.name": "diffusion_nft"}


def _parse(**overrides):
    return FlowGRPOConfig.from_omega(make_config({"actor_rollout_ref.model.path": "tiny:qwen_image", **overrides}))


def test_diffusion_nft_is_registered_with_the_originals_defaults():
    assert get_algorithm("diffusion_nft") is DiffusionNFT
    section = _parse(**NFT).algorithm.section
    assert (section.beta, section.decay_type, section.timestep_fraction, section.adv_mode, section.global_std) == (
        1.0,
        1,
        0.99,
        "all",
        True,
    )


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("algorithm.diffusion_nft.beta", 0.0, r"algorithm.diffusion_nft.beta=0.0 must be a number > 0"),
        ("algorithm.diffusion_nft.decay_type", 3, r"algorithm.diffusion_nft.decay_type=3 is not one of \(0, 1, 2\)"),
        ("algorithm.diffusion_nft.timestep_fraction", 1.5, r"timestep_fraction=1.5 must be in \(0, 1\]"),
        ("algorithm.diffusion_nft.timestep_fraction", 0.01, r"timestep_fraction=0.01 leaves no training timestep"),
        ("algorithm.diffusion_nft.adv_mode", "up", r"algorithm.diffusion_nft.adv_mode='up' is not one of"),
        ("actor_rollout_ref.rollout.pipeline.true_cfg_scale", 4.0, r"true_cfg_scale=4.0 must be 1.0"),
        ("actor_rollout_ref.actor.adv_clip_max", None, r"adv_clip_max=null: DiffusionNFT needs it"),
        ("actor_rollout_ref.rollout.n", 1, r"actor_rollout_ref.rollout.n=1 must be >= 2"),
    ],
)
def test_bad_settings_fail_at_start_naming_the_key(key, value, match):
    with pytest.raises(ValueError, match=match):
        _parse(**NFT, **{key: value})


def test_sampling_is_cfg_free_ode_that_keeps_x0_and_validation_stays_cfg_free():
    algo = DiffusionNFT()
    params = DiffusionSamplingParams(
        num_inference_steps=6, guidance_scale=4.0, negative_prompt=" ", noise_level=1.2, sde_window_size=2
    )
    train = algo.sampling(params, step=3, group_seed=7, validate=False)
    assert (train.guidance_scale, train.negative_prompt, train.noise_level, train.sde_window_size) == (1.0, None, 0, 0)
    assert train.keep_latent_steps == (-1,) and train.trajectory_window_only
    val = algo.sampling(params.replace(noise_level=0.0), step=3, group_seed=7, validate=True)
    assert val.guidance_scale == 1.0 and val.keep_latent_steps is None
    assert algo.guidance_scale == 1.0 and not algo.needs_log_probs


def _nft_rollout(pipe):
    algo = DiffusionNFT()
    base = DiffusionSamplingParams(num_inference_steps=5, height=32, width=32, trajectory_window_only=True)
    records = []
    for i, prompt in enumerate(PROMPTS):
        params = algo.sampling(base, step=1, group_seed=i, validate=False)
        records.append(pipe.rl_generate(prompt, [3 + i, 4 + i, 5 + i], params))
    raw = np.array([PROMPTS[i // 3] for i in range(num_rows(records))], dtype=object)
    uid = np.array([f"g{i // 3}" for i in range(num_rows(records))], dtype=object)
    return records_data_proto(records, {"raw_prompt": raw, "uid": uid})


def _actor(model_dir, actor_options=None, **algorithm):
    options = {"ppo_micro_batch_size_per_gpu": 4, "kl_coef": 1e-4, **(actor_options or {})}
    actor_cfg = ActorConfig(optim=OptimConfig(lr=1e-2), **options)
    section = {"name": "diffusion_nft", "diffusion_nft": algorithm}
    return DiffusionLoRAActor(model_config(model_dir), actor_cfg, rollout_config(), lora_seed=5, algorithm=section)


def test_the_update_trains_on_noised_x0_and_moves_the_old_policy_by_its_schedule(
    qwen_image_rl_pipe, tiny_qwen_image_dir
):
    data = _nft_rollout(qwen_image_rl_pipe)
    assert data.batch["latents"].shape[1] == 1 and data.batch["latent_steps"][:, 0].tolist() == [5] * 6
    assert not data.batch["window_mask"].any()  # no SDE step: no log-probs to keep
    actor = _actor(tiny_qwen_image_dir, decay_type=1, beta=0.1)
    algo = actor.algorithm
    before = [p.detach().clone() for p in actor.trainable]
    assert all(torch.equal(o, p) for o, p in zip(algo.old.shadow, before, strict=True))  # starts as the adapter
    advantages, _ = algo.advantages(
        torch.tensor([0.1, 0.5, 0.9, 0.3, 0.3, 0.6], dtype=torch.float64), data.non_tensor_batch["uid"]
    )
    metrics = actor.update(data, advantages)
    after = [p.detach() for p in actor.trainable]
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True))
    # 4 of 5 timesteps per row (int(5 * 0.99)), 6 rows; the old policy moved with decay min(0.001 * 1, 0.5)
    assert metrics["actor/num_train_terms"] == 24
    decay = old_policy_decay(1, 1)
    for old, b, a in zip(algo.old.shadow, before, after, strict=True):
        torch.testing.assert_close(old, b * decay + a * (1 - decay), rtol=1e-6, atol=1e-7)
    for key in ("actor/policy_loss", "actor/kl_div", "actor/old_deviate", "actor/loss"):
        assert np.isfinite(metrics[key]), key
    # the update's draws (timesteps, noise) come from rollout.seed and the step: a second run is bit-identical
    again = _actor(tiny_qwen_image_dir, decay_type=1, beta=0.1)
    again.update(data, advantages)
    assert all(torch.equal(a, b) for a, b in zip(again.trainable, after, strict=True))


def test_one_micro_batch_loss_is_nft_loss_of_the_actors_velocities(qwen_image_rl_pipe, tiny_qwen_image_dir):
    data = _nft_rollout(qwen_image_rl_pipe)
    actor = _actor(tiny_qwen_image_dir, beta=0.5)
    algo = actor.algorithm
    with torch.no_grad():  # an old policy that differs from the adapter
        for s in algo.old.shadow:
            s.add_(0.01)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0])
    batch = TrainBatch.from_data_proto(data, advantages)
    micro = actor.plan(batch)[0]
    ctx = actor._context(batch)
    algo.prepare_epoch(ctx, [micro])  # x_t and the old policy's velocity, under one swap
    out = algo.loss(ctx, micro)
    with pytest.raises(RuntimeError, match="prepare_epoch did not see"):
        algo.loss(ctx, micro)  # each prepared micro-batch is trained once
    # by hand: the same noise, timesteps and velocities
    rows, index = micro.rows, micro.tensors["timestep_index"]
    sigma = batch.tensors["sigmas"][rows, index]
    timestep = batch.tensors["timesteps"][rows, index]
    x0 = batch.tensors["latents"][rows, 0]
    algo.units(batch)  # the same update's draws again: its timesteps and its first noise
    assert torch.equal(algo._timestep_index[rows.cpu(), micro.step], index.cpu())
    xt = noised_latents(x0, algo.noise_like(x0), sigma)
    with torch.no_grad(), algo.old.swapped_in():
        old = ctx.velocity(xt, timestep, micro)
    with torch.no_grad():
        v = ctx.velocity(xt, timestep, micro)
        with ctx.reference():
            ref = ctx.velocity(xt, timestep, micro)
    expected, _ = nft_loss(
        v, old, x0, xt, sigma, reward_weight(advantages[rows], 5.0), 0.5, 5.0, ref_velocity=ref, kl_coef=1e-4
    )
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-6, atol=0)
    assert int(out.bad) == 0 and not torch.equal(old, v)


def test_an_epoch_swaps_the_old_policy_in_once_whatever_its_micro_batches(qwen_image_rl_pipe, tiny_qwen_image_dir):
    """The old policy's forwards of an epoch run under one swap (with full fine-tuning a collective: every rank makes
    the same number whatever its rows), the rank without rows included; the adapter is back after each."""
    data = _nft_rollout(qwen_image_rl_pipe)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, 0.0])
    for rows, epochs in ((6, 1), (6, 2), (0, 2)):
        actor = _actor(tiny_qwen_image_dir, {"ppo_epochs": epochs, "ppo_micro_batch_size_per_gpu": 2})
        swaps = []
        swap_in = actor.algorithm.old.swap_in
        actor.algorithm.old.swap_in = lambda swap_in=swap_in, swaps=swaps: (swaps.append(1), swap_in())[1]
        batch = TrainBatch.from_data_proto(data, advantages).select(slice(0, rows))
        micros = len(actor.plan(batch))
        assert micros == (4 * 6 // 2 if rows else 0)  # 4 timesteps of 6 rows, 2 rows a micro-batch
        actor.update_batch(batch, num_terms=24)  # the global count: another rank has the rows
        assert len(swaps) == epochs and not actor.algorithm.old.is_swapped_in


def test_rollouts_sample_from_the_old_policy_and_the_adapter_comes_back(tiny_qwen_image_dir):
    actor = _actor(tiny_qwen_image_dir)
    with torch.no_grad():
        for p in actor.trainable:  # the adapter trained away from the old policy
            p.add_(0.05)
    live, old = actor.lora_state_dict(), actor.rollout_lora_state_dict()
    assert all(not torch.equal(live[k], old[k]) for k in live)
    actor.swap_in_rollout_weights()
    assert all(torch.equal(v, old[k]) for k, v in actor.lora_state_dict().items())
    actor.swap_out_rollout_weights()
    actor.swap_out_rollout_weights()  # twice: nothing swapped in, nothing to do
    assert all(torch.equal(v, live[k]) for k, v in actor.lora_state_dict().items())
    # loading an adapter (a resume) restarts the old policy from it, as the original does
    actor.load_lora_state_dict(old)
    assert all(torch.equal(v, old[k]) for k, v in actor.rollout_lora_state_dict().items())


def test_rows_without_x0_are_refused_naming_them(qwen_image_rl_pipe, tiny_qwen_image_dir):
    params = DiffusionSamplingParams(
        num_inference_steps=5, height=32, width=32, sde_window_size=2, window_start=0, trajectory_window_only=True
    )
    records = [qwen_image_rl_pipe.rl_generate(PROMPTS[0], [3, 4], params)]
    raw, uid = np.array(PROMPTS[:1] * 2, dtype=object), np.array(["g0", "g0"], dtype=object)
    data = records_data_proto(records, {"raw_prompt": raw, "uid": uid})
    actor = _actor(tiny_qwen_image_dir)
    with pytest.raises(ValueError, match=r"rollout rows \[0, 1\] lack the final latent x_0"):
        actor.update(data, torch.tensor([1.0, -1.0]))
