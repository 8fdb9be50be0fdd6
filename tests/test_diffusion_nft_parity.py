"""DiffusionNFT's math against the original code on random inputs (float32, within 1e-6 relative).

The reference functions below are transcribed from NVlabs/DiffusionNFT at commit 24af555:
- ``return_decay``: scripts/train_nft_sd3.py (verbatim);
- ``reference_r`` / ``reference_loss``: the body of the training loop over timesteps in scripts/train_nft_sd3.py
  (from ``advantages_clip = torch.clamp(...)`` to ``loss += config.train.beta * torch.mean(kl_div_loss)``), with
  ``config.*`` turned into arguments;
- ``reference_timesteps`` / ``reference_xt``: the same loop's per-row timestep permutation and noising;
- ``reference_old_update``: the old adapter's update after each epoch in the same file;
- the advantages: flow_grpo/stat_tracking.py's ``PerPromptStatTracker`` (DiffusionNFT ships the same file), the
  transcription in tests/test_flowgrpo_parity.py, run with ``global_std=True`` as the NFT trainer does.
"""

import numpy as np
import pytest
import torch
from test_flowgrpo_parity import PerPromptStatTracker

from verl_omni.algorithms.diffusion_nft import (
    ADV_MODES,
    nft_loss,
    noised_latents,
    num_train_timesteps,
    old_policy_decay,
    reward_weight,
    train_timestep_indices,
)
from verl_omni.algorithms.flowgrpo import compute_group_advantages
from verl_omni.models.ema import ShadowWeights

RTOL = 1e-6


# ---------------------------------------------------------------- the original's code (24af555)


def return_decay(step, decay_type):
    if decay_type == 0:
        flat = 0
        uprate = 0.0
        uphold = 0.0
    elif decay_type == 1:
        flat = 0
        uprate = 0.001
        uphold = 0.5
    elif decay_type == 2:
        flat = 75
        uprate = 0.0075
        uphold = 0.999
    else:
        assert False  # noqa: B011 (transcribed)

    if step < flat:
        return 0.0
    else:
        decay = (step - flat) * uprate
        return min(decay, uphold)


def reference_r(advantages, adv_clip_max, adv_mode):
    advantages_clip = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    if adv_mode == "positive_only":
        advantages_clip = torch.clamp(advantages_clip, 0, adv_clip_max)
    elif adv_mode == "negative_only":
        advantages_clip = torch.clamp(advantages_clip, -adv_clip_max, 0)
    elif adv_mode == "one_only":
        advantages_clip = torch.where(
            advantages_clip > 0, torch.ones_like(advantages_clip), torch.zeros_like(advantages_clip)
        )
    elif adv_mode == "binary":
        advantages_clip = torch.sign(advantages_clip)
    normalized_advantages_clip = (advantages_clip / adv_clip_max) / 2.0 + 0.5
    return torch.clamp(normalized_advantages_clip, 0, 1)


