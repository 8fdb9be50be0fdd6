"""Flow-matching SDE steps with log-probabilities (FlowGRPO), sigma schedules and the SDE window.

Everything here is a pure function of its arguments: no scheduler object, no step counter, no global RNG.

Conventions (as in diffusers' ``FlowMatchEulerDiscreteScheduler``): ``x_sigma = (1 - sigma) * x0 + sigma * noise``,
the model predicts the velocity ``v = noise - x0``, sigmas decrease from ~1 to the terminal 0 and a step goes
from ``sigma`` to ``sigma_next < sigma`` (``dt = sigma_next - sigma < 0``).

Both step types follow the reference implementation of FlowGRPO,
https://github.com/yifan123/flow_grpo/blob/main/flow_grpo/diffusers_patch/sd3_sde_with_logprob.py
(``sde_step_with_logprob``, commit 54809b5): the same means, standard deviations and log-probs, including its
``sigma_max`` convention (FlowGRPO passes ``scheduler.sigmas[1]``, the first sigma below 1, to keep the ``sde``
std finite at sigma == 1) and its cps log-prob with all constants removed.

The log-prob formula exists once, in ``_transition_log_prob``. The rollout samples with
:func:`sde_step_with_logprob`; the trainer scores a stored transition with the same function
(``prev_sample=...``, which also gives the step mean its KL term needs); :func:`compute_log_prob` is the
log-prob alone. All three share the same private helpers, so rollout and training cannot drift apart.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

SDE_TYPES = ("sde", "cps")

SigmaLike = Union[float, torch.Tensor]


@dataclass
class SDEStepOutput:
    """Result of one stochastic step x_sigma -> x_sigma_next.

    - prev_sample:      the new latents (x at ``sigma_next``), in the compute dtype (float32 / float64)
    - log_prob:         [B] log-density of ``prev_sample`` under the step's Gaussian, mean over non-batch dims
    - prev_sample_mean: the Gaussian's mean (the deterministic part of the step)
    - std_dev_t:        FlowGRPO's ``std_dev_t`` (before the ``sqrt(-dt)`` factor for ``sde``), broadcastable
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    prev_sample_mean: torch.Tensor
    std_dev_t: torch.Tensor


# --------------------------------------------------------------------------------------------- helpers
def _compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16 overflows in the mean, as FlowGRPO notes)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _as_batch_sigma(sigma: SigmaLike, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A scalar or per-sample [B] sigma, shaped [B or 1, 1, ..., 1] to broadcast against ``like``."""
    sigma = torch.as_tensor(sigma, dtype=dtype, device=like.device)
    if sigma.ndim > 1:
        sigma = sigma.flatten()
    if sigma.ndim == 1 and sigma.numel() not in (1, like.shape[0]):
        raise ValueError(f"sigma has {sigma.numel()} entries for a batch of {like.shape[0]}")
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))


def _check_sde_type(sde_type: str) -> None:
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type={sde_type!r} is not one of {SDE_TYPES}")


def _transition_mean_std(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    noise_level: float,
    sde_type: str,
    sigma_max: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and std of the Gaussian p(x_next | x); returns (mean, step_std, std_dev_t).

    ``step_std`` is the standard deviation of the added noise: ``std_dev_t * sqrt(-dt)`` for ``sde`` and
    ``std_dev_t`` for ``cps``.
    """
    dt = sigma_next - sigma
    if sde_type == "sde":
        # sigma == 1 would divide by zero; FlowGRPO substitutes sigma_max there.
        std_dev_t = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma)))
        mean = (
            sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
            + model_output * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        )
        step_std = std_dev_t * torch.sqrt(-dt)
    else:  # cps: coefficient-preserving sampling
        std_dev_t = sigma_next * math.sin(noise_level * math.pi / 2)
        pred_original_sample = sample - sigma * model_output  # x0 estimate
        noise_estimate = sample + model_output * (1 - sigma)  # x1 estimate
        mean = pred_original_sample * (1 - sigma_next) + noise_estimate * torch.sqrt(sigma_next**2 - std_dev_t**2)
        step_std = std_dev_t
    return mean, step_std, std_dev_t


