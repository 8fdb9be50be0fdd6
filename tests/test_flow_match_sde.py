"""The FlowGRPO SDE steps against an independent float64 reference, the window choice, and sigma schedules
against diffusers' own FlowMatchEulerDiscreteScheduler."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift as diffusers_calculate_shift

from verl_omni.pipelines.qwen_image.standin import QWEN_IMAGE_SCHEDULER_CONFIG
from verl_omni.pipelines.sd3.standin import SD35_SCHEDULER_CONFIG
from verl_omni.schedulers.flow_match_sde import (
    choose_window,
    compute_log_prob,
    euler_step,
    flow_match_sigmas,
    reference_sigma_max,
    sde_step_with_logprob,
)

SIGMA_MAX = 0.95  # what FlowGRPO passes: sigmas[1] of the schedule


# ----------------------------------------------------------------------------- independent reference (numpy)
def reference_step(v, x, sigma, sigma_next, noise, noise_level, sde_type, sigma_max):
    """FlowGRPO's sd3_sde_with_logprob.py transcribed in float64 numpy: (prev, mean, log_prob per sample)."""
    v, x, noise = (np.asarray(a, dtype=np.float64) for a in (v, x, noise))
    dt = sigma_next - sigma
    if sde_type == "sde":
        std = math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma))) * noise_level
        mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
        scale = std * math.sqrt(-dt)
        prev = mean + scale * noise
        log_prob = -((prev - mean) ** 2) / (2 * scale**2) - math.log(scale) - math.log(math.sqrt(2 * math.pi))
    else:
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        mean = (x - sigma * v) * (1 - sigma_next) + (x + v * (1 - sigma)) * math.sqrt(sigma_next**2 - std**2)
        prev = mean + std * noise
        log_prob = -((prev - mean) ** 2)
    return prev, mean, log_prob.reshape(log_prob.shape[0], -1).mean(axis=1)


def _inputs(seed=0, shape=(3, 4, 5, 6), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, dtype=dtype) for _ in range(3))  # v, x, noise


STEPS = [(1.0, 0.95), (0.7, 0.55), (0.3, 0.1), (0.05, 0.0)]


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("sigma,sigma_next", STEPS)
def test_step_and_log_prob_match_float64_reference(sde_type, sigma, sigma_next):
    v, x, noise = _inputs()
    ref_prev, ref_mean, ref_lp = reference_step(v, x, sigma, sigma_next, noise, 0.7, sde_type, SIGMA_MAX)
    out = sde_step_with_logprob(
        v, x, sigma, sigma_next, noise_level=0.7, sde_type=sde_type, sigma_max=SIGMA_MAX, noise=noise
    )
    recomputed = compute_log_prob(
        v, x, out.prev_sample, sigma, sigma_next, noise_level=0.7, sde_type=sde_type, sigma_max=SIGMA_MAX
    )
    assert out.prev_sample.dtype == torch.float64 and out.log_prob.dtype == torch.float64
    np.testing.assert_allclose(out.prev_sample.numpy(), ref_prev, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.prev_sample_mean.numpy(), ref_mean, rtol=1e-12, atol=1e-12)
    denom = np.maximum(np.abs(ref_lp), 1e-300)
    rel_step = np.max(np.abs(out.log_prob.numpy() - ref_lp) / denom)
    rel_recomputed = np.max(np.abs(recomputed.numpy() - ref_lp) / denom)
    print(
        f"[{sde_type} sigma={sigma}->{sigma_next}] log-prob rel err: step {rel_step:.2e}, "
        f"recomputed {rel_recomputed:.2e}"
    )
    if sde_type == "cps" and sigma_next == 0.0:
        assert np.all(ref_lp == 0) and torch.all(out.log_prob == 0)  # deterministic final cps step
    else:
        assert rel_step < 1e-6 and rel_recomputed < 1e-6


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_log_prob_scores_a_foreign_transition_like_the_reference(sde_type):
    """compute_log_prob of a prev_sample the step did not draw (the trainer's case after a policy update)."""
    v, x, noise = _inputs(1)
    other_v = v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5), dtype=v.dtype)
    prev, _, _ = reference_step(v, x, 0.6, 0.4, noise, 0.9, sde_type, SIGMA_MAX)
    # Score under a different velocity: mean shifts, log-prob must follow the reference formula.
    ref = _reference_log_prob(other_v.numpy(), x.numpy(), prev, 0.6, 0.4, 0.9, sde_type)
    got = compute_log_prob(
        other_v, x, torch.from_numpy(prev), 0.6, 0.4, noise_level=0.9, sde_type=sde_type, sigma_max=SIGMA_MAX
    )
    rel = np.max(np.abs(got.numpy() - ref) / np.abs(ref))
    print(f"[{sde_type}] foreign transition log-prob rel err {rel:.2e}")
    assert rel < 1e-6


