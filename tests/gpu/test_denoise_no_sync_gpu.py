"""The rollout's denoising loop never makes the host wait for the GPU (run on the device: scripts/device/).

A host wait inside the loop leaves the GPU idle while the host launches the next step's first kernels: at the
real size the profile showed ~15 ms of idle per step while each step's sigmas were copied from host scalars
(a copy from pageable host memory waits for the queued forward). PyTorch's sync debug mode raises on every
synchronising call, so the loop runs under it here, on the GPU fixture's Qwen-Image (2 layers, real width) with
the recipe's CFG and an SDE window; a negative control shows the mode catches a host-scalar copy.
"""

from __future__ import annotations

import logging

import pytest
import torch
from gpu_helpers import requires_cuda

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.pipelines.common import denoise_with_logprobs, make_generators, negative_prompt_for
from verl_omni.schedulers.flow_match_sde import sde_step_with_logprob

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.fixture(scope="module")
def pipe(gpu_qwen_image_dir):
    from verl_omni.pipelines.qwen_image import QwenImageRLPipeline

    pipe = QwenImageRLPipeline.from_pretrained(gpu_qwen_image_dir, torch_dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_denoising_loop_has_no_host_sync(pipe):
    params = DiffusionSamplingParams(
        num_inference_steps=6, height=256, width=256, guidance_scale=4.0, sde_window_size=2, noise_level=0.7
    )
    seeds = [0, 1, 2, 3]
    pipe.rl_generate("a red cat", seeds, params)  # warms the lazily cached RoPE tables and the kernels
    negative = negative_prompt_for(params, logging.getLogger(__name__), "no_sync_test")
    cond = pipe.encode_conditions("a red cat", negative, params).conditioning.repeat(len(seeds))
    generators = make_generators(seeds)
    latents = pipe.prepare_rl_latents(len(seeds), params, generators, torch.device("cuda"))
    inputs = pipe.prepare_model_inputs(cond, params.guidance_scale, params.batch_cfg, device=latents.device)
    sigmas, timesteps = pipe.rl_schedule(params)
    torch.cuda.synchronize()

    def velocity(x, t):
        return pipe.predict_velocity(x, t, inputs, params.guidance_scale, params.height, params.width)

    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            result = denoise_with_logprobs(velocity, latents, sigmas, timesteps, params, generators)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert result.window_mask.sum() == params.sde_window_size
    assert torch.isfinite(result.log_probs).all() and (result.log_probs[:, result.window_mask] != 0).all()

    # Negative control: the step with host scalars for sigma (what the loop did before) waits for the device.
    sample = torch.randn(2, 8, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            sde_step_with_logprob(
                sample, sample, torch.tensor(0.8), torch.tensor(0.6), noise_level=0.7, sigma_max=0.9, noise=sample
            )
    finally:
        torch.cuda.set_sync_debug_mode(previous)