def _transition_log_prob(
    prev_sample: torch.Tensor, mean: torch.Tensor, step_std: torch.Tensor, sde_type: str
) -> torch.Tensor:
    """[B] log-prob of ``prev_sample``, averaged over all non-batch dims (FlowGRPO's reduction)."""
    diff = prev_sample.detach() - mean
    if sde_type == "sde":
        log_prob = -(diff**2) / (2 * step_std**2) - torch.log(step_std) - 0.5 * math.log(2 * math.pi)
    else:
        # FlowGRPO's cps log-prob drops every constant (its std does not depend on the model).
        log_prob = -(diff**2)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


# --------------------------------------------------------------------------------------------- public steps
def compute_log_prob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    prev_sample: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    *,
    noise_level: float,
    sde_type: str,
    sigma_max: float,
) -> torch.Tensor:
    """Log-prob [B] of a stored transition ``sample -> prev_sample`` under the policy's velocity ``model_output``.

    The log-prob alone (the trainer uses ``sde_step_with_logprob(prev_sample=...)``, which shares this formula and
    also returns the step mean for the KL term); differentiable w.r.t. ``model_output``.
    ``sigma`` / ``sigma_next`` may be scalars or per-sample [B] tensors; ``sigma_max`` comes from
    :func:`reference_sigma_max` of the stored schedule.
    """
    _check_sde_type(sde_type)
    if noise_level <= 0:
        raise ValueError(f"noise_level={noise_level} > 0 required: a deterministic step has no log-density")
    dtype = _compute_dtype(model_output, sample, prev_sample)
    sample = sample.to(dtype)
    sigma_t = _as_batch_sigma(sigma, sample, dtype)
    sigma_next_t = _as_batch_sigma(sigma_next, sample, dtype)
    mean, step_std, _ = _transition_mean_std(
        model_output.to(dtype), sample, sigma_t, sigma_next_t, noise_level, sde_type, sigma_max
    )
    return _transition_log_prob(prev_sample.to(dtype), mean, step_std, sde_type)


def sde_step_with_logprob(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    *,
    noise_level: float,
    sde_type: str = "sde",
    sigma_max: float,
    prev_sample: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
) -> SDEStepOutput:
    """One FlowGRPO step x_sigma -> x_sigma_next; draws nothing itself (pass ``noise`` or ``prev_sample``).

    With ``noise_level == 0`` the step is the plain Euler ODE step ``sample + dt * model_output`` (both types) and
    the log-prob is reported as 0 (a deterministic step has no density).
    """
    _check_sde_type(sde_type)
    if prev_sample is None and noise is None:
        raise ValueError("sde_step_with_logprob needs `noise` (to sample) or `prev_sample` (to score)")
    dtype = _compute_dtype(model_output, sample, prev_sample, noise)
    model_output = model_output.to(dtype)
    sample = sample.to(dtype)
    sigma_t = _as_batch_sigma(sigma, sample, dtype)
    sigma_next_t = _as_batch_sigma(sigma_next, sample, dtype)

    if noise_level == 0:
        prev_mean = euler_step(model_output, sample, sigma_t, sigma_next_t)
        zero = torch.zeros(sample.shape[0], dtype=dtype, device=sample.device)
        out = prev_mean if prev_sample is None else prev_sample.to(dtype)
        return SDEStepOutput(out, zero, prev_mean, torch.zeros_like(sigma_t))

    mean, step_std, std_dev_t = _transition_mean_std(
        model_output, sample, sigma_t, sigma_next_t, noise_level, sde_type, sigma_max
    )
    if prev_sample is None:
        prev_sample = mean + step_std * noise.to(dtype)
    else:
        prev_sample = prev_sample.to(dtype)
    # (cps at sigma_next == 0 is deterministic; its constant-free log-prob is then exactly 0.)
    log_prob = _transition_log_prob(prev_sample, mean, step_std, sde_type)
    return SDEStepOutput(prev_sample, log_prob, mean, std_dev_t)


def euler_step(
    model_output: torch.Tensor, sample: torch.Tensor, sigma: SigmaLike, sigma_next: SigmaLike
) -> torch.Tensor:
    """The deterministic (ODE) flow-matching Euler step, as diffusers' ``FlowMatchEulerDiscreteScheduler.step``."""
    dtype = _compute_dtype(model_output, sample)
    sample = sample.to(dtype)
    sigma_t = _as_batch_sigma(sigma, sample, dtype)
    sigma_next_t = _as_batch_sigma(sigma_next, sample, dtype)
    return sample + (sigma_next_t - sigma_t) * model_output.to(dtype)