def reference_loss(
    forward_prediction, old_prediction, ref_forward_prediction, x0, xt, t, r, beta, adv_clip_max, kl_beta
):
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * forward_prediction

    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = (
            torch.abs(x0_prediction.double() - x0.double())
            .mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            .clip(min=0.00001)
        )
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (
            torch.abs(negative_x0_prediction.double() - x0.double())
            .mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            .clip(min=0.00001)
        )
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=tuple(range(1, x0.ndim)))

    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    policy_loss = (ori_policy_loss * adv_clip_max).mean()

    loss = policy_loss
    terms = {}
    terms["policy_loss"] = policy_loss.detach()
    terms["unweighted_policy_loss"] = ori_policy_loss.mean().detach()
    terms["old_deviate"] = torch.mean((forward_prediction - old_prediction) ** 2).detach()
    kl_div_loss = ((forward_prediction - ref_forward_prediction) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    loss += kl_beta * torch.mean(kl_div_loss)
    terms["kl_div"] = torch.mean(kl_div_loss).detach()
    terms["old_kl_div"] = torch.mean(
        ((old_prediction - ref_forward_prediction) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    ).detach()
    return loss, terms


def reference_timesteps(timesteps, num_train_timesteps):
    total_batch_size_filtered, num_timesteps_filtered = timesteps.shape
    perms_time = torch.stack([torch.randperm(num_timesteps_filtered) for _ in range(total_batch_size_filtered)])
    shuffled = timesteps[torch.arange(total_batch_size_filtered)[:, None], perms_time]
    return shuffled[:, :num_train_timesteps]


def reference_xt(x0, timesteps_j):
    t = timesteps_j / 1000.0
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    noise = torch.randn_like(x0.float())
    return (1 - t_expanded) * x0 + t_expanded * noise


def reference_old_update(transformer_trainable_parameters, old_transformer_trainable_parameters, decay):
    with torch.no_grad():
        for src_param, tgt_param in zip(
            transformer_trainable_parameters, old_transformer_trainable_parameters, strict=True
        ):
            tgt_param.data.copy_(tgt_param.detach().data * decay + src_param.detach().clone().data * (1.0 - decay))


# ---------------------------------------------------------------- parity


def _close(ours, theirs, atol=0.0):
    torch.testing.assert_close(torch.as_tensor(ours), torch.as_tensor(theirs), rtol=RTOL, atol=atol)


@pytest.mark.parametrize("decay_type", [0, 1, 2])
def test_decay_schedule_is_the_originals(decay_type):
    for step in [0, 1, 2, 10, 74, 75, 76, 100, 207, 208, 500, 499, 1000, 10_000]:
        assert old_policy_decay(step, decay_type) == return_decay(step, decay_type)


def test_unknown_decay_type_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"algorithm\.diffusion_nft\.decay_type=3.*\[0, 1, 2\]"):
        old_policy_decay(0, 3)


@pytest.mark.parametrize("adv_mode", ADV_MODES)
@pytest.mark.parametrize("adv_clip_max", [5.0, 1.0])
def test_reward_weight_is_the_originals(adv_mode, adv_clip_max):
    g = torch.Generator().manual_seed(0)
    advantages = torch.randn(64, generator=g) * 3
    advantages[:3] = torch.tensor([0.0, 7.0, -9.0])
    r = reward_weight(advantages, adv_clip_max, adv_mode)
    _close(r, reference_r(advantages, adv_clip_max, adv_mode))
    assert float(r.min()) >= 0.0 and float(r.max()) <= 1.0


@pytest.mark.parametrize("beta", [1.0, 0.1])
@pytest.mark.parametrize("kl_beta", [0.0, 1e-4])
def test_loss_and_gradient_are_the_originals(beta, kl_beta):
    g = torch.Generator().manual_seed(1)
    b, shape = 6, (6, 4, 8, 8)
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    t = torch.rand(b, generator=g) * 0.9 + 0.05
    xt = noised_latents(x0, noise, t)
    old = torch.randn(shape, generator=g)
    ref = torch.randn(shape, generator=g)
    r = reward_weight(torch.randn(b, generator=g) * 2, 5.0)

    v_ours = (old + 0.1 * torch.randn(shape, generator=g)).requires_grad_(True)
    v_theirs = v_ours.detach().clone().requires_grad_(True)
    loss, metrics = nft_loss(v_ours, old, x0, xt, t, r, beta, 5.0, ref_velocity=ref, kl_coef=kl_beta)
    expected, terms = reference_loss(v_theirs, old, ref, x0, xt, t, r, beta, 5.0, kl_beta)
    _close(loss, expected)
    # The original logs policy_loss from a tensor that ``loss +=`` then changes in place: its logged value is the
    # total loss. Ours reports the policy term alone (the total is ``loss``).
    _close(metrics["loss"], terms["policy_loss"])
    _close(metrics["policy_loss"], terms["unweighted_policy_loss"] * 5.0)
    for name in ("unweighted_policy_loss", "old_deviate", "kl_div", "old_kl_div"):
        _close(metrics[name], terms[name])
    loss.backward()
    expected.backward()
    _close(v_ours.grad, v_theirs.grad, atol=1e-12)


def test_loss_without_reference_leaves_out_the_kl_term():
    g = torch.Generator().manual_seed(2)
    shape = (3, 2, 4, 4)
    x0, noise, old = (torch.randn(shape, generator=g) for _ in range(3))
    t = torch.tensor([0.2, 0.5, 0.9])
    xt = noised_latents(x0, noise, t)
    v = old + 0.05 * torch.randn(shape, generator=g)
    r = torch.tensor([0.0, 0.5, 1.0])
    loss, metrics = nft_loss(v, old, x0, xt, t, r, 0.1, 5.0)
    expected, _ = reference_loss(v, old, old, x0, xt, t, r, 0.1, 5.0, 0.0)
    _close(loss, expected)
    assert "kl_div" not in metrics


def test_noised_latents_are_the_originals():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(5, 4, 6, 6, generator=g)
    timesteps = torch.rand(5, generator=g) * 1000
    torch.manual_seed(11)
    expected = reference_xt(x0, timesteps)
    torch.manual_seed(11)
    ours = noised_latents(x0, torch.randn_like(x0), timesteps / 1000.0)
    _close(ours, expected)


def test_training_timesteps_are_the_originals_per_row_permutation():
    num_steps, fraction, rows = 10, 0.99, 7
    count = num_train_timesteps(num_steps, fraction)
    assert count == int(num_steps * fraction) == 9
    timesteps = torch.linspace(1000, 100, num_steps).repeat(rows, 1)
    torch.manual_seed(5)
    expected = reference_timesteps(timesteps, count)
    idx = train_timestep_indices(rows, num_steps, count, torch.Generator().manual_seed(5))
    assert torch.equal(timesteps.gather(1, idx), expected)
    assert all(len(set(row.tolist())) == count for row in idx)  # no timestep twice in a row


def test_too_small_timestep_fraction_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"algorithm\.diffusion_nft\.timestep_fraction"):
        num_train_timesteps(4, 0.2)


@pytest.mark.parametrize("decay", [0.0, 0.3, 0.999])
def test_old_policy_update_is_the_originals(decay):
    g = torch.Generator().manual_seed(4)
    current = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g)]
    old = [torch.randn(3, 5, generator=g), torch.randn(7, generator=g)]
    expected = [o.clone() for o in old]
    reference_old_update(current, expected, decay)
    shadow = ShadowWeights(current)  # shadows the trained weights; holds the old policy's
    shadow.load_state_dict({f"shadow.{i}": o for i, o in enumerate(old)})
    shadow.update(decay)
    for ours, theirs in zip(shadow.shadow, expected, strict=True):
        _close(ours, theirs, atol=1e-7)


def test_advantages_are_the_stat_trackers_with_global_std():
    rng = np.random.default_rng(6)
    prompts = [f"p{i % 5}" for i in range(40)]
    rewards = rng.random(40)
    rewards[[0, 5, 10, 15, 20, 25, 30, 35]] = 0.25  # one all-equal group
    expected = PerPromptStatTracker(global_std=True).update(prompts, rewards)
    ours = compute_group_advantages(torch.tensor(rewards), prompts, global_std=True, eps=1e-4)
    _close(ours, torch.tensor(expected), atol=1e-12)
