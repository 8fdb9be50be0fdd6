"""FlowGRPO math against hand-computed values: group advantages, the clipped loss, its metrics, the KL term."""

import math

import numpy as np
import pytest
import torch

from verl_omni.algorithms.flowgrpo import compute_group_advantages, flowgrpo_kl, flowgrpo_policy_loss
from verl_omni.core.errors import assert_finite

EPS = 1e-4  # flow_grpo's std floor (PerPromptStatTracker), the default

# Groups are interleaved on purpose: grouping must follow the ids, not positions.
REWARDS = torch.tensor([1.0, 2.0, 3.0, 2.0, 0.0, 3.0, 6.0, 5.0])
GROUPS = ["a", "b", "a", "b", "c", "c", "c", "d"]


def test_group_advantages_normalise_within_each_prompt_group():
    adv = compute_group_advantages(REWARDS, GROUPS)
    # a: [1, 3] mean 2, population std 1; c: [0, 3, 6] mean 3, population std sqrt(6)
    s6 = math.sqrt(6) + EPS
    expected = [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), 0.0, -3 / s6, 0.0, 3 / s6, 0.0]
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-5, rtol=0)
    assert adv.dtype == REWARDS.dtype


def test_zero_std_groups_and_singletons_get_zero_advantage_not_nan():
    adv = compute_group_advantages(torch.tensor([0.7, 0.7, 0.7, 1.0]), [0, 0, 0, 1])
    assert torch.equal(adv, torch.zeros(4))


def test_all_equal_groups_get_exact_zeros_from_float64_rewards_whatever_their_value():
    """The mean of equal float64 values need not equal them (0.1 * 3 / 3 != 0.1): centred on the group's first
    reward, an all-equal group's advantages are exactly 0, in any float dtype and beside any other group."""
    rng = np.random.default_rng(0)
    for value in (0.1, 0.7, 1 / 3, 0.9999999, 123.456, 1e-9):
        rewards = np.concatenate([np.full(7, value), rng.random(5)])
        groups = [0] * 7 + [1] * 5
        for global_std in (False, True):
            adv = compute_group_advantages(torch.as_tensor(rewards), groups, global_std=global_std)
            assert torch.equal(adv[:7], torch.zeros(7, dtype=torch.float64)), (value, adv[:7])
            assert (adv[7:] != 0).all()


def test_global_std_uses_the_batch_std_but_group_means():
    adv = compute_group_advantages(REWARDS, np.array(GROUPS), global_std=True)
    batch_std = 1.8540496217739157  # population std of REWARDS: sqrt(27.5 / 8)
    expected = torch.tensor([-1.0, 0.0, 1.0, 0.0, -3.0, 0.0, 3.0, 0.0]) / (batch_std + EPS)
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)


def test_advantage_clipping_is_symmetric():
    adv = compute_group_advantages(REWARDS, GROUPS, clip=0.5)
    assert adv.max().item() == pytest.approx(0.5) and adv.min().item() == pytest.approx(-0.5)
    assert adv[1].item() == 0.0  # unclipped values stay


def test_group_ids_can_be_a_tensor():
    adv = compute_group_advantages(torch.tensor([0.0, 2.0, 5.0, 5.0]), torch.tensor([3, 3, 9, 9]))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (1 + EPS), atol=1e-5, rtol=0)


def test_non_finite_rewards_are_refused_naming_the_samples():
    with pytest.raises(ValueError, match=r"rewards.*\[1, 3\]"):
        compute_group_advantages(torch.tensor([0.0, float("nan"), 1.0, float("inf")]), [0, 0, 1, 1])


def test_mismatched_group_ids_are_refused():
    with pytest.raises(ValueError, match="group_ids"):
        compute_group_advantages(torch.zeros(4), [0, 0, 1])


# ---------------------------------------------------------------- policy loss

CLIP = 0.2


def _loss_case():
    # ratio per sample: 1.5, 0.5, 1.5, 0.5, 1.1; advantages: +1, +1, -1, -1, +2
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])
    old = torch.tensor([-3.0, -1.0, 0.5, 2.0, -0.25])
    log_prob = (old + ratios.log()).requires_grad_(True)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    return log_prob, old, advantages, ratios