def _reference_log_prob(v, x, prev, sigma, sigma_next, noise_level, sde_type):
    dt = sigma_next - sigma
    if sde_type == "sde":
        std = math.sqrt(sigma / (1 - sigma)) * noise_level
        mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
        scale = std * math.sqrt(-dt)
        lp = -((prev - mean) ** 2) / (2 * scale**2) - math.log(scale) - 0.5 * math.log(2 * math.pi)
    else:
        std = sigma_next * math.sin(noise_level * math.pi / 2)
        mean = (x - sigma * v) * (1 - sigma_next) + (x + v * (1 - sigma)) * math.sqrt(sigma_next**2 - std**2)
        lp = -((prev - mean) ** 2)
    return lp.reshape(lp.shape[0], -1).mean(axis=1)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_noise_level_zero_is_the_plain_euler_step(sde_type):
    v, x, noise = _inputs(2, dtype=torch.float32)
    out = sde_step_with_logprob(v, x, 0.6, 0.45, noise_level=0.0, sde_type=sde_type, sigma_max=SIGMA_MAX, noise=noise)
    assert torch.equal(out.prev_sample, x + (0.45 - torch.tensor(0.6)) * v)
    assert torch.equal(out.prev_sample, euler_step(v, x, 0.6, 0.45))
    assert torch.all(out.log_prob == 0)
    # And the Gaussian mean itself tends to Euler as the noise vanishes (no hidden bias in the SDE drift).
    tiny = sde_step_with_logprob(v, x, 0.6, 0.45, noise_level=1e-4, sde_type=sde_type, sigma_max=SIGMA_MAX, noise=noise)
    assert torch.allclose(tiny.prev_sample_mean, out.prev_sample, atol=1e-5)


def test_euler_step_equals_diffusers_scheduler_step():
    v, x, _ = _inputs(3, dtype=torch.float32)
    sched = FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULER_CONFIG)
    sched.set_timesteps(5)
    sigmas, _ = flow_match_sigmas(SD35_SCHEDULER_CONFIG, 5, image_seq_len=16)
    for i, t in enumerate(sched.timesteps):
        expected = sched.step(v, t, x, return_dict=False)[0]
        assert torch.equal(euler_step(v, x, sigmas[i], sigmas[i + 1]), expected)


def test_float32_inputs_compute_in_float32_and_bf16_is_upcast():
    v, x, noise = _inputs(4, dtype=torch.bfloat16)
    out = sde_step_with_logprob(v, x, 0.5, 0.3, noise_level=0.7, sigma_max=SIGMA_MAX, noise=noise)
    assert out.prev_sample.dtype == torch.float32 and out.log_prob.dtype == torch.float32


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_per_sample_sigmas_equal_row_by_row_calls(sde_type):
    v, x, noise = _inputs(6)
    sigma = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    sigma_next = torch.tensor([0.8, 0.3, 0.1], dtype=torch.float64)
    out = sde_step_with_logprob(
        v, x, sigma, sigma_next, noise_level=0.7, sde_type=sde_type, sigma_max=SIGMA_MAX, noise=noise
    )
    for i in range(3):
        row = sde_step_with_logprob(
            v[i : i + 1],
            x[i : i + 1],
            float(sigma[i]),
            float(sigma_next[i]),
            noise_level=0.7,
            sde_type=sde_type,
            sigma_max=SIGMA_MAX,
            noise=noise[i : i + 1],
        )
        torch.testing.assert_close(out.prev_sample[i : i + 1], row.prev_sample, rtol=0, atol=1e-14)
        torch.testing.assert_close(out.log_prob[i : i + 1], row.log_prob, rtol=0, atol=1e-12)


def test_log_prob_is_differentiable_in_the_velocity():
    v, x, noise = _inputs(7, dtype=torch.float32)
    out = sde_step_with_logprob(v, x, 0.7, 0.5, noise_level=0.7, sigma_max=SIGMA_MAX, noise=noise)
    v = v.clone().requires_grad_(True)
    lp = compute_log_prob(v, x, out.prev_sample, 0.7, 0.5, noise_level=0.7, sde_type="sde", sigma_max=SIGMA_MAX)
    lp.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_bad_arguments_raise():
    v, x, noise = _inputs(8, dtype=torch.float32)
    with pytest.raises(ValueError, match="sde_type"):
        sde_step_with_logprob(v, x, 0.5, 0.3, noise_level=0.7, sde_type="ode", sigma_max=SIGMA_MAX, noise=noise)
    with pytest.raises(ValueError, match="noise"):
        sde_step_with_logprob(v, x, 0.5, 0.3, noise_level=0.7, sigma_max=SIGMA_MAX)
    with pytest.raises(ValueError, match="noise_level"):
        compute_log_prob(v, x, x, 0.5, 0.3, noise_level=0.0, sde_type="sde", sigma_max=SIGMA_MAX)