def reference_sigma_max(sigmas: Union[Sequence[float], torch.Tensor]) -> float:
    """The ``sigma_max`` FlowGRPO uses for a schedule: ``sigmas[1]``, the first sigma after the initial 1.0.

    Rollout and training must pass the same value to the step / ``compute_log_prob``; both take it from the
    stored ``sigmas`` [T+1] through this function.
    """
    sigmas = torch.as_tensor(sigmas)
    return float(sigmas[1] if sigmas.numel() > 1 else sigmas[0])


# --------------------------------------------------------------------------------------------- window
def choose_window(seed: int, num_steps: int, window_size: int, window_range: Optional[Sequence[int]] = None) -> int:
    """Start of the SDE window, a deterministic function of ``seed`` (one seed per prompt group).

    ``window_range = (lo, hi)`` bounds the start inclusively; default ``(0, num_steps - window_size)``.
    ``window_size == 0`` (every step stochastic) always starts at 0.
    """
    if window_size < 0 or window_size > num_steps:
        raise ValueError(f"window_size={window_size} must be in [0, num_steps={num_steps}]")
    if window_size == 0:
        return 0
    lo, hi = (0, num_steps - window_size) if window_range is None else (int(window_range[0]), int(window_range[1]))
    if not (0 <= lo <= hi <= num_steps - window_size):
        raise ValueError(
            f"window_range={window_range!r} must satisfy 0 <= lo <= hi <= num_steps - window_size = "
            f"{num_steps - window_size}"
        )
    # A private Random instance: the window never depends on (or disturbs) the global RNG state.
    return random.Random(int(seed)).randint(lo, hi)


# --------------------------------------------------------------------------------------------- sigmas
def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent ``mu`` (linear in the packed image sequence length), as the diffusers pipelines."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def flow_match_sigmas(
    scheduler_config: dict,
    num_inference_steps: int,
    image_seq_len: int,
    *,
    base_sigmas: Optional[Sequence[float]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [T+1] float32 incl. the terminal 0, timesteps [T] float32 = sigma * num_train_timesteps).

    Mirrors ``FlowMatchEulerDiscreteScheduler.set_timesteps`` of diffusers 0.38 op for op (same numpy dtypes):
    - ``base_sigmas=None``: diffusers' default spacing, ``linspace(sigma_max, sigma_min)`` of the *init-time*
      (already shifted) training sigmas -- what ``StableDiffusion3Pipeline`` uses;
    - ``base_sigmas=linspace(1, 1/T, T)``: what ``QwenImagePipeline`` passes.
    Then ``shift`` (or dynamic shifting with ``mu = calculate_shift(image_seq_len, ...)``), then ``shift_terminal``.
    ``image_seq_len`` is the transformer's image token count (packed latents / patchified latents).
    """
    cfg = _checked_scheduler_config(scheduler_config)
    num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
    times = _base_times(cfg, num_inference_steps, base_sigmas)
    sigmas = _shift_times(cfg, times, image_seq_len)
    shift_terminal = cfg.get("shift_terminal")
    if shift_terminal:
        if num_inference_steps < 2:
            # diffusers divides 0 by 0 here (a one-point schedule cannot be stretched) and returns NaN sigmas.
            raise ValueError("shift_terminal needs num_inference_steps >= 2 (diffusers yields NaN sigmas for 1)")
        sigmas = _stretch_to_terminal(sigmas, _terminal_scale(sigmas, shift_terminal))

    sigmas = torch.from_numpy(np.asarray(sigmas)).to(dtype=torch.float32)
    timesteps = sigmas * num_train_timesteps
    sigmas = torch.cat([sigmas, torch.zeros(1)])
    return sigmas, timesteps


def _checked_scheduler_config(scheduler_config: dict) -> dict:
    cfg = dict(scheduler_config)
    for unsupported in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
        if cfg.get(unsupported):
            raise NotImplementedError(f"flow_match_sigmas does not implement {unsupported}=True")
    return cfg


def _base_times(cfg: dict, num_inference_steps: int, base_sigmas: Optional[Sequence[float]]) -> np.ndarray:
    """The T unshifted float32 times the schedule is built from (diffusers' spacing or the pipeline's own)."""
    num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
    if base_sigmas is None:
        # The scheduler's __init__ computes float32 training sigmas, shifted unless dynamic shifting is on.
        train_sigmas = torch.from_numpy(np.array([num_train_timesteps, 1], dtype=np.float32)) / num_train_timesteps
        if not cfg.get("use_dynamic_shifting", False):
            shift = float(cfg.get("shift", 1.0))
            train_sigmas = shift * train_sigmas / (1 + (shift - 1) * train_sigmas)
        sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[1].item()
        timesteps = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_inference_steps)
        return timesteps / num_train_timesteps
    if len(base_sigmas) != num_inference_steps:
        raise ValueError(f"base_sigmas has {len(base_sigmas)} entries, expected {num_inference_steps}")
    return np.array(base_sigmas).astype(np.float32)


def _shift_times(cfg: dict, times: np.ndarray, image_seq_len: int) -> np.ndarray:
    """The scheduler's time shift (static ``shift``, or dynamic with ``mu`` from the image sequence length)."""
    if cfg.get("use_dynamic_shifting", False):
        mu = calculate_shift(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        if cfg.get("time_shift_type", "exponential") == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / times - 1) ** 1.0)
        return mu / (mu + (1 / times - 1) ** 1.0)
    shift = float(cfg.get("shift", 1.0))
    return shift * times / (1 + (shift - 1) * times)


