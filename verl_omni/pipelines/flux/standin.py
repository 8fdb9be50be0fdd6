"""FLUX.1-dev's tiny random pipeline for CPU tests (``tiny:flux``); the real checkpoint's published figures and its
real-size stand-in are in ``published.py``.

Tiny FLUX: one double-stream and one single-stream block (head dim 128 with RoPE axes (16, 56, 56) as the real
model, so a GPU's FA3 takes it), the guidance embedding, CLIP-L-style and T5-style text encoders with tokenizers
built locally (``models/tiny.py``), a 16-channel ``AutoencoderKL`` with VAE factor 8. Image sides must be multiples
of 16 (VAE factor x the 2x2 packing). Built offline, deterministically from the seed, in about a second.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from verl_omni.models.tiny import (
    _randomize_zero_params,
    _seeded_init,
    build_clip_tokenizer,
    build_t5_tokenizer,
    tiny_autoencoder_kl,
    tiny_clip_text_config,
    tiny_t5_encoder_config,
)
from verl_omni.pipelines.flux.published import SCHEDULER as PUBLISHED_SCHEDULER
from verl_omni.pipelines.flux.published import VAE as PUBLISHED_VAE

# The published scheduler and VAE latent scaling (black-forest-labs/FLUX.1-dev scheduler/ and vae/config.json)
FLUX_SCHEDULER_CONFIG: dict[str, Any] = PUBLISHED_SCHEDULER

CLIP_HIDDEN, T5_HIDDEN = 32, 64


def build_tiny_flux(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32) -> str:
    """Tiny random FLUX.1-dev-style pipeline directory at ``path`` (loadable by ``FluxPipeline.from_pretrained``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    with _seeded_init(seed, torch.float32):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=128,
            num_attention_heads=2,
            joint_attention_dim=T5_HIDDEN,
            pooled_projection_dim=CLIP_HIDDEN,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
    with _seeded_init(seed + 1, torch.float32):
        vae = tiny_autoencoder_kl(
            scaling_factor=PUBLISHED_VAE["scaling_factor"], shift_factor=PUBLISHED_VAE["shift_factor"]
        )
    with _seeded_init(seed + 2, torch.float32):
        text_encoder = CLIPTextModel(tiny_clip_text_config(clip_tokenizer, CLIP_HIDDEN))
    with _seeded_init(seed + 3, torch.float32):
        text_encoder_2 = T5EncoderModel(tiny_t5_encoder_config(t5_tokenizer, T5_HIDDEN))
    for offset, module in enumerate((transformer, vae, text_encoder, text_encoder_2)):
        _randomize_zero_params(module, seed + 100 + offset)

    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae.to(dtype).eval(),
        text_encoder=text_encoder.to(dtype).eval(),
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2.to(dtype).eval(),
        tokenizer_2=t5_tokenizer,
        transformer=transformer.to(dtype).eval(),
    )
    pipe.save_pretrained(str(path))
    return str(path)


__all__ = ["FLUX_SCHEDULER_CONFIG", "build_tiny_flux"]
