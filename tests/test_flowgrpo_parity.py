"""FlowGRPO against flow_grpo's own code on random inputs: advantages, the clipped loss (with its KL term and
metrics) and GRPO-Guard's loss. The reference functions below are transcribed from the originals (the loop bodies
as they are, wrapped in functions; only the config lookups became arguments):

- yifan123/flow_grpo at ac4c86e, flow_grpo/stat_tracking.py: ``PerPromptStatTracker.update`` (type='grpo');
- yifan123/flow_grpo at ac4c86e, scripts/train_sd3.py: the inner training loop's "grpo logic";
- scripts/train_sd3_GRPO_Guard.py (flow_grpo's GRPO-Guard trainer, read at zhtmike/flow_grpo 2e2f712, the commit
  that adds it): the same loop with ``config.rationorm``.
"""

import numpy as np
import pytest
import torch

from verl_omni.algorithms.flowgrpo import FlowGRPO, GuardTerms, flowgrpo_kl, flowgrpo_policy_loss


# ----------------------------------------------------------------------------------------------- references
class PerPromptStatTracker:
    """flow_grpo/stat_tracking.py at ac4c86e (the 'grpo' branch of ``update``)."""

    def __init__(self, global_std=False):
        self.global_std = global_std
        self.stats = {}

    def update(self, prompts, rewards):
        prompts = np.array(prompts)
        rewards = np.array(rewards, dtype=np.float64)
        unique = np.unique(prompts)
        advantages = np.empty_like(rewards) * 0.0
        for prompt in unique:
            prompt_rewards = rewards[prompts == prompt]
            if prompt not in self.stats:
                self.stats[prompt] = []
            self.stats[prompt].extend(prompt_rewards)
        for prompt in unique:
            self.stats[prompt] = np.stack(self.stats[prompt])
            prompt_rewards = rewards[prompts == prompt]
            mean = np.mean(self.stats[prompt], axis=0, keepdims=True)
            if self.global_std:
                std = np.std(rewards, axis=0, keepdims=True) + 1e-4
            else:
                std = np.std(self.stats[prompt], axis=0, keepdims=True) + 1e-4
            advantages[prompts == prompt] = (prompt_rewards - mean) / std
        return advantages