def _terminal_scale(sigmas: np.ndarray, shift_terminal: float):
    """diffusers' ``stretch_shift_to_terminal`` scale: the last sigma of the schedule lands on ``shift_terminal``."""
    return (1 - sigmas)[-1] / (1 - shift_terminal)


def _stretch_to_terminal(sigmas: np.ndarray, scale_factor) -> np.ndarray:
    return 1 - ((1 - sigmas) / scale_factor)


def flow_match_tail_sigmas(
    scheduler_config: dict,
    num_inference_steps: int,
    image_seq_len: int,
    start_index: int,
    num_points: int,
    *,
    base_sigmas: Optional[Sequence[float]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A coarser schedule for the rest of a run from step ``start_index`` of the T-step schedule to sigma 0.

    (sigmas [num_points] float32 from ``sigmas[start_index]`` of :func:`flow_match_sigmas` (same arguments) down to
    the terminal 0, timesteps [num_points - 1] = sigma * num_train_timesteps.) The points are evenly spaced in the
    schedule's unshifted time, from the time of ``start_index`` (the terminal 0 has time 0) to 0, then shifted
    exactly as the full schedule (its ``shift_terminal`` stretch included): MixGRPO-Flash's compressed ODE
    schedule after the SDE window (Tencent-Hunyuan/MixGRPO, fastvideo/utils/sampling_utils.py ``run_sample_step``:
    ``sd3_time_shift(shift, linspace(t, 0, n))``), for any flow-matching scheduler config.
    """
    if num_points < 2:
        raise ValueError(f"num_points={num_points} must be >= 2 (the tail must reach sigma 0)")
    if not 0 <= start_index < num_inference_steps:
        raise ValueError(f"start_index={start_index} must be in [0, num_inference_steps={num_inference_steps})")
    full_sigmas, _ = flow_match_sigmas(scheduler_config, num_inference_steps, image_seq_len, base_sigmas=base_sigmas)
    cfg = _checked_scheduler_config(scheduler_config)
    num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
    times = _base_times(cfg, num_inference_steps, base_sigmas)
    start_time = float(times[start_index])
    tail_times = torch.linspace(start_time, 0.0, num_points, dtype=torch.float32).numpy()[1:-1]
    tail = _shift_times(cfg, tail_times, image_seq_len)
    shift_terminal = cfg.get("shift_terminal")
    if shift_terminal:
        tail = _stretch_to_terminal(tail, _terminal_scale(_shift_times(cfg, times, image_seq_len), shift_terminal))
    # The first point is the full schedule's own sigma (bit for bit), the last the terminal 0.
    tail = torch.from_numpy(np.asarray(tail, dtype=np.float32).reshape(-1))
    sigmas = torch.cat([full_sigmas[start_index : start_index + 1], tail, torch.zeros(1)])
    return sigmas, sigmas[:-1] * num_train_timesteps


__all__ = [
    "SDE_TYPES",
    "SDEStepOutput",
    "calculate_shift",
    "choose_window",
    "compute_log_prob",
    "euler_step",
    "flow_match_sigmas",
    "flow_match_tail_sigmas",
    "reference_sigma_max",
    "sde_step_with_logprob",
]