# ----------------------------------------------------------------------------- window
def test_choose_window_is_deterministic_per_seed_and_in_range():
    starts = [choose_window(seed, 10, 3, None) for seed in range(200)]
    assert starts == [choose_window(seed, 10, 3, None) for seed in range(200)]
    assert set(starts) == set(range(0, 8))  # every start in [0, T - size] is reachable
    ranged = {choose_window(seed, 10, 3, (2, 4)) for seed in range(100)}
    assert ranged == {2, 3, 4}
    assert choose_window(123, 10, 0, None) == 0
    state = torch.random.get_rng_state()
    choose_window(5, 10, 2, None)
    assert torch.equal(state, torch.random.get_rng_state())


def test_choose_window_rejects_impossible_ranges():
    with pytest.raises(ValueError, match="window_range"):
        choose_window(0, 10, 3, (5, 8))
    with pytest.raises(ValueError, match="window_size"):
        choose_window(0, 4, 5, None)


# ----------------------------------------------------------------------------- sigmas vs diffusers
def _diffusers_schedule(config, num_steps, image_seq_len, base_sigmas):
    sched = FlowMatchEulerDiscreteScheduler(**config)
    kwargs = {}
    if sched.config.use_dynamic_shifting:
        kwargs["mu"] = diffusers_calculate_shift(
            image_seq_len,
            sched.config.base_image_seq_len,
            sched.config.max_image_seq_len,
            sched.config.base_shift,
            sched.config.max_shift,
        )
    if base_sigmas is None:
        sched.set_timesteps(num_steps, **kwargs)
    else:
        sched.set_timesteps(sigmas=base_sigmas, **kwargs)
    return sched.sigmas, sched.timesteps


QWEN_LINSPACE = "qwen_linspace"
SCHEDULE_CASES = [
    ("sd35_shift3_default_spacing", SD35_SCHEDULER_CONFIG, None),
    ("sd35_shift3_linspace", SD35_SCHEDULER_CONFIG, QWEN_LINSPACE),
    ("plain_shift1", {"shift": 1.0}, None),
    ("qwen_dynamic_terminal", QWEN_IMAGE_SCHEDULER_CONFIG, QWEN_LINSPACE),
    ("qwen_dynamic_terminal_default_spacing", QWEN_IMAGE_SCHEDULER_CONFIG, None),
    (
        "dynamic_linear",
        {**QWEN_IMAGE_SCHEDULER_CONFIG, "time_shift_type": "linear", "shift_terminal": None},
        QWEN_LINSPACE,
    ),
    ("static_shift_with_terminal", {"shift": 3.0, "shift_terminal": 0.1}, None),
]


@pytest.mark.parametrize("name,config,base", SCHEDULE_CASES, ids=[c[0] for c in SCHEDULE_CASES])
@pytest.mark.parametrize("num_steps", [2, 4, 10, 28])
@pytest.mark.parametrize("image_seq_len", [16, 1024, 4096])
def test_sigmas_equal_diffusers_scheduler(name, config, base, num_steps, image_seq_len):
    base_sigmas = np.linspace(1.0, 1 / num_steps, num_steps) if base == QWEN_LINSPACE else None
    ref_sigmas, ref_timesteps = _diffusers_schedule(config, num_steps, image_seq_len, base_sigmas)
    sigmas, timesteps = flow_match_sigmas(config, num_steps, image_seq_len, base_sigmas=base_sigmas)
    assert sigmas.shape == (num_steps + 1,) and timesteps.shape == (num_steps,)
    assert sigmas[-1] == 0
    max_err = max((sigmas - ref_sigmas).abs().max().item(), (timesteps - ref_timesteps).abs().max().item() / 1000)
    assert max_err == 0.0, f"{name}: max abs diff {max_err:.3e}"  # bit-identical to diffusers
    assert torch.equal(sigmas, ref_sigmas) and torch.equal(timesteps, ref_timesteps)


def test_single_step_schedules():
    sigmas, timesteps = flow_match_sigmas(SD35_SCHEDULER_CONFIG, 1, 16)
    ref_sigmas, ref_timesteps = _diffusers_schedule(SD35_SCHEDULER_CONFIG, 1, 16, None)
    assert torch.equal(sigmas, ref_sigmas) and torch.equal(timesteps, ref_timesteps)
    with pytest.raises(ValueError, match="shift_terminal"):  # diffusers would silently return NaN here
        flow_match_sigmas(QWEN_IMAGE_SCHEDULER_CONFIG, 1, 16, base_sigmas=[1.0])


def test_reference_sigma_max_is_the_second_sigma():
    sigmas, _ = flow_match_sigmas(QWEN_IMAGE_SCHEDULER_CONFIG, 6, 16, base_sigmas=np.linspace(1.0, 1 / 6, 6))
    assert sigmas[0] == 1.0 and reference_sigma_max(sigmas) == float(sigmas[1]) < 1.0
