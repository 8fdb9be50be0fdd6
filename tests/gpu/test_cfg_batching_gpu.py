"""Batched CFG (one forward of 2B rows) vs two forwards on the GPU in bf16, with diffusers' attention and with the
vllm-omni engine's fused processor (FA3 when unmasked); run on the device: scripts/device/run_gpu.sh.

Model: the GPU fixture's Qwen-Image of 2 layers at the real width (24 heads x 128). bf16 tolerance: the two
layouts compute the same function (padded keys get attention weight 0), but bf16 GEMMs / attention kernels round
at 2^-8 = 3.9e-3 relative and pick different kernels for 2B vs B rows, and the masked (SDPA) and unmasked (FA3)
kernels accumulate differently. Asserted: velocities within 1e-2 relative L2 and 3e-2 x max |v| (about 4 bf16 ulps
of the largest value); rollouts: final latents relative L2 <= 5e-2 and log-probs max |diff| <= 0.05 per step (the
bounds of test_vllm_omni_engine_gpu.py for B=N vs N x B=1). Negative control: a padding the mask does not hide moves
velocities by more than 4x the batched layout's relative L2 (relative L2, not max-abs: max-abs is a count of bf16
ulps and separates the two cases less).
Timings of one B=16, 512x512 forward pair are written to $OUT/cfg_batching_gpu.json.
"""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from gpu_helpers import requires_cuda, write_figures

from verl_omni.config.sampling import DiffusionSamplingParams
from verl_omni.core.conditioning import Conditioning
from verl_omni.pipelines.model_inputs import ModelInputs

pytestmark = [pytest.mark.gpu, requires_cuda]

GUIDANCE = 4.0
VELOCITY_REL_L2_BOUND = 1e-2
VELOCITY_MAX_BOUND = 3e-2
LEAK_OVER_BATCHED = 4.0
PROMPTS = [
    "a red cat",
    "a much longer prompt: a blue dog on a sunny beach at noon, photographed from above",
    "x",
    "a quiet street at night",
]
NEGATIVES = {
    "shorter": "",
    "longer": "blurry, low quality, oversaturated, extra fingers, watermark, jpeg artifacts, "
    "text, cropped, out of frame, worst quality, deformed, ugly, duplicate",
}


@pytest.fixture(scope="module")
def pipe(gpu_qwen_image_dir):
    from verl_omni.pipelines.qwen_image.pipeline import QwenImageRLPipeline

    pipe = QwenImageRLPipeline.from_pretrained(gpu_qwen_image_dir, torch_dtype=torch.bfloat16).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flash():
    from verl_omni.rollout.engines.vllm_omni.worker import resolve_flash_attention

    return resolve_flash_attention()


def _training_batch(pipe, negative, extra_padding=7):
    """Rows of different prompts, each padded to one longer length, then cut back as the actor does."""
    params = DiffusionSamplingParams(max_sequence_length=256)
    rows = [pipe.encode_conditions(p, negative, params).conditioning for p in PROMPTS]
    length = max(max(r.prompt_embeds.shape[1], r.negative_prompt_embeds.shape[1]) for r in rows) + extra_padding

    def padded(t):
        return torch.nn.functional.pad(t, [0, 0] * (t.ndim - 2) + [0, length - t.shape[1]])

    fields = {
        name: torch.cat([padded(getattr(r, name)) for r in rows])
        for name, value in rows[0].as_fields().items()
        if value is not None
    }
    return Conditioning(**fields).without_padding()