def reference_grpo_loss(log_prob, old_log_prob, sample_advantages, adv_clip_max, clip_range, beta=0.0, kl=None):
    """scripts/train_sd3.py at ac4c86e: "grpo logic" and its ``info`` entries for one timestep j
    (``kl`` = the per-sample ``((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(...) / (2 * std_dev_t ** 2)``)."""
    advantages = torch.clamp(sample_advantages, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    info = {}
    if beta > 0:
        kl_loss = torch.mean(kl)
        loss = policy_loss + beta * kl_loss
        info["kl_loss"] = kl_loss
    else:
        loss = policy_loss
    info["approx_kl"] = 0.5 * torch.mean((log_prob - old_log_prob) ** 2)
    info["clipfrac"] = torch.mean((torch.abs(ratio - 1.0) > clip_range).float())
    info["clipfrac_gt_one"] = torch.mean((ratio - 1.0 > clip_range).float())
    info["clipfrac_lt_one"] = torch.mean((1.0 - ratio > clip_range).float())
    info["policy_loss"] = policy_loss
    info["loss"] = loss
    return loss, info


def reference_kl(prev_sample_mean, prev_sample_mean_ref, std_dev_t):
    """scripts/train_sd3.py at ac4c86e: the per-sample KL before its ``torch.mean``."""
    return ((prev_sample_mean - prev_sample_mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2)


def reference_guard_loss(
    log_prob, old_log_prob, prev_sample_mean, old_prev_sample_mean, std_dev_t, sqrt_dt, sample_advantages, c
):
    """scripts/train_sd3_GRPO_Guard.py (zhtmike/flow_grpo 2e2f712): "grpo logic" with ``config.rationorm``."""
    advantages = torch.clamp(sample_advantages, -c["adv_clip_max"], c["adv_clip_max"])
    sigma_t = std_dev_t.mean()
    ratio_mean_bias = (prev_sample_mean - old_prev_sample_mean).pow(2).mean(dim=tuple(range(1, prev_sample_mean.ndim)))
    ratio_mean_bias = ratio_mean_bias / (2 * (sqrt_dt.mean() * sigma_t) ** 2)
    ratio = torch.exp((log_prob - old_log_prob + ratio_mean_bias) * (sqrt_dt.mean() * sigma_t))
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - c["clip_range"], 1.0 + c["clip_range"])
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    policy_loss = policy_loss / (sqrt_dt.mean() ** 2)
    info = {
        "approx_kl": 0.5 * torch.mean((log_prob - old_log_prob) ** 2),
        "clipfrac": torch.mean((torch.abs(ratio - 1.0) > c["clip_range"]).float()),
        "policy_loss": policy_loss,
    }
    return policy_loss, info


# ----------------------------------------------------------------------------------------------- advantages
@pytest.mark.parametrize("global_std", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_advantages_equal_per_prompt_stat_tracker(seed, global_std):
    rng = np.random.default_rng(seed)
    num_groups, n = 6, 8
    prompts = np.repeat([f"prompt {k}" for k in range(num_groups)], n)
    perm = rng.permutation(len(prompts))  # groups interleaved, as gathered from several ranks
    prompts = prompts[perm]
    rewards = rng.random(len(prompts)) * rng.choice([1e-3, 1.0, 10.0])
    rewards[prompts == "prompt 0"] = 0.75  # an all-equal group
    rewards[prompts == "prompt 1"] = 0.5 + rng.random(n) * 1e-5  # a near-constant group: the floor matters
    expected = PerPromptStatTracker(global_std=global_std).update(prompts, rewards)
    algo = FlowGRPO(FlowGRPO.Config(global_std=global_std))
    ours64, metrics = algo.advantages(rewards, prompts)
    # float32 rewards in, float32 out: within 1e-6 relative of flow_grpo on the same (float32) rewards
    rewards32 = rewards.astype(np.float32)
    ours = algo.advantages(rewards32, prompts)[0]
    expected32 = PerPromptStatTracker(global_std=global_std).update(prompts, rewards32)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, torch.as_tensor(expected32, dtype=torch.float32), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours64, torch.as_tensor(expected), rtol=1e-9, atol=1e-12)
    # The all-equal group: flow_grpo's is ~0 up to rounding; ours is exactly 0.
    assert np.abs(expected[prompts == "prompt 0"]).max() < 1e-9
    assert torch.equal(ours64[torch.as_tensor(prompts == "prompt 0")], torch.zeros(n, dtype=torch.float64))
    assert metrics["advantages/zero_frac"] == pytest.approx(1 / num_groups)


# ----------------------------------------------------------------------------------------------- losses
def _random_step(seed, batch=6, shape=(4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, generator=g) * 3
    log_prob = (old + torch.randn(batch, generator=g) * 0.3).requires_grad_(True)
    advantages = torch.randn(batch, generator=g) * 3  # some beyond adv_clip_max
    mean = torch.randn(batch, *shape, generator=g).requires_grad_(True)
    mean_ref = mean.detach() + torch.randn(batch, *shape, generator=g) * 0.05
    std = torch.rand(batch, 1, 1, 1, generator=g) + 0.2
    return log_prob, old, advantages, mean, mean_ref, std


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("seed", range(4))
def test_clipped_loss_equals_train_sd3(seed, beta):
    log_prob, old, advantages, mean, mean_ref, std = _random_step(seed)
    clip_range, adv_clip_max = 0.2, 2.0
    ref_kl = reference_kl(mean, mean_ref, std)
    expected, info = reference_grpo_loss(log_prob, old, advantages, adv_clip_max, clip_range, beta, ref_kl)
    (expected_grad,) = torch.autograd.grad(expected, log_prob)
    kl = flowgrpo_kl(mean, mean_ref, std.reshape(-1))
    torch.testing.assert_close(kl, ref_kl.reshape(-1), rtol=1e-6, atol=0)
    loss, metrics = flowgrpo_policy_loss(
        log_prob, old, advantages, clip_range, adv_clip_max=adv_clip_max, kl=kl, kl_beta=beta
    )
    (grad,) = torch.autograd.grad(loss, log_prob)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)
    names = {"approx_kl": "approx_kl", "clip_frac": "clipfrac", "clip_frac_high": "clipfrac_gt_one"}
    names |= {"clip_frac_low": "clipfrac_lt_one", "policy_loss": "policy_loss", "loss": "loss"}
    names |= {"kl_loss": "kl_loss"} if beta > 0 else {}
    for ours, theirs in names.items():
        assert metrics[ours] == pytest.approx(float(info[theirs].detach()), rel=1e-6), ours


@pytest.mark.parametrize("seed", range(4))
def test_grpo_guard_loss_equals_train_sd3_grpo_guard(seed):
    log_prob, old, advantages, mean, _, std = _random_step(seed)
    g = torch.Generator().manual_seed(100 + seed)
    old_mean = mean.detach() + torch.randn(mean.shape, generator=g) * 0.01  # a later epoch: the policy moved
    sqrt_dt = torch.full((len(old), 1, 1, 1), 0.3)  # one step of the schedule: the same for every row
    c = {"clip_range": 2e-6, "adv_clip_max": 5.0}  # config/grpo_guard.py's OCR settings
    for clip_range in (c["clip_range"], 0.2):
        c["clip_range"] = clip_range
        expected, info = reference_guard_loss(log_prob, old, mean, old_mean, std, sqrt_dt, advantages, c)
        expected_grads = torch.autograd.grad(expected, (log_prob, mean))
        loss, metrics = flowgrpo_policy_loss(
            log_prob,
            old,
            advantages,
            clip_range,
            adv_clip_max=c["adv_clip_max"],
            guard=GuardTerms(mean, old_mean, std, sqrt_dt.reshape(-1)),
        )
        grads = torch.autograd.grad(loss, (log_prob, mean))
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
        for ours, theirs in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
        for ours, theirs in (("approx_kl", "approx_kl"), ("clip_frac", "clipfrac"), ("policy_loss", "policy_loss")):
            assert metrics[ours] == pytest.approx(float(info[theirs].detach()), rel=1e-6), ours
    # Without it the loss is the plain one: the option changes the update.
    plain, _ = flowgrpo_policy_loss(log_prob, old, advantages, 0.2, adv_clip_max=5.0)
    assert not torch.allclose(plain, loss)
