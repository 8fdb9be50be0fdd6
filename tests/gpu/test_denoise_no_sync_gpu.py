"""The rollout's denoising loop never makes the host wait for the GPU (run on the device: scripts/device/).

A host wait inside the loop leaves the GPU idle while the host launches the next step's first kernels: at the
real size the profile showed ~15 ms of idle per step while each step's sigmas were copied from host scalars
(a copy from pageable host memory waits for the queued forward). PyTorch's sync debug mode reports every
synchronising call it knows of, so the loop runs under it here, on the GPU fixture's Qwen-Image (2 layers, real
width) with the recipe's CFG and an SDE window, and the test names the line of each wait it saw; a negative
control shows the mode catches a host-scalar copy. The sync mode is a prototype that "does not yet detect all
synchronizing operations": the profile's idle analysis (benchmarks/pipeline_breakdown.py) is the other check.

Three configurations. ``engine``: the vllm-omni engine's (FA3, the q/k kernel, the CFG branches as two unmasked
forwards): no wait at all; ``engine_dpm``: the same with DPM-Solver++ steps on a compressed schedule after the
window (``ode_solver="dpmsolver++"``, MixGRPO-Flash): no wait either. ``masked``: no fused kernel, so the branches
run as one masked forward (the diffusers engine's rollout): diffusers 0.38's ``compute_text_seq_len_from_mask``
copies a host int to the device in every masked forward (``torch.as_tensor(text_seq_len, device=...)``), so there
the test asserts that every wait is in diffusers' transformer and none in verl_omni's code.
"""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from gpu_helpers import requires_cuda, write_figures

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.pipelines.common import denoise_with_logprobs, make_generators, negative_prompt_for
from verl_omni.schedulers.flow_match_sde import sde_step_with_logprob

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.fixture(scope="module")
def pipe(gpu_qwen_image_dir):
    from verl_omni.pipelines.qwen_image.pipeline import QwenImageRLPipeline

    pipe = QwenImageRLPipeline.from_pretrained(gpu_qwen_image_dir, torch_dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _syncs_during(fn):
    """``fn()`` under CUDA's sync debug mode "warn": its result and where each synchronising call came from (the
    Python line that made it; the "error" mode would stop at the first and hide the rest)."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    syncs = [
        f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught if "synchronizing CUDA operation" in str(w.message)
    ]
    return result, syncs


def _use_engine_attention(pipe, engine: bool) -> None:
    """The vllm-omni engine's attention (FA3 + the q/k kernel, options as the engine's defaults) or diffusers'."""
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    from verl_omni.config.base import to_plain
    from verl_omni.config.model import ModelConfig
    from verl_omni.rollout.engines.vllm_omni.worker import attention_options, resolve_flash_attention

    if not engine:
        pipe._attention_fn = None
        for block in pipe.transformer.transformer_blocks:
            block.attn.set_processor(QwenDoubleStreamAttnProcessor2_0())
        return
    flash = resolve_flash_attention()
    if flash is None:
        pytest.skip("vllm-omni's flash attention is not installed")
    defaults = ModelConfig(path="tiny:qwen_image")
    engine_options = {"pipeline": defaults.pipeline, "family_options": to_plain(defaults.family_options)}
    pipe.use_attention_function(flash, **attention_options(engine_options))


# "engine_dpm": the engine's configuration with MixGRPO-Flash's DPM-Solver++ steps after the window.
@pytest.mark.parametrize("configuration", ["engine", "masked", "engine_dpm"])
def test_denoising_loop_has_no_host_sync(pipe, configuration):
    _use_engine_attention(pipe, configuration != "masked")
    solver = {}
    if configuration == "engine_dpm":
        solver = dict(ode_solver="dpmsolver++", ode_compress_ratio=0.8, trajectory_window_only=True, window_start=0)
    params = DiffusionSamplingParams(
        num_inference_steps=6, height=256, width=256, guidance_scale=4.0, sde_window_size=2, noise_level=0.7, **solver
    ).validate()
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

    with torch.no_grad():
        result, syncs = _syncs_during(
            lambda: denoise_with_logprobs(
                velocity,
                latents,
                sigmas,
                timesteps,
                params,
                generators,
                tail_schedule=lambda start, points: pipe.rl_tail_schedule(params, start, points),
            )
        )
        # Negative control: the step with host scalars for sigma (what the loop did before) waits for the device.
        sample = torch.randn(2, 8, device="cuda")
        _, control = _syncs_during(
            lambda: sde_step_with_logprob(
                sample, sample, torch.tensor(0.8), torch.tensor(0.6), noise_level=0.7, sigma_max=0.9, noise=sample
            )
        )
    masked_forwards = inputs.joint is not None and inputs.joint.mask is not None
    write_figures(
        f"denoise_no_sync_gpu_{configuration}.json",
        {"loop_syncs": syncs, "host_scalar_step_syncs": control, "masked_forwards": masked_forwards},
    )
    if configuration != "masked":
        assert not masked_forwards, "the engine's configuration should run the CFG branches unmasked"
        assert syncs == [], f"the denoising loop waited for the device at {syncs}"
    else:
        assert masked_forwards, "without a fused kernel the CFG branches should share one masked forward"
        ours = [where for where in syncs if "transformer_qwenimage.py" not in where]
        assert ours == [], f"the denoising loop waited for the device at {ours} (all waits: {syncs})"
    assert control, "sync debug mode saw no wait in a step with host-scalar sigmas: the check above proves nothing"
    log_probs = result.log_probs.cpu()
    assert result.window_mask.sum() == params.sde_window_size
    assert torch.isfinite(log_probs).all() and (log_probs[:, result.window_mask] != 0).all()