def _velocities(pipe, cond, size=256):
    tokens = (size // pipe.vae_scale_factor // 2) ** 2
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(cond.batch_size, tokens, pipe.transformer.config.in_channels, generator=generator)
    latents, timestep = latents.cuda(), torch.linspace(0.9, 0.2, cond.batch_size, device="cuda")
    with torch.no_grad():
        batched = pipe.predict_velocity(latents, timestep, cond, GUIDANCE, size, size, batch_cfg=True)
        two = pipe.predict_velocity(latents, timestep, cond, GUIDANCE, size, size, batch_cfg=False)
        inputs = pipe.prepare_model_inputs(cond, GUIDANCE, batch_cfg=True)
        unmasked = ModelInputs(inputs.batch_size, joint=dataclasses.replace(inputs.joint, mask=None))
        leaky = pipe.predict_velocity(latents, timestep, unmasked, GUIDANCE, size, size)
    two, batched, leaky = two.float(), batched.float(), leaky.float()
    scale = two.abs().max().item()
    return {
        "batched_vs_two": (batched - two).abs().max().item() / scale,
        "unmasked_padding_vs_two": (leaky - two).abs().max().item() / scale,
        "batched_vs_two_rel_l2": ((batched - two).norm() / two.norm()).item(),
        "unmasked_padding_vs_two_rel_l2": ((leaky - two).norm() / two.norm()).item(),
        "max_abs_velocity": scale,
    }


def _set_attention(pipe, flash):
    from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

    if flash is None:
        for block in pipe.transformer.transformer_blocks:
            block.attn.set_processor(QwenDoubleStreamAttnProcessor2_0())
    else:
        pipe.use_attention_function(flash)


def test_batched_cfg_equals_two_forwards_in_bf16(pipe):
    flash = _flash()
    figures = {}
    for attention in ["sdpa"] + (["fa3"] if flash is not None else []):
        _set_attention(pipe, None if attention == "sdpa" else flash)
        for name, negative in NEGATIVES.items():
            figures[f"{attention}_negative_{name}"] = _velocities(pipe, _training_batch(pipe, negative))
    _set_attention(pipe, None)
    write_figures("cfg_batching_gpu_velocity.json", figures)  # before asserting: a failure keeps its figures
    for key, errors in figures.items():
        assert errors["batched_vs_two_rel_l2"] < VELOCITY_REL_L2_BOUND, (key, errors)
        assert errors["batched_vs_two"] < VELOCITY_MAX_BOUND, (key, errors)
        assert errors["unmasked_padding_vs_two_rel_l2"] > LEAK_OVER_BATCHED * errors["batched_vs_two_rel_l2"], (
            key,
            errors,
        )


def test_rollout_with_batch_cfg_on_and_off_in_bf16(pipe):
    flash = _flash()
    figures = {}
    for attention in ["sdpa"] + (["fa3"] if flash is not None else []):
        _set_attention(pipe, None if attention == "sdpa" else flash)
        for name, negative in NEGATIVES.items():
            params = DiffusionSamplingParams(
                num_inference_steps=6,
                height=256,
                width=256,
                guidance_scale=GUIDANCE,
                negative_prompt=negative,
                sde_window_size=2,
                window_start=1,
                max_sequence_length=256,
            )
            on = pipe.rl_generate(PROMPTS[1], [1, 2, 3, 4], params)
            off = pipe.rl_generate(PROMPTS[1], [1, 2, 3, 4], params.replace(batch_cfg=False))
            rel = float((on.latents[:, -1].float() - off.latents[:, -1].float()).norm() / off.latents[:, -1].norm())
            logp = float((on.log_probs - off.log_probs).abs().max())
            figures[f"{attention}_negative_{name}"] = {"final_latents_rel_l2": rel, "log_prob_max_abs_diff": logp}
            assert rel <= 5e-2 and logp <= 0.05, (attention, name, rel, logp)
    _set_attention(pipe, None)
    write_figures("cfg_batching_gpu_rollout.json", figures)


def test_cfg_forward_timings(pipe):
    """Seconds per guided velocity of B=16 at 512x512 (1024 image tokens; prompt 93 text tokens, negative 13 or
    105): one masked 2B call vs two B calls, with SDPA and with FA3. Figures only (2 layers: transformer time is
    small, so this shows the relative cost of the layouts, not end-to-end speed)."""
    flash = _flash()
    size, batch = 512, 16
    tokens = (size // pipe.vae_scale_factor // 2) ** 2
    latents = torch.randn(batch, tokens, pipe.transformer.config.in_channels, device="cuda", dtype=torch.bfloat16)
    params = DiffusionSamplingParams(max_sequence_length=256)
    figures = {}
    for attention in ["sdpa"] + (["fa3"] if flash is not None else []):
        _set_attention(pipe, None if attention == "sdpa" else flash)
        for name, negative in NEGATIVES.items():
            cond = pipe.encode_conditions(PROMPTS[1], negative, params).conditioning.repeat(batch)
            for batch_cfg in (True, False):
                inputs = pipe.prepare_model_inputs(cond, GUIDANCE, batch_cfg=batch_cfg)
                with torch.no_grad():
                    for _ in range(3):
                        pipe.predict_velocity(latents, 0.5, inputs, GUIDANCE, size, size)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(10):
                        pipe.predict_velocity(latents, 0.5, inputs, GUIDANCE, size, size)
                    torch.cuda.synchronize()
                figures[f"{attention}_negative_{name}_{'batched' if batch_cfg else 'two_forwards'}_ms"] = (
                    (time.perf_counter() - t0) / 10 * 1e3
                )
    _set_attention(pipe, None)
    write_figures("cfg_batching_gpu_timing.json", figures)
