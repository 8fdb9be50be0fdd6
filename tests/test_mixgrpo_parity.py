"""MixGRPO against the original code on random inputs: the sliding window, the compressed ODE tail, the
DPM-Solver++ steps of MixGRPO-Flash, the advantages and the clipped loss.

The reference functions below are transcribed from Tencent-Hunyuan/MixGRPO at commit
e5cdd6a427778d8c8b2e7a48ce16972141adbe7c:
- fastvideo/utils/grpo_states.py: ``GRPOTrainingStates`` (the "progressive" and "random" strategies);
- fastvideo/utils/sampling_utils.py: ``sd3_time_shift``, the "post" schedule rebuild of ``run_sample_step``,
  ``flow_grpo_step`` (noise passed in instead of drawn), ``DPMState``, ``dpm_step`` with ``sde_solver=False``,
  ``convert_model_output``, the ``dpmsolver++`` branches of the first/second/third order updates;
- fastvideo/train_grpo_flux.py: ``train_one_step``'s advantages (``reward_aggr``) and loss.
Only unused branches (the SDE variants of the DPM steps, ``dpmsolver``, distributed code) are left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import numpy as np
import pytest
import torch

from verl_omni.algorithms.flowgrpo import flowgrpo_policy_loss
from verl_omni.algorithms.mixgrpo import group_advantages, window_start, window_steps
from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.pipelines.common import denoise_with_logprobs, make_generators
from verl_omni.schedulers.dpm_solver import dpm_solver_step, solver_order_at, tail_points
from verl_omni.schedulers.flow_match_sde import flow_match_sigmas, flow_match_tail_sigmas

RTOL = 1e-6


# ============================================================================ original: grpo_states.py
@dataclass
class GRPOTrainingStates:
    iters_per_group: int
    group_size: int
    max_timesteps: int
    cur_timestep: int = 0
    cur_iter_in_group: int = 0
    sample_strategy: str = "progressive"
    prog_overlap: bool = False
    prog_overlap_step: int = 1
    roll_back: bool = False

    def __post_init__(self):
        self.init_timestep = self.cur_timestep

    def update_iteration(self, seed=None) -> None:
        if self.sample_strategy == "progressive":
            self.cur_iter_in_group += 1
            if self.cur_iter_in_group >= self.iters_per_group:
                self.cur_iter_in_group = 0
                if self.prog_overlap:
                    self.cur_timestep += self.prog_overlap_step
                else:
                    self.cur_timestep += self.group_size
            if self.cur_timestep > self.max_timesteps:
                if self.roll_back:
                    self.roll_back_start()
                else:
                    self.cur_timestep = self.max_timesteps
        elif self.sample_strategy == "random":
            rng = np.random.default_rng(seed)
            self.cur_timestep = rng.integers(0, self.max_timesteps - self.group_size + 1)
        else:
            raise ValueError(f"Invalid sample strategy: {self.sample_strategy}")

    def roll_back_start(self) -> None:
        self.cur_timestep = self.init_timestep
        self.cur_iter_in_group = 0

    def get_current_timesteps(self) -> list[int]:
        return list(range(self.cur_timestep, min(self.cur_timestep + self.group_size, self.max_timesteps)))


# ============================================================================ original: sampling_utils.py
def sd3_time_shift(shift, t):
    return (shift * t) / (1 + (shift - 1) * t)


def post_sigma_schedule(args, sigma_schedule, determistic):
    """The schedule rebuild at the top of ``run_sample_step`` (``dpm_apply_strategy == "post"``)."""
    last_false_index = next((i for i, value in enumerate(reversed(determistic)) if not value), None)
    if last_false_index is not None:
        last_false_index = len(determistic) - 1 - last_false_index
    num_post_steps = int(max((sigma_schedule.size(0) - 1 - last_false_index) * args.dpm_post_compress_ratio, 1))
    post_time_step = torch.linspace(1, 0, sigma_schedule.size(0))[last_false_index + 1].item()
    post_sigma_schedule = torch.linspace(post_time_step, 0, num_post_steps)
    post_sigma_schedule = sd3_time_shift(args.shift, post_sigma_schedule)
    sigma_schedule = torch.cat([sigma_schedule[: last_false_index + 1], post_sigma_schedule], dim=0)
    return sigma_schedule, last_false_index, num_post_steps


def flow_grpo_step(model_output, latents, eta, sigmas, index, variance_noise, determistic=False):
    sigma = sigmas[index]
    sigma_prev = sigmas[index + 1]
    sigma_max = sigmas[1].item()
    dt = sigma_prev - sigma
    pred_original_sample = latents - sigma * model_output
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * eta
    prev_sample_mean = (
        latents * (1 + std_dev_t**2 / (2 * sigma) * dt)
        + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    prev_sample = prev_sample_mean + std_dev_t * torch.sqrt(-1 * dt) * variance_noise
    if determistic:
        prev_sample = latents + dt * model_output
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
        - torch.log(std_dev_t * torch.sqrt(-1 * dt))
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    log_prob = log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
    return prev_sample, pred_original_sample, log_prob


@dataclass
class DPMState:
    order: int
    model_outputs: list[torch.Tensor] = None
    lower_order_nums = 0

    def __post_init__(self):
        self.model_outputs = [None] * self.order

    def update(self, model_output):
        for i in range(self.order - 1):
            self.model_outputs[i] = self.model_outputs[i + 1]
        self.model_outputs[-1] = model_output

    def update_lower_order(self):
        if self.lower_order_nums < self.order:
            self.lower_order_nums += 1


def convert_model_output(model_output, sample, sigmas, step_index):
    sigma_t = sigmas[step_index]
    return sample - sigma_t * model_output


def _sigma_to_alpha_sigma_t(sigma):
    return 1 - sigma, sigma


def dpm_solver_first_order_update(args, model_output, sigmas, step_index, sample):
    sigma_t, sigma_s = sigmas[step_index + 1], sigmas[step_index]
    alpha_t, sigma_t = _sigma_to_alpha_sigma_t(sigma_t)
    alpha_s, sigma_s = _sigma_to_alpha_sigma_t(sigma_s)
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
    h = lambda_t - lambda_s
    return (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * model_output


def multistep_dpm_solver_second_order_update(args, model_output_list, sigmas, step_index, sample):
    sigma_t, sigma_s0, sigma_s1 = sigmas[step_index + 1], sigmas[step_index], sigmas[step_index - 1]
    alpha_t, sigma_t = _sigma_to_alpha_sigma_t(sigma_t)
    alpha_s0, sigma_s0 = _sigma_to_alpha_sigma_t(sigma_s0)
    alpha_s1, sigma_s1 = _sigma_to_alpha_sigma_t(sigma_s1)
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
    m0, m1 = model_output_list[-1], model_output_list[-2]
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    D0, D1 = m0, (1.0 / r0) * (m0 - m1)
    if args.dpm_solver_type == "midpoint":
        return (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (torch.exp(-h) - 1.0)) * D0
            - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
        )
    return (
        (sigma_t / sigma_s0) * sample
        - (alpha_t * (torch.exp(-h) - 1.0)) * D0
        + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
    )


def multistep_dpm_solver_third_order_update(args, model_output_list, sigmas, step_index, sample):
    sigma_t, sigma_s0, sigma_s1, sigma_s2 = (
        sigmas[step_index + 1],
        sigmas[step_index],
        sigmas[step_index - 1],
        sigmas[step_index - 2],
    )
    alpha_t, sigma_t = _sigma_to_alpha_sigma_t(sigma_t)
    alpha_s0, sigma_s0 = _sigma_to_alpha_sigma_t(sigma_s0)
    alpha_s1, sigma_s1 = _sigma_to_alpha_sigma_t(sigma_s1)
    alpha_s2, sigma_s2 = _sigma_to_alpha_sigma_t(sigma_s2)
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
    lambda_s2 = torch.log(alpha_s2) - torch.log(sigma_s2)
    m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
    h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
    r0, r1 = h_0 / h, h_1 / h
    D0 = m0
    D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
    return (
        (sigma_t / sigma_s0) * sample
        - (alpha_t * (torch.exp(-h) - 1.0)) * D0
        + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
        - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2
    )


def dpm_step(args, model_output, sample, step_index, timesteps, sigmas, dpm_state: Optional[DPMState] = None):
    """``dpm_step`` with ``sde_solver=False`` (the ODE steps of the "post" strategy); returns the new sample."""
    lower_order_final = step_index == len(timesteps) - 1
    lower_order_second = (step_index == len(timesteps) - 2) and len(timesteps) < 15
    model_output = convert_model_output(model_output, sample, sigmas, step_index=step_index)
    if dpm_state is not None:
        dpm_state.update(model_output)
    sample = sample.to(torch.float32)
    if dpm_state:
        if args.dpm_solver_order == 1 or dpm_state.lower_order_nums < 1 or lower_order_final:
            prev_sample = dpm_solver_first_order_update(args, model_output, sigmas, step_index, sample)
        elif args.dpm_solver_order == 2 or dpm_state.lower_order_nums < 2 or lower_order_second:
            prev_sample = multistep_dpm_solver_second_order_update(
                args, dpm_state.model_outputs, sigmas, step_index, sample
            )
        else:
            prev_sample = multistep_dpm_solver_third_order_update(
                args, dpm_state.model_outputs, sigmas, step_index, sample
            )
    else:
        prev_sample = dpm_solver_first_order_update(args, model_output, sigmas, step_index, sample)
    if dpm_state is not None:
        dpm_state.update_lower_order()
    return prev_sample.to(model_output.dtype)


def run_sample_step_post(args, z, sigma_schedule, velocity_fn, determistic, noises):
    """``run_sample_step`` with ``dpm_apply_strategy="post"`` and ``flow_grpo_sampling``; the transformer call is
    ``velocity_fn(z, sigma)`` and the window's noise comes from ``noises[i]``. Returns the final latents and the
    log-probs of the steps up to the window's end."""
    dpm_state = DPMState(order=args.dpm_solver_order)
    sigma_schedule, last_false_index, _ = post_sigma_schedule(args, sigma_schedule, determistic)
    log_probs = []
    for i in range(sigma_schedule.size(0) - 1):
        pred = velocity_fn(z, sigma_schedule[i])
        if i <= last_false_index:
            x_0 = convert_model_output(pred, z.to(torch.float32), sigma_schedule, step_index=i)
            dpm_state.update(x_0)
            noise = torch.zeros_like(z) if noises[i] is None else noises[i]
            z, _, log_prob = flow_grpo_step(
                pred, z.to(torch.float32), args.eta, sigma_schedule, i, noise, determistic=determistic[i]
            )
            log_probs.append(log_prob)
            dpm_state.update_lower_order()
        else:
            z = dpm_step(args, pred, z.to(torch.float32), i, sigma_schedule[:-1], sigma_schedule, dpm_state)
    return z, log_probs


