"""The model-independent pieces of ``rl_generate``: per-sample randomness, the windowed SDE denoising loop, image
conversion, the output's one copy to the host.

Per-sample randomness is what makes a batched rollout equal to N single rollouts: sample i draws its initial
noise and every step noise from its own CPU ``torch.Generator`` seeded with ``seeds[i]``, so nothing it gets
depends on its batch position or the batch size (and CPU generators give the same numbers on any device).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.conditioning import Conditioning
from verl_omni.core.outputs import RLBatchOutput
from verl_omni.schedulers.dpm_solver import dpm_solver_step, solver_order_at, tail_points, x0_from_velocity
from verl_omni.schedulers.flow_match_sde import euler_step, reference_sigma_max, sde_step_with_logprob

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (start_index, num_points) -> (sigmas [num_points], model timesteps [num_points - 1]): the pipeline's coarser
# schedule from step start_index to sigma 0 (``rl_tail_schedule``).
TailScheduleFn = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]

_LOGGED_ONCE: set[str] = set()


class RequestAborted(RuntimeError):
    """The engine was asked to abort this request (``interrupt()`` returned True) between denoising steps."""


def log_once(logger: logging.Logger, key: str, message: str) -> None:
    """Info-log ``message`` the first time ``key`` is seen in this process."""
    if key not in _LOGGED_ONCE:
        _LOGGED_ONCE.add(key)
        logger.info(message)


def negative_prompt_for(params: DiffusionSamplingParams, logger: logging.Logger, key: str) -> Optional[str]:
    """The negative prompt under guidance: the given one, or the empty prompt (said once); None without guidance."""
    if params.guidance_scale <= 1:
        return None
    if params.negative_prompt is None:
        log_once(logger, key, "guidance_scale > 1 without negative_prompt: using the empty prompt as the negative")
        return ""
    return params.negative_prompt


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample (diffusers' ``randn_tensor`` draws row i from generator i)."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def window_mask_for(params: DiffusionSamplingParams) -> torch.Tensor:
    """bool [T]: the steps that are stochastic and carry log-probs. With noise_level 0 no step is stochastic."""
    mask = torch.zeros(params.num_inference_steps, dtype=torch.bool)
    if params.noise_level > 0:
        start, end = params.window_steps()
        mask[start:end] = True
    return mask


def trajectory_positions(params: DiffusionSamplingParams) -> list[int]:
    """Which of the T+1 latents (position j = the input of step j; T = x_0) a call returns: none without
    ``return_trajectory``; else those the window's transitions read (x_s and x_{s+1} for each window step s) with
    ``trajectory_window_only``, plus ``keep_latent_steps``; all of them when neither is set."""
    if not params.return_trajectory:
        return []
    last = params.num_inference_steps
    if not params.trajectory_window_only and params.keep_latent_steps is None:
        return list(range(last + 1))
    keep = {p % (last + 1) for p in params.keep_latent_steps or ()}
    if params.trajectory_window_only:
        steps = torch.nonzero(window_mask_for(params)).flatten().tolist()
        keep |= {p for s in steps for p in (s, s + 1)}
    return sorted(keep)


@dataclass
class DenoiseResult:
    final_latents: torch.Tensor  # [B, *latent_shape], float32
    trajectory: torch.Tensor  # [B, K, *latent_shape]: the latents at ``latent_steps`` (all: x_T .. x_0), or K = 0
    log_probs: torch.Tensor  # float32 [B, T] on the latents' device, 0 outside the window
    window_mask: torch.Tensor  # bool [T]
    latent_steps: torch.Tensor  # int64 [K]: the trajectory position of each kept latent


def draw_step_noise(
    sample_shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device
) -> torch.Tensor:
    """[B, *sample_shape] float32 noise of one stochastic step on ``device``: row i from ``generators[i]``, on the
    host (the same numbers on every device), then one copy that does not make the host wait (pinned memory)."""
    noise = torch.stack([torch.randn(tuple(sample_shape), generator=g, dtype=torch.float32) for g in generators])
    return to_device_without_wait(noise, device)


def to_device_without_wait(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to CUDA through pinned memory, a copy the host does not wait for (a copy from
    pageable memory waits for everything queued on the stream first)."""
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def solver_walk(
    sigmas: torch.Tensor,
    model_timesteps: torch.Tensor,
    params: DiffusionSamplingParams,
    tail_schedule: Optional[TailScheduleFn],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sigmas, model timesteps, first solver step) the loop walks: the schedule itself with ``ode_solver="euler"``
    (no solver step: T); with "dpmsolver++" its first ``end`` steps (up to the SDE window's end) and then the
    pipeline's compressed tail to sigma 0."""
    num_steps = model_timesteps.shape[0]
    if params.ode_solver == "euler":
        return sigmas, model_timesteps, num_steps
    if tail_schedule is None:
        raise ValueError(f"ode_solver={params.ode_solver!r} needs the pipeline's tail schedule (rl_tail_schedule)")
    end = params.window_steps()[1]
    tail_sigmas, tail_timesteps = tail_schedule(end, tail_points(num_steps, end, params.ode_compress_ratio))
    walk_sigmas = torch.cat([sigmas[:end].float(), tail_sigmas.float()])
    walk_timesteps = torch.cat([model_timesteps[:end].float(), tail_timesteps.float()])
    return walk_sigmas, walk_timesteps, end


def denoise_with_logprobs(
    velocity_fn: VelocityFn,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    model_timesteps: torch.Tensor,
    params: DiffusionSamplingParams,
    generators: Sequence[torch.Generator],
    interrupt: Optional[Callable[[], bool]] = None,
    tail_schedule: Optional[TailScheduleFn] = None,
) -> DenoiseResult:
    """Run T steps from ``latents`` (x_T): SDE steps with log-probs inside the window, ODE steps elsewhere.

    ``velocity_fn(latents, timestep[B])`` is the pipeline's ``predict_velocity`` (CFG included); ``model_timesteps``
    [T] is what the transformer receives per step, ``sigmas`` [T+1] what the scheduler math uses.
    The ODE steps are Euler steps; with ``params.ode_solver="dpmsolver++"`` those after the window are multistep
    DPM-Solver++ steps on the compressed schedule ``tail_schedule`` gives (MixGRPO-Flash): the solver keeps the data
    prediction of every step, the window's and the Euler steps' before it included.
    Step noise is drawn only inside the window, from each sample's own generator, on the host after the step's
    forward is queued, so the host draws while the device computes (drawn up front, it would leave the GPU idle).
    Nothing here waits for the device: log-probs and the
    trajectory stay on it, and ``to_batch_output`` brings them to the host with the images in one wait.
    """
    batch_size = latents.shape[0]
    num_steps = model_timesteps.shape[0]
    device = latents.device
    window_mask = window_mask_for(params)
    sigma_max = reference_sigma_max(sigmas)
    walk_sigmas, walk_timesteps, solver_from = solver_walk(sigmas, model_timesteps, params, tail_schedule)
    num_walk = walk_timesteps.shape[0]
    order = params.ode_solver_order
    # float32 values, as diffusers' scheduler.sigmas, staged on the device once: a host scalar here would be
    # copied to the device inside each step, and a copy from pageable host memory makes the host wait for the
    # queued forward; the GPU then idles while the host launches the next step (tests/gpu/test_denoise_no_sync_gpu.py
    # checks the loop under CUDA's sync debug mode).
    step_sigmas = to_device_without_wait(walk_sigmas.to(dtype=torch.float32), device)
    step_timesteps = to_device_without_wait(walk_timesteps.to(dtype=torch.float32), device)

    latents = latents.to(torch.float32)
    keep = set(trajectory_positions(params))
    trajectory = [latents] if 0 in keep else []
    log_probs = torch.zeros(batch_size, num_steps, dtype=torch.float32, device=device)
    x0_preds: list[torch.Tensor] = []  # the solver's data predictions, the last `order` steps'
    for i in range(num_walk):
        if interrupt is not None and interrupt():  # a host-side flag (the request was aborted): no device sync
            raise RequestAborted(f"request aborted before denoising step {i} of {num_walk}")
        velocity = velocity_fn(latents, step_timesteps[i].expand(batch_size))
        sigma, sigma_next = step_sigmas[i], step_sigmas[i + 1]
        if solver_from < num_walk:
            x0_preds = [*x0_preds, x0_from_velocity(velocity.float(), latents, sigma)][-order:]
        if i < num_steps and window_mask[i]:
            noise = draw_step_noise(latents.shape[1:], generators, device)
            step = sde_step_with_logprob(
                velocity,
                latents,
                sigma,
                sigma_next,
                noise_level=float(params.noise_level),
                sde_type=params.sde_type,
                sigma_max=sigma_max,
                noise=noise,
            )
            latents = step.prev_sample.to(torch.float32)
            log_probs[:, i] = step.log_prob.float()
        elif i >= solver_from:
            step_order = solver_order_at(i, num_walk, order, min(i, order))
            latents = dpm_solver_step(x0_preds, latents, step_sigmas, i, step_order, params.ode_solver_type)
        else:
            latents = euler_step(velocity, latents, sigma, sigma_next).to(torch.float32)
        if i + 1 in keep:
            trajectory.append(latents)

    if trajectory:
        stacked = torch.stack(trajectory, dim=1)
    else:
        stacked = latents.new_empty((batch_size, 0, *latents.shape[1:]))
    latent_steps = torch.tensor(sorted(keep), dtype=torch.int64)
    return DenoiseResult(latents, stacked, log_probs, window_mask, latent_steps)


def to_uint8_images(decoded: torch.Tensor) -> torch.Tensor:
    """VAE output in [-1, 1], [B, 3, H, W] -> uint8 [B, H, W, 3] on the same device (diffusers' postprocess + PIL
    rounding); ``to_batch_output`` brings it to the host with the other outputs."""
    images = (decoded.float() / 2 + 0.5).clamp(0, 1)
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def decode_in_batches(decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor, rows: int) -> torch.Tensor:
    """``decode(latents)``, ``rows`` rows of the final latents at a time (0: all at once), the media concatenated:
    the decode's working memory is then that of ``rows`` rows (``vae_decode_batch``)."""
    if rows <= 0 or latents.shape[0] <= rows:
        return decode(latents)
    return torch.cat([decode(part) for part in latents.split(rows)])


def decode_scaled_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Spatial latents [B, C, h, w] -> uint8 [B, H, W, 3] through an ``AutoencoderKL`` with its scaling and shift
    factors undone, as the stock FLUX and SD3 pipelines decode."""
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return to_uint8_images(vae.decode(latents, return_dict=False)[0])


def to_uint8_video(decoded: torch.Tensor) -> torch.Tensor:
    """3D VAE output in [-1, 1], [B, 3, F, H, W] -> uint8 frames [B, F, H, W, 3] on the same device (the same
    rounding as :func:`to_uint8_images`, frame by frame)."""
    frames = decoded.permute(0, 2, 1, 3, 4)  # [B, F, 3, H, W]
    return to_uint8_images(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])


def expand_timestep(timestep: torch.Tensor | float, batch_size: int, device: torch.device) -> torch.Tensor:
    """A scalar or [B] timestep as a float32 [B] tensor on ``device``."""
    timestep = torch.as_tensor(timestep, dtype=torch.float32, device=device)
    if timestep.ndim == 0:
        timestep = timestep.expand(batch_size)
    if timestep.shape != (batch_size,):
        raise ValueError(f"timestep has shape {tuple(timestep.shape)}, expected a scalar or ({batch_size},)")
    return timestep


def to_host(tensors: dict[str, Optional[torch.Tensor]]) -> dict[str, Optional[torch.Tensor]]:
    """Device tensors -> CPU, copied into pinned memory without waiting one by one, then one sync (a pageable
    copy runs at about half the speed and blocks per tensor). CPU tensors and None pass through."""
    out: dict[str, Optional[torch.Tensor]] = {}
    on_cuda = False
    for name, t in tensors.items():
        if t is None or t.device.type != "cuda":
            out[name] = None if t is None else t.detach()
            continue
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t.detach(), non_blocking=True)
        out[name] = host
        on_cuda = True
    if on_cuda:
        torch.cuda.current_stream().synchronize()
    return out


def to_batch_output(
    media: torch.Tensor,
    result: DenoiseResult,
    sigmas: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    seeds: list[int],
    truncated_prompt_tokens: int = 0,
    sampling: Optional[dict] = None,
) -> RLBatchOutput:
    """The rollout record of one call: ``media`` uint8 [B, H, W, 3] images or [B, F, H, W, 3] videos, ``cond``
    (B rows) stored under ``RLBatchOutput``'s embedding field names, ``sampling`` the call's settings (a dict)."""
    host = to_host({"media": media, "latents": result.trajectory, "log_probs": result.log_probs, **cond.as_fields()})
    return RLBatchOutput(
        window_mask=result.window_mask,
        timesteps=timesteps.float().cpu(),
        sigmas=sigmas.float().cpu(),
        latent_steps=result.latent_steps,
        seeds=seeds,
        truncated_prompt_tokens=int(truncated_prompt_tokens),
        sampling=sampling,
        **host,
    )