def test_clipped_loss_on_both_sides_for_positive_and_negative_advantages():
    log_prob, old, advantages, ratios = _loss_case()
    loss, metrics = flowgrpo_policy_loss(log_prob, old, advantages, CLIP)
    # per sample max(-A*r, -A*clamp(r, 0.8, 1.2)):
    #  A=+1 r=1.5 -> max(-1.5, -1.2) = -1.2  (gain capped above 1+c)
    #  A=+1 r=0.5 -> max(-0.5, -0.8) = -0.5  (no cap on the pessimistic side)
    #  A=-1 r=1.5 -> max( 1.5,  1.2) =  1.5
    #  A=-1 r=0.5 -> max( 0.5,  0.8) =  0.8  (capped below 1-c)
    #  A=+2 r=1.1 -> -2.2 inside the trust region
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 - 2.2) / 5, abs=1e-6)
    assert metrics["policy_loss"] == pytest.approx(loss.item())

    loss.backward()
    # Clipped samples get no gradient; the others get d(-A*r)/dlogp = -A*r, divided by the batch mean.
    expected_grad = torch.tensor([0.0, -1.0 * 0.5, 1.0 * 1.5, 0.0, -2.0 * 1.1]) / 5
    torch.testing.assert_close(log_prob.grad, expected_grad, atol=1e-6, rtol=0)


def test_loss_metrics_clip_fractions_and_approx_kl():
    log_prob, old, advantages, ratios = _loss_case()
    _, metrics = flowgrpo_policy_loss(log_prob, old, advantages, CLIP)
    assert metrics["clip_frac"] == pytest.approx(4 / 5)
    assert metrics["clip_frac_high"] == pytest.approx(2 / 5)
    assert metrics["clip_frac_low"] == pytest.approx(2 / 5)
    log_ratios = [math.log(r) for r in (1.5, 0.5, 1.5, 0.5, 1.1)]
    assert metrics["approx_kl"] == pytest.approx(0.5 * sum(x * x for x in log_ratios) / 5, rel=1e-5)
    assert metrics["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.5 + 0.5 + 1.1) / 5)
    assert metrics["ratio_max"] == pytest.approx(1.5) and metrics["ratio_min"] == pytest.approx(0.5)


def test_advantages_are_clamped_by_adv_clip_max():
    zero = torch.zeros(2)
    loss, _ = flowgrpo_policy_loss(zero, zero, torch.tensor([5.0, -1.0]), CLIP, adv_clip_max=2.0)
    assert loss.item() == pytest.approx((-2.0 + 1.0) / 2)


def test_non_finite_log_prob_refuses_the_step():
    with pytest.raises(ValueError, match=r"log_prob.*\[2\]"):
        flowgrpo_policy_loss(torch.tensor([0.0, 0.0, float("nan")]), torch.zeros(3), torch.ones(3), CLIP)


# ---------------------------------------------------------------- KL


def test_kl_is_mean_squared_mean_difference_over_twice_the_variance():
    ref = torch.zeros(2, 2, 3)
    mean = torch.stack([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
    torch.testing.assert_close(flowgrpo_kl(mean, ref, 0.5), torch.tensor([1.0 / 0.5, 4.0 / 0.5]))
    per_sample_std = torch.tensor([1.0, 2.0]).view(2, 1, 1)
    torch.testing.assert_close(flowgrpo_kl(mean, ref, per_sample_std), torch.tensor([0.5, 0.5]))


def test_kl_term_is_added_with_beta_and_reported():
    log_prob, old, advantages, _ = _loss_case()
    kl = torch.tensor([2.0, 8.0, 0.0, 0.0, 0.0])
    plain, _ = flowgrpo_policy_loss(log_prob, old, advantages, CLIP)
    with_kl, metrics = flowgrpo_policy_loss(log_prob, old, advantages, CLIP, kl=kl, kl_beta=0.1)
    assert with_kl.item() == pytest.approx(plain.item() + 0.1 * 2.0)
    assert metrics["kl_loss"] == pytest.approx(2.0)
    beta_zero, _ = flowgrpo_policy_loss(log_prob, old, advantages, CLIP, kl=kl, kl_beta=0.0)
    assert beta_zero.item() == pytest.approx(plain.item())


def test_assert_finite_lists_bad_rows_of_a_batched_tensor():
    x = torch.zeros(4, 3)
    x[1, 2] = float("inf")
    x[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"latents.*\[1, 3\] of 4"):
        assert_finite("latents", x)
    assert_finite("fine", torch.ones(2, 2))