# ============================================================================ original: train_grpo_flux.py
def original_advantages(rewards, num_generations):
    n = len(rewards) // num_generations
    advantages = torch.zeros_like(rewards)
    for i in range(n):
        start_idx, end_idx = i * num_generations, (i + 1) * num_generations
        group_rewards = rewards[start_idx:end_idx]
        group_mean = group_rewards.mean()
        group_std = group_rewards.std() + 1e-8
        advantages[start_idx:end_idx] = (group_rewards - group_mean) / group_std
    return advantages


def original_step_loss(new_log_probs, old_log_probs, sample_advantages, clip_range, adv_clip_max, kl_coeff=0.0):
    """One (sample, timestep) term of ``train_one_step`` with gradient_accumulation_steps = 1 and one timestep."""
    advantages = torch.clamp(sample_advantages, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(new_log_probs - old_log_probs)
    unclipped_loss = -advantages * ratio
    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    clip_frac = torch.mean((torch.abs(ratio - 1.0) > clip_range).float())
    policy_loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
    kl_loss = 0.5 * torch.mean((new_log_probs - old_log_probs) ** 2)
    return policy_loss + kl_coeff * kl_loss, policy_loss, kl_loss, clip_frac


# ============================================================================ the window
@pytest.mark.parametrize("num_steps", [5, 10, 25])
@pytest.mark.parametrize("window_size", [1, 2, 4])
@pytest.mark.parametrize("shift_interval", [1, 3, 25])
@pytest.mark.parametrize("stride", [0, 1, 2, None])  # None: the original without prog_overlap (stride = size)
@pytest.mark.parametrize("roll_back", [True, False])
def test_progressive_window_follows_the_original_states(num_steps, window_size, shift_interval, stride, roll_back):
    states = GRPOTrainingStates(
        iters_per_group=shift_interval,
        group_size=window_size,
        max_timesteps=num_steps - 2,
        sample_strategy="progressive",
        prog_overlap=stride is not None,
        prog_overlap_step=1 if stride is None else stride,
        roll_back=roll_back,
    )
    schedule = dict(
        num_steps=num_steps,
        window_size=window_size,
        shift_interval=shift_interval,
        stride=window_size if stride is None else stride,
        roll_back=roll_back,
    )
    for step in range(3 * num_steps * shift_interval + 7):
        original = states.get_current_timesteps()
        assert window_start(step, **schedule) == states.cur_timestep, step
        start, end = window_steps(step, **schedule)
        # Ours is cut at the last step (never trained), the original one step earlier.
        assert list(range(start, end)) == list(
            range(states.cur_timestep, min(states.cur_timestep + window_size, num_steps - 1))
        )
        assert set(original) <= set(range(start, end)) and end > start
        states.update_iteration()


def test_random_window_stays_in_the_original_range_and_is_fixed_by_seed_and_step():
    num_steps, size = 10, 3
    schedule = dict(num_steps=num_steps, window_size=size, shift_interval=1, stride=1, strategy="random")
    states = GRPOTrainingStates(1, size, num_steps - 2, sample_strategy="random")
    original_starts = set()
    for _ in range(400):
        states.update_iteration()
        original_starts.add(int(states.cur_timestep))
    ours = {window_start(step, seed=seed, **schedule) for step in range(1, 200) for seed in (0, 1)}
    assert ours == original_starts == set(range(num_steps - 2 - size + 1))
    assert window_start(0, seed=5, **schedule) == 0  # the original's first step starts at 0
    assert window_start(17, seed=5, **schedule) == window_start(17, seed=5, **schedule)
    assert len({window_start(17, seed=s, **schedule) for s in range(20)}) > 1


@pytest.mark.parametrize(
    "bad, key",
    [
        (dict(window_size=0), "window_size"),
        (dict(window_size=10), "window_size"),
        (dict(shift_interval=0), "shift_interval"),
        (dict(stride=-1), "stride"),
        (dict(strategy="decay"), "strategy"),
    ],
)
def test_bad_window_settings_are_refused_naming_the_key(bad, key):
    args = dict(num_steps=10, window_size=4, shift_interval=5, stride=1) | bad
    with pytest.raises(ValueError, match=key):
        window_start(3, **args)


# ============================================================================ the compressed ODE tail
FLUX_SHIFT = 3.0
FLUX_LIKE_CONFIG = {"num_train_timesteps": 1000, "shift": FLUX_SHIFT, "use_dynamic_shifting": False}


def _flux_schedule(num_steps):
    """The original's full schedule, and ours for the same scheduler (the linspace spacing QwenImagePipeline uses)."""
    original = sd3_time_shift(FLUX_SHIFT, torch.linspace(1, 0, num_steps + 1))
    ours, _ = flow_match_sigmas(FLUX_LIKE_CONFIG, num_steps, 16, base_sigmas=np.linspace(1.0, 1 / num_steps, num_steps))
    return original, ours


@pytest.mark.parametrize("num_steps", [10, 16, 25])
@pytest.mark.parametrize("compress_ratio", [0.2, 0.4, 0.7])
def test_compressed_tail_matches_the_original_post_schedule(num_steps, compress_ratio):
    original_full, ours_full = _flux_schedule(num_steps)
    torch.testing.assert_close(ours_full, original_full, rtol=RTOL, atol=0)
    args = SimpleNamespace(dpm_post_compress_ratio=compress_ratio, shift=FLUX_SHIFT)
    checked = 0
    for window_end in range(1, num_steps - 1):
        determistic = [True] * num_steps
        for i in range(max(0, window_end - 4), window_end):
            determistic[i] = False
        original, last_false_index, original_points = post_sigma_schedule(args, original_full, determistic)
        points = tail_points(num_steps, window_end, compress_ratio)
        assert last_false_index == window_end - 1
        if original_points < 2:  # the original stops at the window's last sigma there (num_tail_points gives 2)
            assert points == 2
            continue
        assert points == original_points
        tail, timesteps = flow_match_tail_sigmas(
            FLUX_LIKE_CONFIG, num_steps, 16, window_end, points, base_sigmas=np.linspace(1.0, 1 / num_steps, num_steps)
        )
        ours = torch.cat([ours_full[:window_end], tail])
        torch.testing.assert_close(ours, original, rtol=RTOL, atol=0)
        torch.testing.assert_close(timesteps, tail[:-1] * 1000)
        checked += 1
    assert checked > 0


def test_tail_with_shift_terminal_starts_on_the_full_schedule_and_ends_at_zero():
    from verl_omni.pipelines.qwen_image.standin import QWEN_IMAGE_SCHEDULER_CONFIG

    steps, seq = 10, 64
    base = np.linspace(1.0, 1 / steps, steps)
    full, _ = flow_match_sigmas(QWEN_IMAGE_SCHEDULER_CONFIG, steps, seq, base_sigmas=base)
    # With as many points as steps left, the tail is the full schedule's own tail.
    tail, _ = flow_match_tail_sigmas(QWEN_IMAGE_SCHEDULER_CONFIG, steps, seq, 4, steps - 4 + 1, base_sigmas=base)
    torch.testing.assert_close(tail, full[4:], rtol=RTOL, atol=0)
    coarse, _ = flow_match_tail_sigmas(QWEN_IMAGE_SCHEDULER_CONFIG, steps, seq, 4, 3, base_sigmas=base)
    assert coarse[0] == full[4] and coarse[-1] == 0 and bool((coarse[:-1] > coarse[1:]).all())


# ============================================================================ DPM-Solver++ steps
def _random_history(generator, shape, count):
    return [torch.randn(shape, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("order, solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint")])
def test_dpm_solver_step_matches_the_original_update(order, solver_type):
    generator = torch.Generator().manual_seed(order * 10 + len(solver_type))
    sigmas, _ = _flux_schedule(12)
    args = SimpleNamespace(dpm_solver_type=solver_type, dpm_solver_order=order)
    update = {
        1: lambda hist, i, x: dpm_solver_first_order_update(args, hist[-1], sigmas, i, x),
        2: lambda hist, i, x: multistep_dpm_solver_second_order_update(args, hist, sigmas, i, x),
        3: lambda hist, i, x: multistep_dpm_solver_third_order_update(args, hist, sigmas, i, x),
    }[order]
    last = 12 if order == 1 else 11  # a step to sigma 0 is always first order
    for step_index in range(order - 1, last):
        sample = torch.randn(2, 4, 8, generator=generator)
        history = _random_history(generator, sample.shape, order)
        expected = update(history, step_index, sample)
        ours = dpm_solver_step(history, sample, sigmas, step_index, order, solver_type)
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, expected, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_solver_order_matches_the_original_choice(order):
    for num_steps in (6, 14, 15, 20):
        state = DPMState(order=order)
        for step_index in range(num_steps):
            lower_order_final = step_index == num_steps - 1
            lower_order_second = step_index == num_steps - 2 and num_steps < 15
            if order == 1 or state.lower_order_nums < 1 or lower_order_final:
                expected = 1
            elif order == 2 or state.lower_order_nums < 2 or lower_order_second:
                expected = 2
            else:
                expected = 3
            assert solver_order_at(step_index, num_steps, order, min(step_index, order)) == expected
            state.update_lower_order()


def _velocity_fn(seed, shape):
    """A fixed smooth stand-in for the transformer: v(x, t) = A x + t * b + c (float32; t per row or a scalar)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape[-1], shape[-1], generator=g) * 0.3
    b, c = torch.randn(shape[1:], generator=g), torch.randn(shape[1:], generator=g)
    return lambda x, t: x @ a + torch.as_tensor(t).reshape(-1, *([1] * (x.ndim - 1))) * b + c


def _ours_denoise(z, velocity_fn, num_steps, window, compress_ratio, order, solver_type, seeds, eta):
    """Our denoising loop with the MixGRPO-Flash tail, on the flux-like schedule (the transformer sees sigma)."""
    base = np.linspace(1.0, 1 / num_steps, num_steps)
    sigmas, timesteps = flow_match_sigmas(FLUX_LIKE_CONFIG, num_steps, 16, base_sigmas=base)

    def tail_schedule(start, points):
        tail, tail_timesteps = flow_match_tail_sigmas(FLUX_LIKE_CONFIG, num_steps, 16, start, points, base_sigmas=base)
        return tail, tail_timesteps / 1000

    params = DiffusionSamplingParams(
        num_inference_steps=num_steps,
        noise_level=eta,
        sde_window_size=window[1] - window[0],
        window_start=window[0],
        ode_solver="dpmsolver++",
        ode_solver_order=order,
        ode_solver_type=solver_type,
        ode_compress_ratio=compress_ratio,
        trajectory_window_only=True,
    ).validate()
    return denoise_with_logprobs(
        velocity_fn, z, sigmas, timesteps / 1000, params, make_generators(seeds), tail_schedule=tail_schedule
    )


@pytest.mark.parametrize("window", [(0, 4), (3, 7), (8, 11)])
@pytest.mark.parametrize("order, solver_type", [(2, "midpoint"), (2, "heun"), (3, "midpoint"), (1, "midpoint")])
def test_flash_sampler_matches_the_original_run_sample_step(window, order, solver_type):
    num_steps, compress_ratio, eta, seeds = 16, 0.4, 0.7, [3, 4]
    shape = (2, 6, 8)
    z0 = torch.randn(shape, generator=torch.Generator().manual_seed(sum(window) + order))
    velocity_fn = _velocity_fn(7, shape)
    # The window's step noise as our loop draws it: per sample from its own generator, one draw per window step.
    generators = make_generators(seeds)
    noises = [None] * num_steps
    for i in range(*window):
        noises[i] = torch.stack([torch.randn(shape[1:], generator=g) for g in generators])
    determistic = [not (window[0] <= i < window[1]) for i in range(num_steps)]
    args = SimpleNamespace(
        dpm_post_compress_ratio=compress_ratio,
        shift=FLUX_SHIFT,
        dpm_solver_order=order,
        dpm_solver_type=solver_type,
        eta=eta,
    )
    expected, expected_log_probs = run_sample_step_post(
        args, z0, _flux_schedule(num_steps)[0], velocity_fn, determistic, noises
    )
    ours = _ours_denoise(z0, velocity_fn, num_steps, window, compress_ratio, order, solver_type, seeds, eta)
    torch.testing.assert_close(ours.final_latents, expected, rtol=RTOL, atol=1e-5)
    for i in range(*window):
        torch.testing.assert_close(ours.log_probs[:, i], expected_log_probs[i], rtol=RTOL, atol=1e-5)
    # Not vacuous: with two or more tail steps a higher order changes the image against first-order steps.
    args.dpm_solver_order = 1
    first_order, _ = run_sample_step_post(args, z0, _flux_schedule(num_steps)[0], velocity_fn, determistic, noises)
    if order > 1 and tail_points(num_steps, window[1], compress_ratio) > 2:
        assert (first_order - expected).abs().max() > 1e-3


# ============================================================================ advantages and loss
@pytest.mark.parametrize("num_generations", [2, 4, 12])
def test_advantages_match_the_original(num_generations):
    g = torch.Generator().manual_seed(num_generations)
    rewards = torch.rand(num_generations * 5, generator=g)
    expected = original_advantages(rewards, num_generations)
    ours = group_advantages(rewards, np.repeat(np.arange(5), num_generations))
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=RTOL, atol=1e-6)


def test_advantages_of_all_equal_groups_and_singletons_are_exactly_zero():
    ours = group_advantages(torch.tensor([0.1] * 12 + [0.3]), [0] * 12 + [1])
    assert torch.equal(ours, torch.zeros(13))


@pytest.mark.parametrize("clip_range, adv_clip_max", [(1e-4, 5.0), (0.2, 1.0)])
def test_clipped_loss_is_flowgrpos_with_the_originals_values(clip_range, adv_clip_max):
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        old = torch.randn(8, generator=g)
        new = (old + 1e-3 * torch.randn(8, generator=g) * torch.rand(1, generator=g) * 100).requires_grad_(True)
        advantages = 4 * torch.randn(8, generator=g)
        loss, policy_loss, kl_loss, clip_frac = original_step_loss(new, old, advantages, clip_range, adv_clip_max)
        (expected_grad,) = torch.autograd.grad(loss, new)
        ours, metrics = flowgrpo_policy_loss(new, old, advantages, clip_range, adv_clip_max=adv_clip_max)
        (our_grad,) = torch.autograd.grad(ours, new)
        torch.testing.assert_close(ours, loss, rtol=RTOL, atol=1e-7)
        torch.testing.assert_close(our_grad, expected_grad, rtol=RTOL, atol=1e-8)
        assert metrics["approx_kl"] == pytest.approx(kl_loss.item(), rel=RTOL)
        assert metrics["clip_frac"] == pytest.approx(clip_frac.item(), rel=RTOL)
